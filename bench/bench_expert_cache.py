#!/usr/bin/env python3
"""The expert cache of a mixture-of-experts model: eviction policy, size and prefetch, one run.

    python bench/bench_expert_cache.py --config qwen3-moe-5b --dtype bfloat16 --tokens 12 \\
        --caches 32,64,128,256 --json cache.json

Streams the config's 50 %-pruned file (built and packed by ``endor-gds bench --config ...``, or
here) from the RAM tier, so that storage speed does not enter: what differs between runs is which
experts are read. For each cache size, eviction policy (``balanced``: the least recently used
expert of the layer holding the most, the runtime's; ``lru``: the least recently used of any
layer) and prefetch (on/off), generates ``--tokens`` greedy tokens from the same prompt and prints
per generated token: experts routed, read, cache hits, read ahead and how many of those the next
layer was routed to, MB read, seconds. It also measures how often a layer's routed experts were
already routed at the previous token (the reuse a cache can exploit): random weights route far
from how trained routers do, so the hit rates here say how the policies compare, not what a
trained model gets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _reuse(model) -> list[dict[int, set[int]]]:
    """Per step, per MoE layer, the experts routed (a forward hook on each experts module)."""
    steps: list[dict[int, set[int]]] = []
    for i, layer in enumerate(model.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue

        def hook(mod, args, kwargs, i=i):
            steps[-1].setdefault(i, set()).update(args[1].reshape(-1).tolist())
        experts.register_forward_pre_hook(hook, with_kwargs=True)
    model.register_forward_pre_hook(lambda *_: steps.append({}))
    return steps


def run(path, cache: int, policy: str, prefetch: bool, tokens: int, prompt: torch.Tensor) -> dict:
    import endor_gds  # noqa: PLC0415

    model = endor_gds.from_pretrained(path, device="cpu", tier="ram", expert_cache=cache,
                                      expert_prefetch=prefetch)
    try:
        model.endor.experts.policy = policy
        routing = _reuse(model)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
        wall = time.perf_counter() - t0
        per = model.endor.summary()["per_token"]
        pairs = [(len(a[i] & b[i]), len(b[i])) for a, b in zip(routing[1:], routing[2:]) for i in b]
        return {"cache": cache, "policy": policy, "prefetch": prefetch, "wall_s": wall,
                "s_per_token": per["s"], "mb_per_token": per["bytes_read"] / 1e6,
                **{k: per[k] for k in ("experts_routed", "experts_read", "expert_hits",
                                       "experts_prefetched", "prefetch_hits")},
                "reuse_from_previous_token": sum(a for a, _ in pairs) / max(1, sum(b for _, b in pairs))}
    finally:
        model.endor.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="qwen3-moe-5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--caches", default="32,64,128,256")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from endor_gds.benchmarks.e2e import build_checkpoint, packed_variants, resolve_config  # noqa: PLC0415
    from endor_gds.benchmarks.system import system_header  # noqa: PLC0415

    ckpt = build_checkpoint(args.config, args.dtype, progress=False)
    path = packed_variants(ckpt, 0.5, progress=False, kinds=("pruned",))["pruned"]
    vocab = resolve_config(args.config)[1]["vocab_size"]
    prompt = torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    rows = []
    print(json.dumps(system_header("cpu")))
    print(f"{'cache':>5} {'policy':>8} {'prefetch':>8} {'routed':>6} {'read':>6} {'hits':>6} {'ahead':>6} "
          f"{'ahead ok':>8} {'MB/token':>9} {'s/token':>8} {'reuse':>6}")
    for cache in (int(c) for c in args.caches.split(",")):
        for policy in ("balanced", "lru"):
            for prefetch in (False, True):
                r = run(path, cache, policy, prefetch, args.tokens, prompt)
                rows.append(r)
                print(f"{cache:>5} {policy:>8} {'on' if prefetch else 'off':>8} {r['experts_routed']:>6.1f} "
                      f"{r['experts_read']:>6.1f} {r['expert_hits']:>6.1f} {r['experts_prefetched']:>6.1f} "
                      f"{r['prefetch_hits']:>8.1f} {r['mb_per_token']:>9.1f} {r['s_per_token']:>8.3f} "
                      f"{r['reuse_from_previous_token']:>6.2f}", flush=True)
    summary = {"file": str(path), "tokens": args.tokens, "rows": rows,
               "median_reuse": statistics.median(r["reuse_from_previous_token"] for r in rows)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
