#!/usr/bin/env python3
"""The GPU check's throughput: CRC-32C of an extent in device memory against a D2D copy of it.

    python bench/bench_crc_gpu.py                         # one Llama-70B layer at 50 %, fp16 (~1 GB)
    python bench/bench_crc_gpu.py --layer llama-7b --json
    python bench/bench_crc_gpu.py --segment-bytes 4KiB,1MiB,64MiB --nbytes 512MiB --repeats 9

Timed, on one stream, interleaved run by run: the check as the decoder thread runs it after a
KvikIO read (``GpuCrc.launch``: the resets, both kernels, the 8-byte verdict's copy; then
``result``), and a device-to-device copy of the same bytes (``cudaMemcpyAsync``). The extent is
far larger than the L2 (50 MB on an H100/H200), so both stream from HBM. Reported per layout:
``crc_gbps`` (bytes checked per second, GPU time between events), ``latency`` (what the decoder
thread waits: host time from the launch to the verdict), ``d2d_gbps`` (bytes copied per second; a
copy reads and writes each byte, so its HBM traffic is twice that), ``vs_d2d`` (crc_gbps over
d2d_gbps: above 1, checking a byte costs less than copying it) and ``of_hbm`` (crc_gbps over the
copy's traffic: the fraction of HBM bandwidth the check reads at; by design it is bound by integer
instructions, not memory: ~0.5-0.7 expected on an H200, about 1 on an A100).

Segments: those of one decoder layer of ``--layer`` at 50 % sparsity in fp16, format v1 (per
linear weight: bitmap, tile offsets, values; per norm: its data), or ``--segment-bytes`` sizes in
turn up to ``--nbytes``; each padded to 4 KiB as in a packed file. Two layouts over the same
bytes: ``aligned`` (segments at their 4 KiB offsets) and ``odd`` (each starting 1..127 bytes
later and ending 1..127 bytes sooner: the masked rows at both ends of every segment). Before any
timing, every segment's CRC-32C is compared with crc32c of the host copy and a flipped bit must be
named: a wrong kernel is never timed. ``--json`` prints the report on stderr and one JSON object
on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import crc32c
import numpy as np

from endor_gds.benchmarks.system import header_line
from endor_gds.decode import gpu_crc
from endor_gds.defaults import parse_bytes

# (out_features, in_features) of a decoder layer's linear weights, and its hidden size (norms)
LAYERS = {
    "llama-7b": ([(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)], 4096),
    "llama-70b": ([(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192)] + [(28672, 8192)] * 2
                  + [(8192, 28672)], 8192),
}
PAGE = 4096


def _pad(n: int) -> int:
    return -(-n // PAGE) * PAGE


def layer_segments(layer: str) -> list[int]:
    """Segment lengths of one layer at 50 % sparsity, fp16, format v1, padded to 4 KiB."""
    shapes, hidden = LAYERS[layer]
    out = []
    for rows, cols in shapes:
        n = rows * cols
        out += [_pad(n // 8), _pad((-(-n // 4096) + 1) * 4), _pad(n // 2 * 2)]  # bitmap, offsets, values
    return out + [_pad(2 * hidden)] * 2  # the two norms


def stats(seconds: list[float], nbytes: int) -> dict:
    med = float(np.median(seconds))
    return {"median_s": med, "min_s": float(min(seconds)), "max_s": float(max(seconds)),
            "gbps": nbytes / med / 1e9, "spread_pct": 100.0 * (max(seconds) - min(seconds)) / med,
            "runs": len(seconds)}


def spans_of(lengths: list[int], odd: bool, rng) -> list[tuple[int, int]]:
    """``(offset, length)`` of each segment in the buffer: 4 KiB-aligned, or shrunk at both ends."""
    spans, pos = [], 0
    for n in lengths:
        if odd and n > 256:
            head, tail = int(rng.integers(1, 128)), int(rng.integers(1, 128))
            spans.append((pos + head, n - head - tail))
        else:
            spans.append((pos, n))
        pos += n
    return spans


def verify(crc, cp, dev, host: np.ndarray, spans) -> list:
    """The table of ``spans``: every CRC must match crc32c's, a flipped bit must be named."""
    base = int(dev.data.ptr)
    segments = [gpu_crc.GpuSegment(base + off, n, crc32c.crc32c(host[off:off + n])) for off, n in spans]
    table = crc.make_table(segments)
    stream = cp.cuda.Stream(non_blocking=True)
    crc.launch(table, stream)
    bad = crc.result(table)
    if bad is not None:
        raise SystemExit(f"the GPU check fails an intact extent (segment {bad[0]}): refusing to time it")
    i = max(range(len(spans)), key=lambda k: spans[k][1])
    off, n = spans[i]
    pos = off + n // 2 + 1
    dev[pos] ^= 0x20
    crc.launch(table, stream)
    got = crc.result(table)
    dev[pos] ^= 0x20
    flipped = host[off:off + n].copy()
    flipped[n // 2 + 1] ^= 0x20
    if got != (i, crc32c.crc32c(flipped)):
        raise SystemExit(f"the GPU check names {got} for a bit flipped in segment {i}: refusing to time it")
    return segments


def time_layout(crc, cp, dev, segments, nbytes: int, repeats: int, warmup: int) -> dict:
    """The check and a D2D copy of ``nbytes``, interleaved, on one stream."""
    table = crc.make_table(segments)
    stream = cp.cuda.Stream(non_blocking=True)
    dst = cp.empty(nbytes, dtype=cp.uint8)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times: dict[str, list[float]] = {"crc": [], "latency": [], "d2d": []}
    for i in range(warmup + repeats):
        start.record(stream)
        t0 = time.perf_counter()
        crc.launch(table, stream)
        end.record(stream)
        bad = crc.result(table)
        wall = time.perf_counter() - t0
        end.synchronize()
        if bad is not None:
            raise SystemExit(f"the GPU check failed an intact extent in a timed run: {bad}")
        if i >= warmup:
            times["crc"].append(cp.cuda.get_elapsed_time(start, end) / 1e3)
            times["latency"].append(wall)
        start.record(stream)
        cp.cuda.runtime.memcpyAsync(dst.data.ptr, dev.data.ptr, nbytes, cp.cuda.runtime.memcpyDeviceToDevice,
                                    stream.ptr)
        end.record(stream)
        end.synchronize()
        if i >= warmup:
            times["d2d"].append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    checked = sum(sg.length for sg in segments)
    c, d = stats(times["crc"], checked), stats(times["d2d"], nbytes)
    return {"segments": len(segments), "bytes_checked": checked, "crc": c,
            "latency": stats(times["latency"], checked), "d2d": d,
            "vs_d2d": c["gbps"] / d["gbps"], "of_hbm": c["gbps"] / (2 * d["gbps"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", default="llama-70b", choices=sorted(LAYERS),
                    help="whose layer's segments to check (default llama-70b: ~1 GB)")
    ap.add_argument("--segment-bytes", default=None,
                    help="comma list of segment sizes (e.g. 4KiB,1MiB,64MiB) used in turn instead of --layer's")
    ap.add_argument("--nbytes", type=parse_bytes, default=parse_bytes("1GiB"),
                    help="extent size with --segment-bytes (default 1GiB)")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per layout (default 7)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout, the report on stderr")
    args = ap.parse_args(argv)
    report = sys.stderr if args.json else sys.stdout

    import cupy as cp  # noqa: PLC0415 - GPU only; the module imports without it

    if args.segment_bytes:
        sizes = [_pad(parse_bytes(s)) for s in args.segment_bytes.split(",")]
        lengths, total = [], 0
        while total + sizes[len(lengths) % len(sizes)] <= args.nbytes:
            lengths.append(sizes[len(lengths) % len(sizes)])
            total += lengths[-1]
    else:
        lengths = layer_segments(args.layer)
    nbytes = sum(lengths)
    rng = np.random.default_rng(args.seed)
    host = np.frombuffer(rng.bytes(nbytes), dtype=np.uint8)
    dev = cp.asarray(host)
    name = cp.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    crc = gpu_crc.GpuCrc(0)
    print(header_line("bench_crc_gpu"), file=report)
    print(f"# GPU {name}; {len(lengths)} segments, {nbytes / 1e6:.1f} MB "
          f"({args.segment_bytes or args.layer}); {args.repeats} runs after {args.warmup} warm-up", file=report)
    print(f"{'layout':8} {'crc GB/s':>9} {'spread%':>8} {'latency ms':>11} {'d2d GB/s':>9} {'vs d2d':>7} "
          f"{'of HBM':>7}", file=report)
    layouts = {}
    for layout in ("aligned", "odd"):
        spans = spans_of(lengths, layout == "odd", np.random.default_rng(args.seed + 1))
        segments = verify(crc, cp, dev, host, spans)
        r = layouts[layout] = time_layout(crc, cp, dev, segments, nbytes, args.repeats, args.warmup)
        print(f"{layout:8} {r['crc']['gbps']:9.1f} {r['crc']['spread_pct']:8.1f} "
              f"{r['latency']['median_s'] * 1e3:11.3f} {r['d2d']['gbps']:9.1f} {r['vs_d2d']:7.2f} "
              f"{r['of_hbm']:7.2f}", file=report)
    out = {"gpu": name, "layer": None if args.segment_bytes else args.layer, "segment_bytes": args.segment_bytes,
           "bytes": nbytes, "segments": len(lengths), "piece_bytes": gpu_crc.PIECE_BYTES,
           "layouts": layouts, "crc_gbps": layouts["aligned"]["crc"]["gbps"],
           "d2d_gbps": layouts["aligned"]["d2d"]["gbps"], "of_hbm": layouts["aligned"]["of_hbm"]}
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
