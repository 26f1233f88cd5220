"""Peak RSS of packing: the streaming packer against its largest extent (issue 2), and a Wanda
pack against "one layer + calibration activations" (issue 8).

    python bench/bench_wanda_rss.py [--dir /tmp/endor-wanda-rss] [--layers 8] [--hidden 2048]
        [--intermediate 5632] [--vocab 32000] [--samples 16] [--seqlen 256] [--no-wanda] [--smoke]

Builds a random fp16 Llama with tests/models.build_model (once; reused if present), writes
``samples x seqlen`` random token ids, then runs three fresh child processes and reads each one's
own peak resident set (``ru_maxrss`` from ``os.wait4``, so the parent and the build do not count):

1. baselines: the same packs of a tiny Llama (2 layers, hidden 64; Wanda with 2 x 16 tokens):
   the interpreter and every module and code path the pack loads, and no data worth counting:
   the fixed cost every such pack pays (the magnitude packer never imports transformers, so it
   gets a baseline of its own);
2. ``endor-gds pack --prune magnitude`` and ``--prune none``: the streaming packer, one tensor
   at a time; reported against the largest extent of the file it wrote, with its throughput
   (checkpoint bytes per second);
3. ``endor-gds pack --prune wanda --calib ids``: one layer + activations.

The parent also polls each child's VmRSS every 0.1 s and prints the largest value seen in each
quarter of its run, so growth with the layer index (a leak) would show. The default shapes are
TinyLlama's layer widths with full multi-head attention: 103 MB per layer, 8 layers, ~1.1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

MiB = 1 << 20

def _vmrss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        return None
    return None


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``; its own peak RSS (bytes), wall seconds and quarter-by-quarter polled RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def poll():
        while not done.is_set():
            rss = _vmrss(proc.pid)
            if rss is not None:
                samples.append((time.perf_counter() - t0, rss))
            done.wait(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    poller.join()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    quarters = []
    for q in range(4):
        inside = [r for t, r in samples if q * seconds / 4 <= t < (q + 1) * seconds / 4]
        quarters.append(max(inside) if inside else None)
    return {"peak": usage.ru_maxrss * 1024, "seconds": seconds, "quarters": quarters,
            "stdout": out.decode().strip()}


def _build(root: Path, layers, hidden, intermediate, heads, vocab, positions) -> Path:
    """A random fp16 Llama under ``root`` (built once, in a child process so that this process's
    memory stays small and the measurements honest)."""
    src = root / f"llama-L{layers}-h{hidden}-i{intermediate}-v{vocab}"
    if not (src / "config.json").exists():
        print(f"building {src} ...", flush=True)
        subprocess.run([sys.executable, "-c", (
            "import sys, torch; from endor_gds.benchmarks.models import build_model; "
            f"build_model({str(src)!r}, 'llama', torch.float16, tokenizer=False, "
            f"hidden_size={hidden}, intermediate_size={intermediate}, num_hidden_layers={layers}, "
            f"num_attention_heads={heads}, num_key_value_heads={heads}, vocab_size={vocab}, "
            f"max_position_embeddings={positions})")], cwd=ROOT, check=True, capture_output=True)
    return src


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/endor-wanda-rss"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--no-wanda", action="store_true", help="only the streaming packer's runs")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, for the test suite")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.intermediate, args.heads = 2, 128, 352, 4
        args.vocab, args.samples, args.seqlen = 512, 2, 16

    import torch  # noqa: PLC0415 - after argument parsing, so --help is instant

    from endor_gds.container import EndorFile  # noqa: PLC0415
    from endor_gds.packing.checkpoint import Checkpoint  # noqa: PLC0415

    src = _build(args.dir, args.layers, args.hidden, args.intermediate, args.heads, args.vocab,
                 max(256, args.seqlen))
    tiny = _build(args.dir, 2, 64, 176, 4, 512, 256)
    ckpt = Checkpoint(src)
    layer0 = [i for n, i in ckpt.tensors.items() if n.startswith("model.layers.0.")]
    layer_bytes = sum(i.nbytes for i in layer0)
    largest_linear = max(i.nbytes for i in layer0)
    embed_bytes = ckpt.tensors["model.embed_tokens.weight"].nbytes
    act_bytes = args.samples * args.seqlen * args.hidden * 2  # fp16 hidden states, one buffer
    ids = args.dir / f"calib-{args.samples}x{args.seqlen}.ids"
    rng = np.random.default_rng(0)
    ids.write_text(" ".join(map(str, rng.integers(0, args.vocab, args.samples * args.seqlen))))
    tiny_ids = args.dir / "calib-tiny.ids"
    tiny_ids.write_text(" ".join(map(str, rng.integers(0, 512, 2 * 16))))

    import transformers  # noqa: PLC0415

    print(f"# bench_wanda_rss: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM, "
          f"python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, torch threads {torch.get_num_threads()}")
    print(f"# model {src} ({ckpt.nbytes() / 1e9:.2f} GB fp16, {args.layers} layers); calibration "
          f"{args.samples} x {args.seqlen} tokens; device cpu")
    pack = [sys.executable, "-m", "endor_gds", "pack"]
    # name -> (command, the baseline run it is compared with)
    runs = {
        "baseline (magnitude, tiny model)": (pack + [str(tiny), str(args.dir / "tiny-magnitude.endor"),
                                                     "--prune", "magnitude", "-q"], None),
        "pack --prune magnitude": (pack + [str(src), str(args.dir / "magnitude.endor"),
                                           "--prune", "magnitude", "-q"], "baseline (magnitude, tiny model)"),
        "pack --prune none": (pack + [str(src), str(args.dir / "none.endor"), "--prune", "none", "-q"],
                              "baseline (magnitude, tiny model)"),
    }
    if not args.no_wanda:
        runs["baseline (wanda, tiny model)"] = (pack + [
            str(tiny), str(args.dir / "tiny.endor"), "--prune", "wanda", "--calib", str(tiny_ids),
            "--calib-samples", "2", "--calib-seqlen", "16", "-q"], None)
        runs["pack --prune wanda"] = (pack + [
            str(src), str(args.dir / "wanda.endor"), "--prune", "wanda", "--calib", str(ids),
            "--calib-samples", str(args.samples), "--calib-seqlen", str(args.seqlen), "-q"],
            "baseline (wanda, tiny model)")
    results = {}
    print(f"{'run':<34} {'peak RSS':>10} {'- baseline':>11} {'seconds':>8}   RSS max per quarter (MiB)")
    for name, (cmd, base_name) in runs.items():
        r = results[name] = run_measured(cmd)
        r["over_baseline"] = r["peak"] - results[base_name]["peak"] if base_name else 0
        quarters = " ".join(f"{q / MiB:.0f}" if q else "-" for q in r["quarters"])
        print(f"{name:<34} {r['peak'] / MiB:>7.0f} MiB {r['over_baseline'] / MiB:>7.0f} MiB "
              f"{r['seconds']:>8.1f}   {quarters}", flush=True)
    print(f"one layer {layer_bytes / MiB:.1f} MiB (largest linear {largest_linear / MiB:.1f} MiB), "
          f"activations {act_bytes / MiB:.1f} MiB, embeddings {embed_bytes / MiB:.1f} MiB, "
          f"whole model {ckpt.nbytes() / MiB:.0f} MiB")
    for kind in ("magnitude", "none"):
        r = results[f"pack --prune {kind}"]
        with EndorFile(args.dir / f"{kind}.endor") as f:
            extents = [x.length for x in f.layers] + ([f.resident.length] if f.resident else [])
        r["largest_extent"] = max(extents)
        r["mb_per_s"] = ckpt.nbytes() / r["seconds"] / 1e6
        print(f"pack --prune {kind}: peak - baseline = {r['over_baseline'] / MiB:.0f} MiB = "
              f"{r['over_baseline'] / r['largest_extent']:.2f} x its largest extent "
              f"({r['largest_extent'] / MiB:.1f} MiB; target < 3); {r['mb_per_s']:.0f} MB/s of checkpoint")
    if not args.no_wanda:
        wanda = results["pack --prune wanda"]["over_baseline"]
        print(f"wanda peak - baseline = {wanda / MiB:.0f} MiB = "
              f"{wanda / (layer_bytes + act_bytes):.2f} x (one layer + activations), "
              f"{wanda / ckpt.nbytes():.2f} x the model")
    if args.json:
        args.json.write_text(json.dumps({
            "model": str(src), "model_bytes": ckpt.nbytes(), "layers": args.layers,
            "samples": args.samples, "seqlen": args.seqlen, "layer_bytes": layer_bytes,
            "largest_linear_bytes": largest_linear, "activation_bytes": act_bytes,
            "embedding_bytes": embed_bytes,
            "runs": {name: {k: v for k, v in r.items() if k != "stdout"} for name, r in results.items()},
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
