"""``endor-gds profile-io PATH``: what the storage under PATH delivers to each reader mode, next to fio.

For every mode × threads × chunk size the file is read front to back the way the streaming
runtime reads a model: extents of ``--extent`` bytes, ``--depth`` of them in flight (double
buffering), each split into ``chunk`` requests over ``threads`` workers, into buffers allocated
and touched once beforehand (page-aligned host memory, pinned on GPU hosts; device memory for
the kvikio modes). The page cache is evicted before every measurement unless ``--warm``, and
``mincore`` confirms how much of the file was still resident. Each setting is measured
``--repeats`` times, interleaved with the others so background load spreads evenly, and reported
as median with min/max.

When ``fio`` is installed it reads the same bytes of the same file with the same block size and
``O_DIRECT`` in the same loop, in two shapes that match ``threads``: ``libaio`` (one stream,
``iodepth = threads``) and ``psync`` (``numjobs = threads`` threads, each reading its own
contiguous slice). The reported ratio is our best median over the best median of any fio shape.
The average size of the read requests the device completed is shown too: it is what decides
bandwidth on many virtual disks (see docs/performance.md). On GPU hosts NVML samples PCIe RX
while each measurement runs. GB/s means 10^9 bytes per second throughout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from endor_gds.benchmarks import telemetry
from endor_gds.benchmarks.fio import FIO_ENGINES, FIO_SHAPE, FioError, run_fio
from endor_gds.benchmarks.system import read_text, system_info
from endor_gds.defaults import parse_bytes
from endor_gds.errors import EndorError
from endor_gds.read.buffers import ALIGN, cuda_available, host_buffer
from endor_gds.read.pagecache import evict_page_cache, page_cache_fraction
from endor_gds.read.readers import Reader, import_kvikio, open_reader

__all__ = ["register", "main", "profile", "format_report", "plot", "prepare_file"]

TEST_FILE = "endor-profile-io.bin"
HOST_MODES = ("posix-direct", "posix-buffered")
DEVICE_MODES = ("kvikio", "gds", "kvikio-compat")
_MiB = 1 << 20
_DESCRIPTION = ("Storage bandwidth per reader mode and threads x chunk setting, cold cache, "
                "against fio's O_DIRECT read of the same file.")


class ProfileError(EndorError):
    """profile-io cannot run as asked (bad PATH, sizes or modes); the message says what to change."""


# -- small helpers ----------------------------------------------------------------------------


def _human(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n / (1 << 20):.2f} MiB" if n >= 1 << 20 else f"{n} B"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return values


def _bytes_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(parse_bytes(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    bad = [v for v in values if v < ALIGN or v % ALIGN]
    if not values or bad:
        raise argparse.ArgumentTypeError(
            f"chunk sizes must be positive multiples of {ALIGN} (O_DIRECT), got {text!r}")
    return values


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _modes(text: str) -> tuple[str, ...]:
    values = tuple(t.strip().lower() for t in text.split(",") if t.strip())
    known = HOST_MODES + DEVICE_MODES
    bad = [v for v in values if v not in known]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {', '.join(bad) or repr(text)}; "
                                         f"choose from {', '.join(known)}")
    return values


def _engines(text: str) -> tuple[str, ...]:
    values = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [v for v in values if v not in ("libaio", "psync", "io_uring")]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"fio engines are libaio, psync, io_uring; got {text!r}")
    return values


# -- the machine ------------------------------------------------------------------------------


def _disk_reads(dev: str) -> tuple[int, int] | None:
    """(read requests completed, sectors read) of block device ``dev`` from /proc/diskstats."""
    for line in read_text("/proc/diskstats").splitlines():
        f = line.split()
        if len(f) > 6 and f[2] == dev:
            return int(f[3]), int(f[5])
    return None


class _RequestSize:
    """Average size of the read requests the device completed between start and stop (KiB).

    The counters are device-wide, so other processes' reads are mixed in; on an idle disk the
    figure is what a reader's chunks became after the block layer split or merged them.
    """

    def __init__(self, dev: str):
        self.dev = dev
        self.before = _disk_reads(dev) if dev else None

    def kib(self) -> float | None:
        after = _disk_reads(self.dev) if self.before else None
        if not after or after[0] == self.before[0]:
            return None
        return (after[1] - self.before[1]) * 512 / 1024 / (after[0] - self.before[0])


# -- the test file ----------------------------------------------------------------------------


def _write_test_file(path: str, size: int, log) -> None:
    """Random (incompressible, not sparse) bytes, fsynced, so reads hit the device for real."""
    log(f"writing test file {path} ({_human(size)}) ...")
    rng = np.random.default_rng(0x5EED)
    block = 64 * _MiB
    tmp = path + ".partial"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for start in range(0, size, block):
            data = rng.bytes(min(block, size - start))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def prepare_file(path, size: int | None, log) -> tuple[str, int, bool]:
    """(file, bytes to read, created by us). A folder gets a test file of ``size`` (default 1 GiB)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        size = 1 << 30 if size is None else size
        size -= size % ALIGN
        if size < ALIGN:
            raise ProfileError(f"--size must be at least {ALIGN} bytes")
        target = os.path.join(path, TEST_FILE)
        if os.path.exists(target) and os.stat(target).st_size == size:
            log(f"reusing test file {target} ({_human(size)})")
            return target, size, False
        _write_test_file(target, size, log)
        return target, size, True
    if not os.path.isfile(path):
        raise ProfileError(f"{path} is neither a folder (for a test file) nor a file")
    have = os.stat(path).st_size
    nbytes = min(have, size) if size else have
    nbytes -= nbytes % ALIGN
    if nbytes < ALIGN:
        raise ProfileError(f"{path} holds {have} bytes; profile-io needs at least {ALIGN}")
    return path, nbytes, False


# -- measurements -----------------------------------------------------------------------------


@dataclass
class Result:
    """All runs of one setting: ``mode`` as asked, ``actual_mode`` as the reader reported it."""

    mode: str
    threads: int
    chunk_bytes: int
    actual_mode: str = ""
    seconds: list[float] = field(default_factory=list)
    gbps: list[float] = field(default_factory=list)
    resident: list[float] = field(default_factory=list)  # page-cache fraction before each run
    request_kib: list[float] = field(default_factory=list)  # average device read request
    nvml: list[dict] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.gbps) if self.gbps else 0.0

    def as_dict(self) -> dict:
        med = self.median
        out = {
            "mode": self.mode, "actual_mode": self.actual_mode or self.mode,
            "threads": self.threads, "chunk_bytes": self.chunk_bytes,
            "gbps_median": round(med, 4),
            "gbps_min": round(min(self.gbps), 4) if self.gbps else None,
            "gbps_max": round(max(self.gbps), 4) if self.gbps else None,
            "spread_pct": round(100 * (max(self.gbps) - min(self.gbps)) / med, 1) if med else None,
            "gbps_runs": [round(g, 4) for g in self.gbps],
            "seconds_runs": [round(s, 4) for s in self.seconds],
        }
        if self.resident:
            out["page_cache_resident_max"] = round(max(self.resident), 4)
        if self.request_kib:
            out["request_kib_median"] = round(statistics.median(self.request_kib), 1)
        if self.nvml:
            rx = [n["pcie_rx_gbps_mean"] for n in self.nvml if "pcie_rx_gbps_mean" in n]
            out["nvml"] = self.nvml
            if rx:
                out["pcie_rx_gbps_median"] = round(statistics.median(rx), 4)
        return out


class _Buffers:
    """``depth`` destination buffers of ``extent`` bytes per memory kind, allocated and touched once."""

    def __init__(self, extent: int, depth: int):
        self.extent, self.depth = extent, depth
        self._host = None
        self._device = None

    def for_mode(self, mode: str):
        if mode in HOST_MODES:
            if self._host is None:
                self._host = [host_buffer(self.extent) for _ in range(self.depth)]
                for b in self._host:
                    b.fill(0)  # fault the pages in now, not inside the first timed read
            return self._host
        if self._device is None:
            import torch  # noqa: PLC0415 - device modes only run on GPU hosts

            self._device = [torch.zeros(self.extent, dtype=torch.uint8, device="cuda")
                            for _ in range(self.depth)]
        return self._device


def open_for(path: str, mode: str, threads: int, chunk: int) -> Reader:
    """Open a reader for ``mode``; a refused O_DIRECT shows up as ``actual_mode``, not a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return open_reader(path, mode=mode, threads=threads, chunk_bytes=chunk)


def read_file(reader: Reader, nbytes: int, buffers: list, depth: int) -> float:
    """Read ``nbytes`` from offset 0 as consecutive extents, ``depth`` in flight; seconds taken."""
    extent = len(buffers[0])
    pending: deque = deque()
    t0 = time.perf_counter()
    for i, offset in enumerate(range(0, nbytes, extent)):
        if len(pending) == depth:
            pending.popleft().get()
        pending.append(reader.pread((offset, min(extent, nbytes - offset)), buffers[i % depth]))
    while pending:
        pending.popleft().get()
    return time.perf_counter() - t0


def measure(path: str, nbytes: int, mode: str, threads: int, chunk: int, buffers: _Buffers,
            result: Result, *, warm: bool, nvml: bool, dev: str = "") -> float:
    """One cold (or warm) read of the file, recorded into ``result``; returns GB/s."""
    if not warm:
        evict_page_cache(path)
    resident = page_cache_fraction(path)
    with open_for(path, mode, threads, chunk) as reader:
        dest = buffers.for_mode(mode)
        requests = _RequestSize(dev)
        sampler = telemetry.Sampler().start() if nvml else None
        try:
            seconds = read_file(reader, nbytes, dest, buffers.depth)
        finally:
            if sampler is not None:
                sampler.stop()
        result.actual_mode = reader.mode
    result.seconds.append(seconds)
    result.gbps.append(nbytes / seconds / 1e9)
    if resident is not None:
        result.resident.append(resident)
    if requests.kib() is not None:
        result.request_kib.append(requests.kib())
    if sampler is not None:
        result.nvml.append(sampler.summary())
    return result.gbps[-1]


def _default_modes() -> tuple[str, ...]:
    if cuda_available():
        try:
            import_kvikio()
            return HOST_MODES + ("kvikio",)
        except EndorError:
            pass
    return HOST_MODES


def profile(path, *, size: int | None = None, threads=(1, 2, 4, 8),
            chunks=(1 * _MiB, 4 * _MiB, 16 * _MiB), modes=None, warm: bool = False,
            repeats: int = 3, extent: int = 256 * _MiB, depth: int = 2, use_fio: bool = True,
            fio_engines=FIO_ENGINES, keep: bool = False, log=None, on_header=None) -> dict:
    """Run the whole profile and return the report (the ``--json`` document).

    ``log(text)`` receives progress lines; ``on_header(header)`` the header dict once the
    machine and modes are known, before the first measurement.
    """
    log = log or (lambda msg: None)
    on_header = on_header or (lambda header: None)
    modes = tuple(modes or _default_modes())
    if repeats < 1 or depth < 1:
        raise ProfileError(f"--repeats and --depth must be >= 1, got {repeats} and {depth}")
    if extent < ALIGN or extent % ALIGN:
        raise ProfileError(f"--extent must be a positive multiple of {ALIGN}, got {extent}")
    if any(m in DEVICE_MODES for m in modes) and not cuda_available():
        raise ProfileError(f"modes {', '.join(m for m in modes if m in DEVICE_MODES)} read into GPU "
                           f"memory and this machine has no CUDA GPU; use --modes "
                           f"{','.join(HOST_MODES)}")
    file, nbytes, created = prepare_file(path, size, log)
    try:
        return _profile_file(file, nbytes, threads, chunks, modes, warm, repeats,
                             min(extent, nbytes), depth, use_fio, tuple(fio_engines), log,
                             on_header)
    finally:
        if created and not keep:
            os.unlink(file)


def _profile_file(file, nbytes, threads, chunks, modes, warm, repeats, extent, depth, use_fio,
                  fio_engines, log, on_header) -> dict:
    fio = shutil.which("fio") if use_fio else None
    system = system_info(file, fio)
    dev = os.path.basename(system["file_system"].get("source", ""))
    nvml = telemetry.probe().available
    buffers = _Buffers(extent, depth)

    # Which mode each request really gets (and why), and an untimed pass per mode so one-time
    # costs (thread start-up, cuFile driver open, first-touch of buffers) stay out of the table.
    resolved = {}
    for mode in modes:
        with open_for(file, mode, max(threads), max(chunks)) as reader:
            resolved[mode] = {"mode": reader.mode, "reason": reader.mode_reason}
            read_file(reader, min(nbytes, extent * depth), buffers.for_mode(mode), depth)
    header = {"system": system, "file": file, "bytes": nbytes, "modes": resolved,
              "cache": "warm" if warm else "cold", "extent_bytes": extent, "depth": depth}
    on_header(header)

    results = {(m, t, c): Result(m, t, c) for c in chunks for t in threads for m in modes}
    fio_results = {(e, t, c): Result(f"fio-{e}", t, c, actual_mode=FIO_SHAPE.get(e, e))
                   for c in chunks for t in threads for e in fio_engines} if fio else {}
    fio_error = "" if fio or not use_fio else "fio not installed"
    for rep in range(repeats):
        for c in chunks:
            for t in threads:
                # Rotate who goes first each repeat: on shared or burst-credited storage the
                # first reader after a pause can be faster, and no side should always get that.
                order = list(modes) + ([("fio", e) for e in fio_engines] if fio and not fio_error
                                       else [])
                k = rep % len(order)
                for m in order[k:] + order[:k]:
                    if isinstance(m, tuple):
                        fio_error = fio_error or _fio_once(
                            fio, file, nbytes, t, c, m[1], warm, fio_results[(m[1], t, c)],
                            f"[{rep + 1}/{repeats}]", log, dev)
                        continue
                    gbps = measure(file, nbytes, m, t, c, buffers, results[(m, t, c)],
                                   warm=warm, nvml=nvml, dev=dev)
                    log(f"[{rep + 1}/{repeats}] {m:<14} threads={t:<3} chunk={_human(c):<8} "
                        f"{gbps:7.3f} GB/s")
    return _report(header, results, fio_results, fio, fio_engines, fio_error, repeats)


def _fio_once(fio, file, nbytes, threads, chunk, engine, warm, result: Result, tag, log,
              dev="") -> str:
    """One fio run into ``result``; returns an error text (fio is then dropped) or ''."""
    if not warm:
        evict_page_cache(file)
    requests = _RequestSize(dev)
    try:
        gbps = run_fio(fio, file, nbytes, chunk, threads, engine)
    except (FioError, ProfileError, OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        log(f"fio: {exc}; continuing without it")
        return str(exc)
    result.gbps.append(gbps)
    result.seconds.append(nbytes / gbps / 1e9)
    if requests.kib() is not None:
        result.request_kib.append(requests.kib())
    log(f"{tag} {'fio-' + engine:<14} threads={threads:<3} bs={_human(chunk):<11} {gbps:7.3f} GB/s")
    return ""


def _report(header, results, fio_results, fio, fio_engines, fio_error, repeats) -> dict:
    measurements = [r.as_dict() for r in results.values()]
    fio_runs = [r.as_dict() for r in fio_results.values() if r.gbps]
    fio_best = max(fio_runs, key=lambda r: r["gbps_median"]) if fio_runs and not fio_error else None
    best: dict = {}
    for m in measurements:
        cur = best.get(m["mode"])
        if cur is None or m["gbps_median"] > cur["gbps_median"]:
            best[m["mode"]] = m
    fio_gbps = fio_best["gbps_median"] if fio_best else None
    ratios = {mode: round(b["gbps_median"] / fio_gbps, 4) for mode, b in best.items()} \
        if fio_gbps else {}
    return {
        "tool": "endor-gds profile-io",
        **header,
        "repeats": repeats,
        "measurements": measurements,
        "best": {mode: {k: b[k] for k in ("threads", "chunk_bytes", "gbps_median", "actual_mode")}
                 for mode, b in best.items()},
        "fio": {"available": bool(fio), "version": header["system"]["fio"],
                "engines": {e: FIO_SHAPE.get(e, e) for e in fio_engines}, "direct": True,
                "error": fio_error or None, "runs": fio_runs,
                "best": {k: fio_best[k] for k in ("mode", "threads", "chunk_bytes", "gbps_median")}
                if fio_best else None},
        "fio_gbps": fio_gbps,
        "best_ratio_to_fio": max(ratios.values()) if ratios else None,
        "ratio_to_fio_by_mode": ratios,
    }


# -- output -----------------------------------------------------------------------------------


_CACHE = {"warm": "WARM cache (not evicted)",
          "cold": "COLD cache: evicted before every measurement (posix_fadvise DONTNEED)"}


def format_header(h: dict) -> str:
    s, fs = h["system"], h["system"]["file_system"]
    dev = ", ".join(x for x in (fs.get("source", ""), fs.get("driver", ""), fs.get("model", ""),
                                f"rotational={fs['rotational']}" if fs.get("rotational") else "",
                                f"scheduler={fs['scheduler']}" if fs.get("scheduler") else "")
                    if x)
    lines = [
        f"endor-gds profile-io {s['endor_gds']}",
        f"machine     {s['machine']}",
        f"cpu         {s['cpu']}, {s['memory_bytes'] / (1 << 30):.1f} GiB RAM",
        f"gpu         {s['gpu']}",
        f"file        {h['file']} ({_human(h['bytes'])} read per measurement)",
        f"file system {fs.get('fstype', '?')} on {dev or '?'} (mounted at {fs.get('mount', '?')})",
        "modes       " + "; ".join(f"{m} -> {r['mode']} ({r['reason']})" for m, r in h["modes"].items()),
        f"access      extents of {_human(h['extent_bytes'])}, {h['depth']} in flight; "
        f"{_CACHE[h['cache']]}",
        f"fio         {s['fio'] or 'not installed: no baseline'}",
    ]
    return "\n".join(lines)


def format_report(rep: dict) -> str:
    fio_by: dict = {}  # best fio shape per (threads, chunk) cell
    for r in rep["fio"]["runs"]:
        key = (r["threads"], r["chunk_bytes"])
        if key not in fio_by or r["gbps_median"] > fio_by[key]["gbps_median"]:
            fio_by[key] = r
    nvml = any("pcie_rx_gbps_median" in m for m in rep["measurements"])
    head = (f"{'mode':<15} {'threads':>7} {'chunk':>8} {'GB/s':>7} {'min':>7} {'max':>7} "
            f"{'spread':>7} {'req KiB':>7} {'fio GB/s':>9} {'ratio':>6}"
            + (f" {'PCIe RX':>8}" if nvml else ""))

    def req(r) -> str:
        return f"{r['request_kib_median']:>7.0f}" if "request_kib_median" in r else f"{'-':>7}"

    rows = [head, "-" * len(head)]
    for m in sorted(rep["measurements"], key=lambda m: (m["mode"], m["chunk_bytes"], m["threads"])):
        f = fio_by.get((m["threads"], m["chunk_bytes"]))
        mode = m["mode"] if m["actual_mode"] == m["mode"] else f"{m['mode']}->{m['actual_mode']}"
        row = (f"{mode:<15} {m['threads']:>7} {_human(m['chunk_bytes']):>8} "
               f"{m['gbps_median']:>7.3f} {m['gbps_min']:>7.3f} {m['gbps_max']:>7.3f} "
               f"{m['spread_pct']:>6.1f}% {req(m)} "
               + (f"{f['gbps_median']:>9.3f} {m['gbps_median'] / f['gbps_median']:>6.2f}"
                  if f and f["gbps_median"] else f"{'-':>9} {'-':>6}"))
        if nvml:
            row += f" {m.get('pcie_rx_gbps_median', 0.0):>8.3f}"
        rows.append(row)
    for r in sorted(rep["fio"]["runs"], key=lambda r: (r["mode"], r["chunk_bytes"], r["threads"])):
        rows.append(f"{r['mode']:<15} {r['threads']:>7} {_human(r['chunk_bytes']):>8} "
                    f"{r['gbps_median']:>7.3f} {r['gbps_min']:>7.3f} {r['gbps_max']:>7.3f} "
                    f"{r['spread_pct']:>6.1f}% {req(r)}")
    rows.append("")
    for mode, b in rep["best"].items():
        ratio = rep["ratio_to_fio_by_mode"].get(mode)
        rows.append(f"best {mode:<15} {b['gbps_median']:.3f} GB/s at threads={b['threads']}, "
                    f"chunk={_human(b['chunk_bytes'])}"
                    + (f"  = {ratio:.2f} x fio best" if ratio is not None else ""))
    if rep["fio_gbps"] is not None:
        fb = rep["fio"]["best"]
        rows.append(f"best fio (O_DIRECT)  {rep['fio_gbps']:.3f} GB/s: {fb['mode']}, "
                    f"threads={fb['threads']}, "
                    f"bs={_human(fb['chunk_bytes'])}")
        rows.append(f"our best / fio best  {rep['best_ratio_to_fio']:.2f}")
    else:
        rows.append(f"fio baseline: none ({rep['fio']['error'] or 'not run'})")
    resident = [m["page_cache_resident_max"] for m in rep["measurements"]
                if "page_cache_resident_max" in m]
    if resident:
        rows.append(f"page cache before each run: at most {100 * max(resident):.1f}% of the file "
                    f"resident (mincore)")
    rows.append(f"medians of {rep['repeats']} runs; spread = (max - min) / median; req KiB = "
                f"average read request the device completed (device-wide counters)")
    return "\n".join(rows)


def plot(rep: dict, out_png: str) -> None:
    """GB/s against threads, one panel per mode (and fio), one line per chunk size."""
    import matplotlib  # noqa: PLC0415 - optional (the "bench" extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - optional (the bench extra), only for --plot

    panels = {}
    for m in rep["measurements"]:
        panels.setdefault(m["mode"], []).append(m)
    for r in rep["fio"]["runs"]:
        engine = r["mode"][len("fio-"):]
        panels.setdefault(f"{r['mode']} ({rep['fio']['engines'].get(engine, engine)})", []).append(r)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=True,
                             squeeze=False)
    top = max([r["gbps_max"] or 0 for rows in panels.values() for r in rows] + [0.1])
    for ax, (name, rows) in zip(axes[0], panels.items()):
        for chunk in sorted({r["chunk_bytes"] for r in rows}):
            pts = sorted((r for r in rows if r["chunk_bytes"] == chunk), key=lambda r: r["threads"])
            x = [r["threads"] for r in pts]
            y = [r["gbps_median"] for r in pts]
            err = [[r["gbps_median"] - r["gbps_min"] for r in pts],
                   [r["gbps_max"] - r["gbps_median"] for r in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=_human(chunk))
        if rep["fio_gbps"]:
            ax.axhline(rep["fio_gbps"], color="grey", linestyle="--", linewidth=1,
                       label=f"fio best {rep['fio_gbps']:.2f}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["threads"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_ylim(0, top * 1.1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("threads")
        ax.grid(alpha=0.3)
        ax.legend(title="chunk", fontsize=8, title_fontsize=8)
    axes[0][0].set_ylabel("GB/s (median, min-max)")
    fs = rep["system"]["file_system"]
    fig.suptitle(f"profile-io: {rep['system']['cpu']}; {fs.get('fstype', '?')} on "
                 f"{fs.get('source', '?')}; {_human(rep['bytes'])}, {rep['cache']} cache, "
                 f"{rep['repeats']} runs", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# -- command line -----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a folder (a test file is written there) or an existing file")
    p.add_argument("--size", type=_size, default=None,
                   help="bytes to read (default: 1GiB test file in a folder, whole file otherwise)")
    p.add_argument("--threads", type=_int_list, default=(1, 2, 4, 8),
                   help="reader threads = requests in flight (default 1,2,4,8; fio iodepth)")
    p.add_argument("--chunk", type=_bytes_list, default=(1 * _MiB, 4 * _MiB, 16 * _MiB),
                   help="bytes per request (default 1MiB,4MiB,16MiB; fio bs)")
    p.add_argument("--modes", type=_modes, default=None,
                   help=f"comma list of {', '.join(HOST_MODES + DEVICE_MODES)} "
                        f"(default: posix modes, plus kvikio on GPU hosts)")
    p.add_argument("--warm", action="store_true", help="do not evict the page cache first")
    p.add_argument("--repeats", type=int, default=3, help="runs per setting (median, min, max)")
    p.add_argument("--extent", type=_size, default=256 * _MiB,
                   help="bytes per read call, like one layer (default 256MiB)")
    p.add_argument("--depth", type=int, default=2, help="extents in flight (default 2)")
    p.add_argument("--no-fio", action="store_true", help="skip the fio baseline")
    p.add_argument("--fio-engines", type=_engines, default=FIO_ENGINES,
                   help="fio shapes to run: libaio (iodepth = threads), psync (numjobs = "
                        "threads), io_uring (default libaio,psync)")
    p.add_argument("--keep", action="store_true", help="keep the test file written in a folder")
    p.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="draw GB/s against threads x chunk per mode")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")


def run(args) -> int:
    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    rep = profile(args.path, size=args.size, threads=args.threads, chunks=args.chunk,
                  modes=args.modes, warm=args.warm, repeats=args.repeats, extent=args.extent,
                  depth=args.depth, use_fio=not args.no_fio, fio_engines=args.fio_engines,
                  keep=args.keep, log=log,
                  on_header=lambda h: print(format_header(h) + "\n", flush=True))
    print(format_report(rep))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rep, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(rep, args.plot)
        print(f"wrote {args.plot}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``profile-io`` to the ``endor-gds`` command line."""
    p = subparsers.add_parser("profile-io", help="storage bandwidth per reader mode, against fio",
                              description=_DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv=None) -> int:
    """Standalone entry point (``python -m endor_gds.benchmarks.profile_io``, ``bench/bench_io.py``)."""
    p = argparse.ArgumentParser(prog="profile-io", description=_DESCRIPTION)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (EndorError, OSError) as exc:
        print(f"profile-io: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
