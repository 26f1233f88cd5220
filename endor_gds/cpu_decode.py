"""The CPU decoder: csrc/endor_cpu.c through ctypes, tiles spread over a thread pool.

ctypes releases the GIL for each foreign call, so ``decode_threads`` threads decode disjoint tile
ranges truly in parallel. Results are bit-identical to :func:`endor_gds.format.decode_bitmap_reference`
(tested on random inputs); a bitmap that disagrees with its tile offsets is a
:class:`~endor_gds.errors.DecodeError`, never an out-of-bounds access.
"""

from __future__ import annotations

import ctypes
import importlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from . import defaults
from .errors import DecodeError, MissingDependencyError
from .format import TILE_ELEMS, WORD_BITS, num_tiles

__all__ = ["CpuDecoder", "library"]

# A task of at least this many tiles (256 Ki elements, ~40 us of work) keeps the ctypes call and
# thread hand-off overhead (a few us) negligible while still splitting one matrix across cores.
_MIN_TILES_PER_TASK = 64

_lib = None


def library() -> ctypes.CDLL:
    """The compiled decoder library (built by ``pip install``), loaded once."""
    global _lib
    if _lib is None:
        try:
            mod = importlib.import_module("endor_gds._endor_cpu")
        except ImportError as exc:
            raise MissingDependencyError(
                "the CPU decoder library endor_gds._endor_cpu is not built; reinstall with "
                "`pip install -e .` (needs a C compiler) or run `make test`"
            ) from exc
        lib = ctypes.CDLL(mod.__file__)
        p, u64 = ctypes.c_void_p, ctypes.c_uint64
        lib.endor_decode_tiles.restype = ctypes.c_int64
        lib.endor_decode_tiles.argtypes = [p, p, u64, p, p, u64, ctypes.c_uint32, u64, u64, ctypes.c_int]
        lib.endor_decode_simd.restype = ctypes.c_int
        lib.endor_decode_simd.argtypes = []
        _lib = lib
    return _lib


def _check(bitmap: np.ndarray, values: np.ndarray, tile_offsets: np.ndarray, out: np.ndarray,
           where: str) -> None:
    """All argument checks, in one place, before any pointer reaches C."""
    n = out.size
    for label, arr in (("bitmap", bitmap), ("values", values), ("tile_offsets", tile_offsets),
                       ("out", out)):
        if not arr.flags.c_contiguous:
            raise ValueError(f"{where}: {label} must be C-contiguous")
    if out.dtype.itemsize not in (2, 4):
        raise ValueError(f"{where}: elements of {out.dtype.itemsize} bytes cannot be bitmap-decoded "
                         f"(supported: 2 = fp16/bf16, 4 = fp32)")
    if values.dtype.itemsize != out.dtype.itemsize:
        raise ValueError(f"{where}: values are {values.dtype.itemsize}-byte, out is "
                         f"{out.dtype.itemsize}-byte")
    if not out.flags.writeable:
        raise ValueError(f"{where}: out is read-only")
    if bitmap.dtype.itemsize != 4 or bitmap.size != -(-n // WORD_BITS):
        raise ValueError(f"{where}: bitmap must be {-(-n // WORD_BITS)} uint32 words for n={n}, "
                         f"got {bitmap.size} of {bitmap.dtype}")
    if tile_offsets.dtype.itemsize != 4 or tile_offsets.size != num_tiles(n) + 1:
        raise ValueError(f"{where}: tile_offsets must be {num_tiles(n) + 1} uint32 for n={n}, "
                         f"got {tile_offsets.size} of {tile_offsets.dtype}")


class Prepared:
    """Checked, split decode work: C arguments per task, and the arrays they point into (kept alive)."""

    __slots__ = ("tasks", "_keep")

    def __init__(self, tasks: list, keep: list):
        self.tasks, self._keep = tasks, keep


class CpuDecoder:
    """Rebuilds dense tensors from bitmap + values + tile offsets on the CPU.

    ``decode(items)`` takes ``(bitmap, values, tile_offsets, out)`` tuples (numpy arrays: uint32,
    unsigned element bit patterns, uint32, and the flat output of ``n`` elements) and decodes all
    of them, splitting the tiles of every tensor across the pool.
    """

    def __init__(self, threads: int | None = None, *, simd: bool = True):
        threads = threads if threads is not None else defaults.get("decode_threads")
        self.threads = threads or (os.cpu_count() or 1)
        self._lib = library()
        self.simd = bool(simd and self._lib.endor_decode_simd())
        self._allow_simd = 1 if simd else 0
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="endor-decode") \
            if self.threads > 1 else None

    def __repr__(self) -> str:
        return f"<CpuDecoder threads={self.threads} simd={'ssse3' if self.simd else 'off'}>"

    def prepare(self, items: Sequence[tuple], where: Sequence[str] | None = None) -> "Prepared":
        """Check the arguments and split the work into tasks once; run it any number of times.

        The streaming pipeline prepares each (layer, buffer set) once at its first use, so a token
        pays for neither the checks nor the task list, and allocates nothing.
        """
        labels = list(where) if where is not None else [f"tensor {i}" for i in range(len(items))]
        tasks = []
        for item, label in zip(items, labels):
            _check(*item, label)
            bitmap, values, offs, out = item
            ntiles = num_tiles(out.size)
            step = max(_MIN_TILES_PER_TASK, -(-ntiles // (2 * self.threads)))
            args = (bitmap.ctypes.data, values.ctypes.data, values.size, offs.ctypes.data,
                    out.ctypes.data, out.size, out.dtype.itemsize)
            tasks += [(args, label, t0, min(ntiles, t0 + step)) for t0 in range(0, ntiles, step)]
        return Prepared(tasks, list(items))

    def _run(self, args: tuple, t0: int, t1: int) -> int:
        return self._lib.endor_decode_tiles(*args, t0, t1, self._allow_simd)

    def run(self, prepared: "Prepared") -> None:
        """Decode everything in ``prepared``; raises DecodeError naming the first bad tensor/tile."""
        tasks = prepared.tasks
        if self._pool is None or len(tasks) <= 1:
            results = [self._run(args, t0, t1) for args, _, t0, t1 in tasks]
        else:
            futures = [self._pool.submit(self._run, args, t0, t1) for args, _, t0, t1 in tasks]
            results = [f.result() for f in futures]
        for (_, label, t0, _t1), rc in zip(tasks, results):
            if rc:
                tile = rc - 1 if rc > 0 else t0
                raise DecodeError(
                    f"{label}: tile {tile} (elements {tile * TILE_ELEMS}..) disagrees with its tile "
                    f"offsets or bitmap (corrupted file? run `endor-gds verify`)"
                )

    def decode(self, items: Sequence[tuple], where: Sequence[str] | None = None) -> None:
        """``prepare`` + ``run`` in one call."""
        self.run(self.prepare(items, where))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
