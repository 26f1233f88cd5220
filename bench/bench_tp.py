#!/usr/bin/env python3
"""Tensor parallelism on this machine: N = 1 and N ranks (torchrun, gloo), per-rank files in folders
of their own, cold cache, one run; and a model of time per token for N = 1, 2, 4, 8 ranks each with
its own drive and its own cores, checked against the measured N.

    python bench/bench_tp.py --config tinyllama-1.1b --dtype float16 --tokens 8 --ranks 2 \\
        --dirs "/root/tp{rank}" --json tp.json

The 50 %-pruned checkpoint of ``--config`` is built and packed once (cached as ``endor-gds bench``
does), packed again with ``--tp N`` and split into ``<dir of rank r>/model.endor`` (``--dirs``: a
folder name with ``{rank}`` in it). Each run evicts its file's pages before every step. Printed
per run and rank: seconds per token, MB read per token, the stages' seconds (read, decode, compute,
all-reduce), and a micro-benchmark of one all-reduce of a step's activations (``[1, hidden]``) in
the same process group.

The model. With ``N = 1``'s per-token read time ``R``, decode + compute time ``W`` and the rest
``O`` (embeddings, lm_head, sampling, the steps' Python: per-token wall minus max(R, W)), and ``a``
the measured all-reduce latency for 2 ranks:

    T(N) = max(R * N / drives, W * N / cores) / N + O * N / cores + 2 L a (N - 1)

``drives`` and ``cores`` count how many of the N ranks have their own (``drives = cores = N`` on
N nodes, each with its own drive; ``drives = 1, cores = 1`` for N ranks sharing one drive and one
CPU, as here); gloo's ring all-reduce of a few KB is latency-bound, ``2 (N - 1)`` messages, so a
call costs ``a (N - 1)``; two all-reduces per layer. The table prints T(N) on separate nodes and,
for the measured N, T on this machine next to what was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def worker(path: str, tokens: int, out: str) -> None:
    """One rank (or the single process): a cold-cache generation, then the all-reduce probe."""
    import endor_gds  # noqa: PLC0415
    from endor_gds.benchmarks.e2e import StepTimer  # noqa: PLC0415
    from endor_gds.stream import parallel  # noqa: PLC0415

    tp = parallel.init_from_env("cpu")
    model = endor_gds.from_pretrained(path, device="cpu")
    rt = model.endor
    timer = StepTimer(model, [rt.file.path], cold=True)
    prompt = torch.tensor([[1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203]]) % model.config.vocab_size
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    timer.remove()
    s_tok = sorted(timer.token_seconds())
    summary = rt.summary()
    probe = None
    if tp is not None:
        x = torch.randn(1, model.config.hidden_size, dtype=model.dtype)
        for _ in range(20):
            tp.all_reduce(x)
        t0 = time.perf_counter()
        for _ in range(200):
            tp.all_reduce(x)
        probe = (time.perf_counter() - t0) / 200
    ranks = summary["tensor_parallel"]["ranks"] if tp is not None else [dict(summary["per_token"], file=path)]
    medians = tp.gather(s_tok[len(s_tok) // 2]) if tp is not None else [s_tok[len(s_tok) // 2]]
    if tp is None or tp.rank == 0:
        Path(out).write_text(json.dumps({
            "ranks": ranks, "s_per_token": max(medians), "layers": len(rt.placement.streamed_layers),
            "allreduce_s": probe, "reader": rt.mode, "cached_after_evict": timer.worst_cached}))
    rt.close()
    parallel.shutdown(clean=True)


def _cpu() -> str:
    from endor_gds.benchmarks.system import cpu_model  # noqa: PLC0415

    return f"{cpu_model()}, {os.cpu_count()} cores"


def _files(config: str, dtype: str, ranks: int, dirs: list[Path]) -> tuple[Path, list[Path]]:
    from endor_gds.benchmarks.e2e import build_checkpoint, packed_variants  # noqa: PLC0415
    from endor_gds.container import EndorFile  # noqa: PLC0415
    from endor_gds.packing.packer import pack  # noqa: PLC0415
    from endor_gds.packing.split import split  # noqa: PLC0415

    ckpt = build_checkpoint(config, dtype)
    single = packed_variants(ckpt, 0.5, kinds=("pruned",))["pruned"]
    whole = ckpt.parent / f"{ckpt.name}-magnitude50-tp{ranks}.endor"
    if not whole.exists():  # codec raw, as the N = 1 file ("pruned": format v1)
        pack(ckpt, whole, prune="magnitude", sparsity=0.5, tp=ranks, codec="raw")
    with EndorFile(whole) as f:
        want = f.fingerprint()
    parts = [d / "model.endor" for d in dirs]
    fresh = True
    for p in parts:
        try:
            with EndorFile(p) as f:
                fresh = fresh and f.fingerprint() == want
        except (OSError, ValueError, RuntimeError):
            fresh = False
    if not fresh:
        for r, made in enumerate(split(whole, whole.parent / f"{whole.stem}-split")):
            dirs[r].mkdir(parents=True, exist_ok=True)
            shutil.move(made, parts[r])
    return single, parts


def _run(cmd: list[str], out: Path) -> dict:
    env = dict(os.environ, ENDOR_TP_TIMEOUT="600")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tinyllama-1.1b")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--dirs", default=None,
                    help="each rank's folder, with {rank} in the name (default: <cache>/tp/rank{rank})")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", nargs=3, metavar=("PATH", "TOKENS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return 0
    from endor_gds.benchmarks.e2e import cache_root  # noqa: PLC0415

    n = args.ranks
    template = args.dirs or str(cache_root() / "tp" / "rank{rank}")
    if "{rank}" not in template:
        raise SystemExit(f"--dirs {template!r} has no {{rank}} in it")
    dirs = [Path(template.replace("{rank}", str(r))) for r in range(n)]
    single, parts = _files(args.config, args.dtype, n, dirs)
    print(f"# bench_tp: {args.config} {args.dtype}, 50 % magnitude, {args.tokens} tokens, cold cache "
          f"(pages evicted before every step), CPU {_cpu()}, torch {torch.__version__}")
    print(f"# N = 1: {single}; N = {n}: {', '.join(map(str, parts))}")
    scratch = Path(dirs[0]).parent / "bench_tp_out"
    scratch.mkdir(exist_ok=True)
    one = _run([sys.executable, __file__, "--worker", str(single), str(args.tokens), str(scratch / "n1.json")],
               scratch / "n1.json")
    many = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                 __file__, "--worker", str(Path(template) / "model.endor"), str(args.tokens),
                 str(scratch / f"n{n}.json")], scratch / f"n{n}.json")

    print(f"{'run':<8} {'rank':>4} {'s/token':>8} {'MB/token':>9} {'read s':>7} {'decode s':>8} "
          f"{'compute s':>9} {'allreduce s':>11}")
    for label, res in (("N=1", one), (f"N={n}", many)):
        for r, x in enumerate(res["ranks"]):
            print(f"{label:<8} {r:>4} {x['s']:>8.3f} {x['bytes_read'] / 1e6:>9.1f} {x['read_s']:>7.3f} "
                  f"{x['decode_s']:>8.3f} {x['compute_s']:>9.3f} {x['collective_s']:>11.4f}")
    t1 = one["s_per_token"]
    x1 = one["ranks"][0]
    read, work = x1["read_s"], x1["decode_s"] + x1["compute_s"]
    rest = max(0.0, t1 - max(read, work))
    a = many["allreduce_s"]
    layers = one["layers"]

    def model(ranks: int, drives: int, cores: int) -> float:
        return max(read * ranks / drives, work * ranks / cores) / ranks + rest * ranks / cores \
            + 2 * layers * a * (ranks - 1)

    measured = many["s_per_token"]
    here = model(n, 1, 1)
    print(f"median s/token: N=1 {t1:.3f}, N={n} {measured:.3f} ({t1 / measured:.2f}x); all-reduce of "
          f"[1, hidden] at N={n}: {a * 1e6:.0f} us; N=1 per token: read {read:.3f} s, decode + compute "
          f"{work:.3f} s, rest {rest:.3f} s")
    print(f"model on this machine (one drive, one CPU shared by the {n} ranks): N={n} {here:.3f} s/token, "
          f"measured {measured:.3f} ({measured / here:.2f}x the model)")
    table = {k: model(k, k, k) for k in (1, 2, 4, 8)}
    print("model, each rank on a node of its own (its drive, its cores): "
          + ", ".join(f"N={k} {v:.3f} s/token ({t1 / v:.2f}x)" for k, v in table.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "dtype": args.dtype, "tokens": args.tokens,
                                               "cpu": _cpu(), "n1": one, f"n{n}": many, "model_here": here,
                                               "model_nodes": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
