#!/usr/bin/env python3
"""What ``verify_reads=True`` costs: CRC-32C speed against read speed (issue 7).

    python bench/bench_verify.py --nbytes 1GiB --repeats 5 --dir /path/on/the/nvme

Measures, on one thread (the reader's CRC runs per segment, after its read):

1. ``crc32c`` over a buffer already in memory (GB/s);
2. sequential ``pread`` of a ``--nbytes`` file in 4 MiB requests, page cache evicted before each
   run (cold) and warm, without and with a CRC of every request;
3. ``EndorFile.read_tensor`` of a dense and of a 50 %-sparse bitmap tensor (fp16, warm cache),
   ``verify=False`` against ``verify=True``.

Prints a header (machine, CPU, file system), then one row per path: GB/s without and with the
CRC, and the cost ``1 - with/without``. Median of ``--repeats`` runs, min-max in brackets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import crc32c
import numpy as np

import endor_gds
from endor_gds.codec.bitmap import PAGE, encode_bitmap
from endor_gds.container import FORMAT_VERSION, EndorFile, Writer
from endor_gds.defaults import parse_bytes
from endor_gds.read.pagecache import evict_page_cache

CHUNK = 4 << 20


def _timed(fn, repeats: int, nbytes: int, before=None, clock=time.perf_counter) -> list[float]:
    """GB/s of each of ``repeats`` runs of ``fn`` (after one warm-up), ``before`` untimed.

    ``clock=time.thread_time`` gives GB/s per CPU-second of this thread: the speed of the code
    itself, unaffected by other processes competing for the cores (wall time is not)."""
    rates = []
    for i in range(repeats + 1):
        if before:
            before()
        t0 = clock()
        fn()
        dt = clock() - t0
        if i:
            rates.append(nbytes / dt / 1e9)
    return rates


def _fmt(rates: list[float]) -> str:
    return f"{statistics.median(rates):6.2f} [{min(rates):.2f}-{max(rates):.2f}]"


def _read_file(path: Path, nbytes: int, crc: bool) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        value, pos = 0, 0
        while pos < nbytes:
            got = os.preadv(fd, [view], pos)
            if got <= 0:
                raise OSError(f"short read at {pos}")
            if crc:
                value = crc32c.crc32c(view[:got], value=value)
            pos += got
    finally:
        os.close(fd)


def _write_endor(path: Path, rng, numel: int) -> list[str]:
    """A one-layer .endor file holding one dense and one 50 %-sparse fp16 tensor of ``numel``."""
    dense = rng.integers(1, 1 << 16, numel, dtype=np.uint16)
    sparse = dense.copy()
    sparse[rng.random(numel) < 0.5] = 0
    cols = 4096
    shape = [numel // cols, cols]
    with open(path, "wb") as f:
        w = Writer(f)
        w.begin_extent("layer.0", "layer", layer=0)
        tensors = [{"name": "dense", "shape": shape, "dtype": "F16", "encoding": "dense", "codec": "raw",
                    "nnz": int(np.count_nonzero(dense)), "extent": "layer.0",
                    "segments": [w.write_segment("data", dense).as_dict()]}]
        enc = encode_bitmap(sparse)
        tensors.append({"name": "sparse", "shape": shape, "dtype": "F16", "encoding": "bitmap",
                        "codec": "raw", "nnz": enc.nnz, "extent": "layer.0",
                        "segments": [w.write_segment(k, a).as_dict() for k, a in enc.segments().items()]})
        w.end_extent()
        w.finish({"format": "endor", "format_version": FORMAT_VERSION, "tile_elems": 4096,
                  "checksum": "crc32c", "architecture": "llama", "config": {}, "tied": {},
                  "prune": None, "tensors": tensors, "files": []})
    return ["dense", "sparse"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nbytes", default="1GiB", help="size of the file read (default 1GiB)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="folder for the scratch files (default: temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    nbytes = max(PAGE, parse_bytes(args.nbytes) // CHUNK * CHUNK or CHUNK)
    folder = Path(tempfile.mkdtemp(prefix="endor-bench-verify-", dir=args.dir))
    rng = np.random.default_rng(0)

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    fs = os.statvfs(folder)
    load = os.getloadavg()[0]
    print(f"# bench_verify: endor_gds {endor_gds.__version__}, {platform.node()}, {cpu}, "
          f"{os.cpu_count()} CPUs (load average {load:.1f} at start), "
          f"crc32c {'hardware' if crc32c.hardware_based else 'SOFTWARE'}; "
          f"scratch {folder} ({fs.f_blocks * fs.f_frsize / 1e9:.0f} GB file system); "
          f"file {nbytes / 2**20:.0f} MiB, {CHUNK >> 20} MiB requests, one thread, "
          f"median of {args.repeats} [min-max]")
    results = {}
    try:
        buf = rng.integers(0, 256, min(nbytes, 256 << 20), dtype=np.uint8)
        results["crc32c in memory"] = (_timed(lambda: crc32c.crc32c(buf), args.repeats, buf.size), None)
        results["crc32c in memory, per CPU-second"] = (
            _timed(lambda: crc32c.crc32c(buf), args.repeats, buf.size, clock=time.thread_time), None)

        path = folder / "data.bin"
        with open(path, "wb") as f:
            for _ in range(nbytes // CHUNK):
                f.write(rng.integers(0, 256, CHUNK, dtype=np.uint8).tobytes())
            f.flush()
            os.fsync(f.fileno())
        for label, before in (("pread, cold cache", lambda: evict_page_cache(path)), ("pread, warm cache", None)):
            results[label] = (_timed(lambda: _read_file(path, nbytes, False), args.repeats, nbytes, before),
                              _timed(lambda: _read_file(path, nbytes, True), args.repeats, nbytes, before))
        path.unlink()

        endor = folder / "bench.endor"
        numel = max(4096, min(nbytes // 2, 128 << 20) // 4096 * 4096)
        names = _write_endor(endor, rng, numel)
        with EndorFile(endor) as f:
            for name in names:
                out_bytes = numel * 2  # rate in dense (decoded) bytes, as the runtime sees it
                results[f"read_tensor {name} fp16, warm"] = (
                    _timed(lambda: f.read_tensor(name, verify=False), args.repeats, out_bytes),
                    _timed(lambda: f.read_tensor(name, verify=True), args.repeats, out_bytes))
        endor.unlink()
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()

    print(f"{'path':<34} {'GB/s without CRC':>22} {'GB/s with CRC':>22} {'verify_reads cost':>18}")
    for label, (off, on) in results.items():
        if on is None:
            print(f"{label:<34} {_fmt(off):>22} {'':>22} {'':>18}")
        else:
            cost = 1 - statistics.median(on) / statistics.median(off)
            print(f"{label:<34} {_fmt(off):>22} {_fmt(on):>22} {cost:>17.1%}")
    if args.json:
        args.json.write_text(json.dumps({k: {"without": a, "with": b} for k, (a, b) in results.items()},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
