"""``endor-gds serve`` under load: aggregate tokens/s and per-request latency against concurrency.

Builds (cached) the TinyLlama-1.1B-shaped checkpoint and its 50 %-pruned file (as ``endor-gds
bench``), empties the page cache of that file, starts the server in a subprocess, and at each
concurrency (1, 2, 4, 8, 16, 32 by default) sends that many streamed completions at once with the
``openai`` client, each ``--tokens`` long, greedy, distinct random prompts. Reports per level the
aggregate tokens/s, p50/p95 time to first token and per output token, forward steps and bytes
read per generated token; the ratio of each level's tokens/s to concurrency 1's, in the same run::

    python bench/bench_serve.py --json serve.json --plot serve.png
    python bench/bench_serve.py --config tiny --levels 1,2,4,8     # a quick look

Targets (issue: one weight pass per step for all requests): tokens/s at 8 concurrent >= 4x that
at 1 on the 2-core CPU class; at 16 >= 10x on a GPU host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from endor_gds.benchmarks.e2e import build_checkpoint, packed_variants, resolve_config
from endor_gds.benchmarks.system import system_header
from endor_gds.read.pagecache import evict_page_cache


def _metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    return {ln.split()[0]: float(ln.split()[-1]) for ln in text.splitlines() if ln and not ln.startswith("#")}


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None


async def _one(client, prompt, tokens):
    t0 = time.perf_counter()
    times, n = [], 0
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=tokens, temperature=0,
                                             stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if getattr(chunk, "usage", None):
            n = chunk.usage.completion_tokens
    ttft = times[0] - t0 if times else None
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return n, ttft, tpot


async def _level(url, concurrency, tokens, vocab, seed):
    import openai  # noqa: PLC0415 - the test extra; only this script needs it

    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (16,), generator=gen).tolist() for _ in range(concurrency)]
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_one(client, p, tokens) for p in prompts))
        wall = time.perf_counter() - t0
    return results, wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tinyllama-1.1b")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--levels", default="1,2,4,8,16,32", help="concurrency levels, in order")
    p.add_argument("--tokens", type=int, default=16, help="tokens per request")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None, metavar="OUT")
    p.add_argument("--plot", default=None, metavar="OUT.png")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    root = Path(args.cache_dir) if args.cache_dir else None
    ckpt = build_checkpoint(args.config, args.dtype, root=root)
    path = packed_variants(ckpt, 0.5, kinds=("pruned",))["pruned"]
    vocab = resolve_config(args.config)[1]["vocab_size"]
    evict_page_cache(path)  # cold at start; each step reads every streamed layer again anyway
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "endor_gds", "serve", str(path), "--port", str(port),
                               "--device", args.device, "--model-name", "bench", "--max-batch", str(max(levels))])
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, "the server exited"
                time.sleep(0.5)
        rows = []
        for c in levels:
            before = _metrics(url)
            results, wall = asyncio.run(_level(url, c, args.tokens, vocab, seed=c))
            after = _metrics(url)
            tokens = sum(n for n, _, _ in results)
            steps = after["endor_forward_steps_total"] - before["endor_forward_steps_total"]
            rows.append({
                "concurrency": c, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                "ttft_p50_s": _pct([t for _, t, _ in results if t], 0.5),
                "ttft_p95_s": _pct([t for _, t, _ in results if t], 0.95),
                "tpot_p50_s": _pct([t for _, _, t in results if t], 0.5),
                "tpot_p95_s": _pct([t for _, _, t in results if t], 0.95),
                "steps": steps, "bytes_per_step": after["endor_bytes_per_step"],
                "bytes_per_token": after["endor_bytes_per_step"] * steps / max(tokens, 1),
            })
            r = rows[-1]
            print(f"concurrency {c:>3}: {r['tokens_per_s']:7.2f} tokens/s ({tokens} tokens in {wall:6.1f} s, "
                  f"{steps:.0f} steps), TTFT p50 {r['ttft_p50_s']:.2f} s p95 {r['ttft_p95_s']:.2f} s, per token "
                  f"p50 {r['tpot_p50_s'] or 0:.3f} s, {r['bytes_per_token'] / 1e6:.0f} MB read per token", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=120)
    base = rows[0]["tokens_per_s"] if rows and rows[0]["concurrency"] == 1 else None
    for r in rows:
        r["speedup_vs_1"] = r["tokens_per_s"] / base if base else None
    by = {r["concurrency"]: r for r in rows}
    gpu = args.device.startswith("cuda")
    target_c, target_x = (16, 10.0) if gpu else (8, 4.0)
    got = (by.get(target_c) or {}).get("speedup_vs_1")
    rep = {"system": system_header(args.device), "config": args.config, "dtype": args.dtype, "file": str(path),
           "tokens_per_request": args.tokens, "levels": rows,
           "target": f"tokens/s at {target_c} concurrent >= {target_x}x at 1",
           "target_met": None if got is None else got >= target_x}
    print("speedup over 1 client: " + ", ".join(f"{r['concurrency']}: {r['speedup_vs_1']:.2f}x" for r in rows))
    verdict = "n/a" if got is None else f"{got:.2f}x, {'met' if got >= target_x else 'MISSED'}"
    print(f"target {rep['target']}: {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1))
    if args.plot:
        import matplotlib  # noqa: PLC0415 - the bench extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 - as above

        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = [r["concurrency"] for r in rows]
        ax.plot(xs, [r["tokens_per_s"] for r in rows], "o-", label="tokens/s (all clients)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("tokens/s")
        ax2 = ax.twinx()
        ax2.plot(xs, [r["bytes_per_token"] / 1e6 for r in rows], "s--", color="gray", label="MB read per token")
        ax2.set_ylabel("MB read per generated token")
        fig.legend(loc="upper center", ncol=2, fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
