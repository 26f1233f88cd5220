#!/usr/bin/env python3
"""Decode throughput: the CPU decoder against O_DIRECT storage, the GPU kernel against a D2D copy.

    python bench/bench_decode.py                                  # Llama-7B + 70B shapes, 50/60/70 %
    python bench/bench_decode.py --shapes llama-7b --sparsity 0.5 --json
    python bench/bench_decode.py --shapes 4096x4096,1000x33 --repeats 3 --storage-bytes 64MiB
    python bench/bench_decode.py --dtype BF16 --codecs raw,expdict   # format v1 and v2 rows
    python bench/bench_decode.py --dtype BF16 --sparsity 0,0.5 --codecs raw,expdict,exphuff  # + v3
    git show REV:cuda/endor_decode.cu > /tmp/old.cu
    python bench/bench_decode.py --dtype BF16 --compare-source /tmp/old.cu   # this kernel vs REV's

Inputs: weights as transformers initialises them (N(0, 0.02)) in ``--dtype``, the smallest
``sparsity`` of each 16 M-element chunk zeroed (magnitude pruning), encoded with each codec of
``--codecs``: ``raw`` (format v1: the values as they are), ``expdict`` (format v2: residuals,
exponent-dictionary codes, escapes; index width chosen as the packer does) and ``exphuff`` (format
v3: residuals and Huffman-coded exponents; a tensor with no zeros, ``--sparsity 0``, is stored
dense, without bitmap or tile offsets, as the packer stores unpruned weights).

CPU: dense output bytes per second of ``endor_gds.decode.cpu.CpuDecoder`` (inputs warm in RAM),
and the ratio to the sequential O_DIRECT read bandwidth of a temporary file of ``--storage-bytes``
measured in the same run (``endor_gds.read`` posix-direct reader, page cache evicted before every
read). Target (docs/design): ``cpu_ratio_to_storage >= 3``, so decoding never outpaces the disk.
A smaller file is read faster in dense terms, so each codec also gets its *headroom*: decode rate
over the dense rate at which storage delivers that codec's file (storage GB/s x dense bytes /
stored bytes); above 1, decoding keeps up with the disk.

GPU (when CuPy sees one): bytes read + written per second by one kernel launch (every stored
segment in, dense tensor out), and the ratio to a device-to-device copy that moves the same
number of bytes (a cudaMemcpy of half of them: each byte is read once and written once), L2 flushed
before every timed launch. Each GPU output is compared with the CPU decoder's before it is timed.
Target: ``gpu_ratio_to_d2d >= 0.75``. ``--compare-source OLD.cu`` also builds that version of the
kernel file and times it in the same runs, interleaved with the packaged kernel and the copy:
``speedup_vs_compare`` per case, ``gpu_speedup_vs_compare`` per codec (a kernel change proven
against its predecessor in one process).

CPU fused product (``--fused-rows 1,4,8``, default 1: a decode step; 0 skips it; every codec,
a dense exphuff tensor too): ``y = x · Wᵀ``
for M rows of x straight from bitmap + values (``endor_gds.decode.fused``), as GB/s of *stored*
bytes in, beside torch's product on the dense weight (dense bytes per second) and the path the
fused product replaces, decode + that product, in the same run: ``speedup`` = (decode + dense
product time) / fused time, per M (where it drops below 1 is the runtime's ``fused_max_rows``).
A weight larger than the caches streams from RAM in all three, as in the runtime.

Aggregates (``cpu_gbps``, ``gpu_gbps``, ``d2d_gbps``) are total bytes over the sum of the per-case
median times, i.e. the rate of decoding one of each case; the top-level ones are the first codec's,
``codecs`` has each codec's. ``--json`` prints the human-readable report on stderr and one JSON
object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from endor_gds.codec import exphuff
from endor_gds.codec.bitmap import DTYPES, encode_bitmap
from endor_gds.codec.expdict import LAYOUTS, best_expdict, encode_values, exponent_histogram
from endor_gds.decode import gpu as kernels
from endor_gds.decode.cpu import CpuDecoder
from endor_gds.decode.fused import MAX_ROWS, FusedWeight
from endor_gds.defaults import parse_bytes
from endor_gds.read.buffers import aligned_empty
from endor_gds.read.pagecache import evict_page_cache
from endor_gds.read.readers import open_reader

# Weight shapes (out_features x in_features) of one decoder layer's linear modules.
SHAPES = {
    "llama-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],  # q/k/v/o, gate/up, down
    "llama-70b": [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)],  # q/o, k/v, gate/up, down
}
_GEN_CHUNK = 1 << 24  # elements encoded at a time while generating inputs (bounds peak memory)
TARGET_CPU = 3.0
TARGET_GPU = 0.75


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part == "all":
            out += SHAPES["llama-7b"] + SHAPES["llama-70b"]
        elif part in SHAPES:
            out += SHAPES[part]
        else:
            try:
                rows, cols = (int(x) for x in part.split("x"))
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"bad shape {part!r}: use ROWSxCOLS or one of {', '.join(SHAPES)}, all") from None
            if rows < 1 or cols < 1:
                raise argparse.ArgumentTypeError(f"bad shape {part!r}: sizes must be >= 1")
            out.append((rows, cols))
    return list(dict.fromkeys(out))


def weight_bits(rng, m: int, sparsity: float, dtype: str) -> np.ndarray:
    """``m`` N(0, 0.02) weights as ``dtype`` bit patterns, the smallest ``sparsity`` zeroed."""
    w = rng.standard_normal(m, dtype=np.float32) * np.float32(0.02)
    k = int(m * sparsity)
    if k:
        w[np.argpartition(np.abs(w), k - 1)[:k]] = 0
    if dtype == "F32":
        return w.view("<u4")
    if dtype == "F16":
        return w.astype(np.float16).view("<u2")
    b = w.view(np.uint32)  # bf16: round to nearest even, as torch casts
    return ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype("<u2")


def make_encoded(rng, n: int, sparsity: float, dtype: str):
    """Weights of ``dtype`` (see weight_bits), encoded as bitmap, values, tile offsets (format v1).

    Encoded in chunks of whole tiles and stitched together, so a 235 M-element matrix never holds
    more than one chunk's temporaries.
    """
    bitmaps, values, offsets, base = [], [], [np.zeros(1, "<u4")], 0
    for start in range(0, n, _GEN_CHUNK):
        enc = encode_bitmap(weight_bits(rng, min(_GEN_CHUNK, n - start), sparsity, dtype))
        bitmaps.append(enc.bitmap)
        values.append(enc.values)
        offsets.append(enc.tile_offsets[1:] + np.uint32(base))
        base += enc.nnz
    return np.concatenate(bitmaps), np.concatenate(values), np.concatenate(offsets)


def codec_values(codec: str, values: np.ndarray, offsets: np.ndarray, n: int, dtype: str):
    """The values argument of the decoders for ``codec``: the array (raw), expdict Streams or
    exphuff HuffStreams (tiles as ``offsets`` says: the bitmap's, or a dense tensor's)."""
    if codec == "raw":
        return values
    layout = LAYOUTS[dtype]
    if codec == "exphuff":
        params = exphuff.best_exphuff(exponent_histogram(values, layout), layout)
        return exphuff.encode_values(values, offsets, params)
    params, _ = best_expdict(exponent_histogram(values, layout), n, layout)
    return encode_values(values, offsets, params)


def codec_inputs(codec: str, bitmap, values, offsets, n: int, dtype: str) -> tuple:
    """(bitmap, values, tile offsets) of the decoders for ``codec``. Exphuff stores a tensor with
    no zeros dense: every element a value, no bitmap and no tile offsets (None, as the file has)."""
    if codec == "exphuff" and values.size == n:
        return None, codec_values(codec, values, exphuff.dense_tile_offsets(n), n, dtype), None
    return bitmap, codec_values(codec, values, offsets, n, dtype), offsets


def stored_bytes(bitmap, values, offsets) -> int:
    """Bytes of the segments (unpadded) the decoders read (a dense exphuff tensor: its streams)."""
    index = 0 if bitmap is None else int(bitmap.nbytes + offsets.nbytes)
    if isinstance(values, np.ndarray):
        return index + int(values.nbytes)
    return index + sum(int(a.nbytes) for a in values.segments().values())


def stats(seconds: list[float], nbytes: int) -> dict:
    med = float(np.median(seconds))
    return {
        "median_s": med,
        "min_s": float(min(seconds)),
        "max_s": float(max(seconds)),
        "gbps": nbytes / med / 1e9,
        "gbps_min": nbytes / max(seconds) / 1e9,
        "gbps_max": nbytes / min(seconds) / 1e9,
        "spread_pct": 100.0 * (max(seconds) - min(seconds)) / med,
        "runs": len(seconds),
    }


def measure_storage(directory: str, nbytes: int, repeats: int, warmup: int, log) -> dict:
    """Sequential O_DIRECT read of a fresh temporary file, page cache evicted before every read."""
    nbytes = max(4096, -(-nbytes // 4096) * 4096)
    fd, path = tempfile.mkstemp(prefix="endor-bench-decode-", suffix=".bin", dir=directory)
    try:
        rng = np.random.default_rng(7)
        block = 16 << 20
        with os.fdopen(fd, "wb") as f:
            for start in range(0, nbytes, block):  # incompressible, not deduplicable
                f.write(rng.integers(0, 256, min(block, nbytes - start), dtype=np.uint8).tobytes())
            f.flush()
            os.fsync(f.fileno())
        buf = aligned_empty(nbytes)
        times, mode = [], None
        for i in range(warmup + repeats):
            evict_page_cache(path)
            with open_reader(path, mode="posix-direct") as reader:
                mode = reader.mode
                t0 = time.perf_counter()
                reader.read((0, nbytes), buf)
                dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
        out = stats(times, nbytes)
        out.update(mode=mode, bytes=nbytes, path_dir=os.path.abspath(directory),
                   cold=mode == "posix-direct")
        if mode != "posix-direct":
            log(f"WARNING: {directory} refuses O_DIRECT; storage figure is {mode} (page cache), "
                f"not a cold read")
        return out
    finally:
        os.unlink(path)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def gpu_item(cp, bitmap, values, offsets, out):
    """A GpuItem over device copies of the inputs (raw values, expdict or exphuff streams; no
    bitmap and tile offsets for a dense exphuff tensor) and the device array ``out``; returns it
    and the copies (which must outlive its launches)."""
    b, o = (None, None) if bitmap is None else (cp.asarray(bitmap), cp.asarray(offsets))
    if isinstance(values, np.ndarray):
        v = cp.asarray(values)
        return kernels.GpuItem.from_arrays(b, v, o, out, label="bench"), (b, v, o)
    # the codec's streams; a tensor without escapes has empty escape arrays (pointer 0, never read)
    v = {k: cp.asarray(a) for k, a in values.segments().items()}
    codec = {"exphuff": values.params} if isinstance(values, exphuff.HuffStreams) else {"expdict": values.params}
    return kernels.GpuItem.from_arrays(b, v, o, out, label="bench", **codec), (b, v, o)


def run_gpu_case(cp, decoders, stream, flush, bitmap, values, offsets, n, itemsize, cpu_out,
                 repeats: int, warmup: int) -> dict:
    """Time one launch (error-word reset + kernel + 8-byte error copy) of each decoder in
    ``decoders`` (``kernel``, and ``compare`` with --compare-source) and a D2D copy of the same
    traffic, interleaved run by run, each after an L2 flush. Every decoder's output is checked
    against the CPU decoder's first."""
    out = cp.empty(n, dtype=cpu_out.dtype)
    item, _keep = gpu_item(cp, bitmap, values, offsets, out)
    tables = {}
    for name, decoder in decoders.items():
        tables[name] = table = decoder.make_table([item])
        out.view(cp.uint8).fill(0xA5)
        decoder.launch(table, stream)
        decoder.check(table)
        if not np.array_equal(cp.asnumpy(out), cpu_out):
            raise SystemExit(f"GPU decode ({name}) differs from the CPU decoder: refusing to time a "
                             f"wrong kernel")
    traffic = stored_bytes(bitmap, values, offsets) + out.nbytes  # bytes read + written
    half = traffic // 2
    src, dst = cp.empty(half, cp.uint8), cp.empty(half, cp.uint8)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    runs = {name: (lambda d=decoders[name], t=tables[name]: d.launch(t, stream)) for name in decoders}
    runs["d2d"] = lambda: cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, half,
                                                      cp.cuda.runtime.memcpyDeviceToDevice, stream.ptr)
    times = {name: [] for name in runs}
    for i in range(warmup + repeats):
        for name, fn in runs.items():  # interleaved: drift in clocks or neighbours hits all alike
            with stream:
                flush.fill(i & 0xFF)  # evict the L2 (a buffer several times its size)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            if i >= warmup:
                times[name].append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    for name, decoder in decoders.items():
        decoder.check(tables[name])
    k, c = stats(times["kernel"], traffic), stats(times["d2d"], 2 * half)
    result = {"traffic_bytes": traffic, "kernel": k, "d2d": c, "ratio": k["gbps"] / c["gbps"],
              "compare": None, "speedup_vs_compare": None}
    if "compare" in decoders:
        result["compare"] = stats(times["compare"], traffic)
        result["speedup_vs_compare"] = k["gbps"] / result["compare"]["gbps"]
    return result


def run_fused_case(cpu, bitmap, values, offsets, shape, dtype: str, out, m: int, repeats: int,
                   warmup: int, decode_s: float, rng) -> dict:
    """The fused product against torch's GEMV on the decoded weight (``out``), interleaved run by
    run; the product's result is checked against the GEMV's first (fp32 sums: to 1e-2)."""
    tdtype = DTYPES[dtype].torch
    weight = FusedWeight(bitmap, values, offsets, shape, tdtype, "bench")
    dense = torch.from_numpy(out.view(np.uint8)).view(tdtype).reshape(shape)
    x = torch.from_numpy(rng.standard_normal((m, shape[1]), dtype=np.float32)).to(tdtype)
    want, got = (x @ dense.T).float(), weight(cpu, x).float()
    if not torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()) + 1e-6):
        raise SystemExit("the fused product differs from the dense GEMV: refusing to time it")
    runs = {"fused": lambda: weight(cpu, x), "gemv": lambda: x @ dense.T}
    times = {name: [] for name in runs}
    for i in range(warmup + repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    f, g = stats(times["fused"], out.nbytes), stats(times["gemv"], out.nbytes)
    return {"rows": m, "fused": f, "gemv": g, "speedup": (decode_s + g["median_s"]) / f["median_s"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=parse_shapes, default=parse_shapes("all"),
                    help="comma list of llama-7b, llama-70b, all, or ROWSxCOLS (default: all)")
    ap.add_argument("--sparsity", default="0.5,0.6,0.7",
                    help="comma list of fractions of zeros (default: 0.5,0.6,0.7)")
    ap.add_argument("--dtype", default="F16", choices=sorted(kernels.ELEM_BYTES),
                    help="element type (raw decoding moves bits: F16 and BF16 time the same)")
    ap.add_argument("--codecs", default="raw,expdict",
                    help="comma list of value codecs: raw (format v1), expdict (format v2), exphuff "
                         "(format v3; dense where --sparsity is 0)")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per case (default 7)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    ap.add_argument("--fused-rows", default="1",
                    help=f"comma list of rows of x for the CPU fused product, 1 to {MAX_ROWS} (default 1; "
                         f"0 skips it)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU decoder threads (default: option decode_threads, else all CPUs)")
    ap.add_argument("--storage-bytes", type=parse_bytes, default=parse_bytes("512MiB"),
                    help="size of the temporary file read with O_DIRECT (default 512MiB)")
    ap.add_argument("--storage-dir", default=".",
                    help="folder for that file: on the storage to compare with (default: cwd)")
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU part even if one is present")
    ap.add_argument("--compare-source", metavar="FILE.cu", default=None,
                    help="another version of cuda/endor_decode.cu (e.g. git show REV:cuda/endor_decode.cu) "
                         "to time beside the packaged kernel on the GPU: speedup column")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="report on stderr, one JSON object on stdout")
    args = ap.parse_args(argv)
    sparsities = [float(s) for s in args.sparsity.split(",") if s.strip()]
    if not sparsities or any(not 0.0 <= s <= 1.0 for s in sparsities):
        ap.error(f"--sparsity needs fractions between 0 and 1, got {args.sparsity!r}")
    try:
        fused_rows = [int(m) for m in args.fused_rows.split(",") if m.strip() and int(m) != 0]
    except ValueError:
        fused_rows = [-1]
    if any(not 1 <= m <= MAX_ROWS for m in fused_rows):
        ap.error(f"--fused-rows takes a comma list of 1 to {MAX_ROWS}, or 0, got {args.fused_rows!r}")
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    if not codecs or any(c not in ("raw", "expdict", "exphuff") for c in codecs):
        ap.error(f"--codecs takes raw, expdict and/or exphuff, got {args.codecs!r}")
    itemsize = kernels.ELEM_BYTES[args.dtype]
    compare_source = None
    if args.compare_source is not None:
        try:
            compare_source = Path(args.compare_source).read_text()
        except OSError as exc:
            ap.error(f"--compare-source: {exc}")

    report = sys.stderr if args.json else sys.stdout

    def log(msg: str = "") -> None:
        print(msg, file=report, flush=True)

    gpu_ok, gpu_name = (False, "skipped (--no-gpu)") if args.no_gpu else kernels.gpu_available()
    cpu = CpuDecoder(args.threads)
    path = cpu.simd_name
    log("endor_gds decode benchmark")
    log(f"machine : {socket.gethostname()} {platform.platform()}, {os.cpu_count()} CPUs, "
        f"{ram_gib():.1f} GiB RAM")
    log(f"CPU     : {cpu_model()}")
    log(f"GPU     : {gpu_name if gpu_ok else 'none (' + gpu_name.split(';')[0] + ')'}")
    log(f"decoder : CPU {path}, {cpu.threads} threads; GPU kernel {kernels.KERNEL_NAME}"
        f"{'' if gpu_ok else ' (not run)'}"
        f"{f', compared with {args.compare_source}' if compare_source and gpu_ok else ''}")
    log(f"cache   : storage cold (O_DIRECT, page cache evicted before each read); decode inputs "
        f"warm in RAM{'; GPU L2 flushed before each timed launch' if gpu_ok else ''}")
    log(f"runs    : dtype {args.dtype}, {args.warmup} warm-up + {args.repeats} timed per case; "
        f"median [min..max]")
    log()

    storage = measure_storage(args.storage_dir, args.storage_bytes, args.repeats, 1, log)
    log(f"storage : {storage['mode']} read of {storage['bytes'] / 2**20:.0f} MiB: "
        f"{storage['gbps']:.2f} GB/s [{storage['gbps_min']:.2f}..{storage['gbps_max']:.2f}]")
    log()

    gpu = None
    if gpu_ok:
        import cupy as cp  # noqa: PLC0415

        decoders = {"kernel": kernels.GpuDecoder(0)}
        if compare_source is not None:
            decoders["compare"] = kernels.GpuDecoder(0, source=compare_source)
        gpu = {"cp": cp, "decoders": decoders, "stream": cp.cuda.Stream(non_blocking=True)}
        l2 = cp.cuda.runtime.getDeviceProperties(0).get("l2CacheSize", 64 << 20)
        gpu["flush"] = cp.empty(max(256 << 20, 4 * l2), cp.uint8)

    hdr = (f"{'shape':>13} {'sparsity':>8} {'codec':>7} {'bits/el':>7} {'dense MB':>9} | "
           f"{'CPU GB/s':>22} {'x stor':>6} {'headroom':>8}")
    if fused_rows:
        hdr += f" | {'fused GB/s in':>13} {'GEMV GB/s':>9} vs dec+GEMV at {'/'.join(map(str, fused_rows))} rows"
    if gpu:
        hdr += f" | {'kernel GB/s':>22} {'D2D GB/s':>8} {'ratio':>5}"
        if compare_source is not None:
            hdr += f" {'compare GB/s':>12} {'speedup':>7}"
    log(hdr)
    rng = np.random.default_rng(args.seed)
    cases = []
    totals = {c: dict(cpu_bytes=0.0, cpu_time=0.0, stored=0.0, gpu_bytes=0.0, gpu_time=0.0,
                      d2d_time=0.0, compare_time=0.0, fused_time={m: 0.0 for m in fused_rows},
                      gemv_time={m: 0.0 for m in fused_rows}) for c in codecs}
    bits_dtype = np.dtype("<u2") if itemsize == 2 else np.dtype("<u4")
    for rows, cols in args.shapes:
        for sparsity in sparsities:
            n = rows * cols
            bitmap, raw_values, offsets = make_encoded(rng, n, sparsity, args.dtype)
            out = np.empty(n, dtype=bits_dtype)
            for codec in codecs:
                bm, values, offs = codec_inputs(codec, bitmap, raw_values, offsets, n, args.dtype)
                # checked and split into tasks once, as the runtime does per (layer, set)
                prepared = cpu.prepare([(bm, values, offs, out)])
                times = []
                for i in range(args.warmup + args.repeats):
                    t0 = time.perf_counter()
                    cpu.run(prepared)
                    dt = time.perf_counter() - t0
                    if i >= args.warmup:
                        times.append(dt)
                c = stats(times, out.nbytes)
                stored = stored_bytes(bm, values, offs)
                fused = {str(m): run_fused_case(cpu, bm, values, offs, (rows, cols), args.dtype, out,
                                                m, args.repeats, args.warmup, c["median_s"], rng)
                         for m in fused_rows}
                for f in fused.values():
                    f["gbps_in"] = stored / f["fused"]["median_s"] / 1e9
                # dense bytes storage delivers per second when reading this codec's segments
                need = storage["gbps"] * out.nbytes / stored
                case = {"shape": [rows, cols], "sparsity": sparsity, "dtype": args.dtype,
                        "codec": codec, "dense_bytes": out.nbytes, "nnz": int(raw_values.size),
                        "stored_bytes": stored, "bits_per_element": 8 * stored / n,
                        "expdict": values.params.manifest() if codec == "expdict" else None,
                        "exphuff": values.params.manifest() if codec == "exphuff" else None,
                        "dense_codec": bm is None,
                        "cpu": c, "cpu_ratio_to_storage": c["gbps"] / storage["gbps"],
                        "cpu_headroom": c["gbps"] / need, "fused": fused, "gpu": None}
                tot = totals[codec]
                tot["cpu_bytes"] += out.nbytes
                tot["cpu_time"] += c["median_s"]
                tot["stored"] += stored
                for m in fused_rows if fused else []:
                    tot["fused_time"][m] += fused[str(m)]["fused"]["median_s"]
                    tot["gemv_time"][m] += fused[str(m)]["gemv"]["median_s"]
                line = (f"{rows:>6}x{cols:<6} {sparsity:>8.2f} {codec:>7} {8 * stored / n:>7.3f} "
                        f"{out.nbytes / 1e6:>9.1f} | "
                        f"{c['gbps']:>6.2f} [{c['gbps_min']:>5.2f}..{c['gbps_max']:>5.2f}] "
                        f"{c['spread_pct']:>3.0f}% {case['cpu_ratio_to_storage']:>5.2f}x "
                        f"{case['cpu_headroom']:>7.2f}x")
                if fused:
                    first = fused[str(fused_rows[0])]
                    line += (f" | {first['gbps_in']:>13.2f} {first['gemv']['gbps']:>9.2f} "
                             + " ".join(f"{f['speedup']:.2f}x" for f in fused.values()))
                if gpu:
                    # a compared kernel file from before codec exphuff would decode it as raw values
                    decoders = {k: d for k, d in gpu["decoders"].items() if codec != "exphuff" or k == "kernel"
                                or "kExpHuff" in (d.source or "")}
                    g = run_gpu_case(gpu["cp"], decoders, gpu["stream"], gpu["flush"], bm,
                                     values, offs, n, itemsize, out, args.repeats, args.warmup)
                    case["gpu"] = g
                    tot["gpu_bytes"] += g["traffic_bytes"]
                    tot["gpu_time"] += g["kernel"]["median_s"]
                    tot["d2d_time"] += g["d2d"]["median_s"]
                    k = g["kernel"]
                    line += (f" | {k['gbps']:>6.1f} [{k['gbps_min']:>6.1f}..{k['gbps_max']:>6.1f}] "
                             f"{g['d2d']['gbps']:>8.1f} {g['ratio']:>5.2f}")
                    if g["compare"] is not None:
                        tot["compare_time"] += g["compare"]["median_s"]
                        line += f" {g['compare']['gbps']:>12.1f} {g['speedup_vs_compare']:>6.2f}x"
                log(line)
                cases.append(case)
                del values, prepared
            del bitmap, raw_values, offsets, out
    cpu.close()

    per_codec = {}
    for codec, tot in totals.items():
        cpu_gbps = tot["cpu_bytes"] / tot["cpu_time"] / 1e9
        per_codec[codec] = {
            "cpu_gbps": cpu_gbps,
            "cpu_ratio_to_storage": cpu_gbps / storage["gbps"],
            "bits_per_element": 8 * tot["stored"] / (tot["cpu_bytes"] / itemsize),
            "cpu_headroom": cpu_gbps / (storage["gbps"] * tot["cpu_bytes"] / tot["stored"]),
            "fused": {str(m): {"gbps_in": tot["stored"] / tot["fused_time"][m] / 1e9,
                               "gemv_gbps": tot["cpu_bytes"] / tot["gemv_time"][m] / 1e9,
                               "speedup": (tot["cpu_time"] + tot["gemv_time"][m]) / tot["fused_time"][m]}
                      for m in fused_rows if tot["fused_time"][m] > 0},
            "gpu_gbps": tot["gpu_bytes"] / tot["gpu_time"] / 1e9 if gpu else None,
            "d2d_gbps": tot["gpu_bytes"] / tot["d2d_time"] / 1e9 if gpu else None,
            "gpu_ratio_to_d2d": tot["d2d_time"] / tot["gpu_time"] if gpu else None,
            "gpu_speedup_vs_compare": (tot["compare_time"] / tot["gpu_time"]
                                       if gpu and tot["compare_time"] > 0 else None),
        }
    first = per_codec[codecs[0]]
    cpu_gbps = first["cpu_gbps"]
    result = {
        "benchmark": "decode",
        "machine": {"host": socket.gethostname(), "platform": platform.platform(),
                    "cpu": cpu_model(), "cpus": os.cpu_count(), "ram_gib": round(ram_gib(), 1)},
        "gpu": gpu_name if gpu_ok else None,
        "compare_source": args.compare_source,
        "decoder_path": cpu.simd_name,
        "threads": cpu.threads,
        "fused_rows": fused_rows,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "cache": {"storage": "cold" if storage["cold"] else storage["mode"], "decode_inputs": "warm",
                  "gpu_l2": "flushed" if gpu_ok else None},
        "storage": storage,
        "cases": cases,
        "codecs": per_codec,
        "cpu_gbps": cpu_gbps,
        "storage_gbps": storage["gbps"],
        "cpu_ratio_to_storage": first["cpu_ratio_to_storage"],
        "gpu_gbps": first["gpu_gbps"],
        "d2d_gbps": first["d2d_gbps"],
        "gpu_ratio_to_d2d": first["gpu_ratio_to_d2d"],
        "targets": {"cpu_ratio_to_storage": TARGET_CPU, "gpu_ratio_to_d2d": TARGET_GPU},
    }
    log()
    for codec, r in per_codec.items():
        log(f"CPU decoder  {codec:<7} {r['cpu_gbps']:.2f} GB/s dense output = "
            f"{r['cpu_ratio_to_storage']:.2f} x storage {storage['gbps']:.2f} GB/s (target >= "
            f"{TARGET_CPU}); {r['bits_per_element']:.2f} bits/element, headroom "
            f"{r['cpu_headroom']:.2f} x")
    for codec, r in per_codec.items():
        for m, f in r["fused"].items():
            log(f"CPU fused    {codec:<7} {m:>2} row(s) of x: {f['gbps_in']:.2f} GB/s stored bytes in; dense "
                f"product {f['gemv_gbps']:.2f} GB/s; {f['speedup']:.2f} x decode + dense product")
    for codec, r in per_codec.items():
        if gpu:
            log(f"GPU kernel   {codec:<7} {r['gpu_gbps']:.1f} GB/s read+written = "
                f"{r['gpu_ratio_to_d2d']:.2f} x D2D copy {r['d2d_gbps']:.1f} GB/s "
                f"(target >= {TARGET_GPU})"
                + (f"; {r['gpu_speedup_vs_compare']:.2f} x the compared kernel"
                   if r["gpu_speedup_vs_compare"] is not None else ""))
        else:
            log(f"GPU kernel   {codec:<7} not measured (no GPU)")
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
