"""The CPU decoder: csrc/endor_cpu.c through ctypes, tiles spread over a thread pool.

ctypes releases the GIL for each foreign call, so ``decode_threads`` threads decode disjoint tile
ranges truly in parallel. Results are bit-identical to the numpy reference
(:func:`endor_gds.codec.bitmap.decode_bitmap_reference`, after
:func:`endor_gds.codec.expdict.decode_values_reference` for codec expdict; tested on random inputs); a
bitmap, tile offset or escape table that disagrees with the rest is a
:class:`~endor_gds.errors.DecodeError`, never an out-of-bounds access.
"""

from __future__ import annotations

import ctypes
import importlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import numpy as np

from endor_gds import defaults
from endor_gds.codec.bitmap import TILE_ELEMS, WORD_BITS, num_tiles
from endor_gds.codec.expdict import Streams
from endor_gds.codec.exphuff import CHUNKS_PER_TILE, STREAM_KINDS, HuffStreams
from endor_gds.errors import DecodeError, MissingDependencyError

__all__ = ["CpuDecoder", "SIMD_FEATURES", "cpu_features", "crc32c_combine", "exphuff_args", "library"]

# Instruction-set features of the decoder (FEAT_* in csrc/endor_cpu.c), each a bit of the mask a
# call may use: ssse3 = the pshufb expand and the 4-byte expdict rebuild, pdep = BMI2 field
# spread (only where it is fast), avx2 = the 2-byte expdict rebuild, fma = the fused product's
# vector path (AVX2 + FMA + F16C, :mod:`endor_gds.decode.fused`).
SIMD_FEATURES = {"ssse3": 1, "pdep": 2, "avx2": 4, "fma": 8}

# A task of at least this many tiles (256 Ki elements, ~40 us of work) keeps the ctypes call and
# thread hand-off overhead (a few us) negligible while still splitting one matrix across cores.
_MIN_TILES_PER_TASK = 64

_lib = None


class _ExpDictArgs(ctypes.Structure):
    """``endor_expdict`` in csrc/endor_cpu.c: one expdict tensor's streams and parameters."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "bitmap", "tile_offsets", "residuals", "codes", "escape_offsets", "escape_positions",
        "escape_values", "out")] + \
        [(name, ctypes.c_uint64) for name in ("n", "nnz", "codes_nbytes", "escapes")] + \
        [(name, ctypes.c_uint32) for name in ("elem_bytes", "man_bits", "index_bits", "reserved")] + \
        [("exponents", ctypes.c_uint8 * 16)]


class _ExpHuffArgs(ctypes.Structure):
    """``endor_exphuff`` in csrc/endor_cpu.c: one exphuff tensor's streams and code lengths."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "bitmap", "tile_offsets", "residuals", "bits", "tile_bits", "chunk_bits", "out")] + \
        [(name, ctypes.c_uint64) for name in ("n", "nnz", "bits_nbytes")] + \
        [(name, ctypes.c_uint32) for name in ("elem_bytes", "man_bits", "exp_bits", "nbits")] + \
        [("lengths", ctypes.c_uint8 * 256)]


def library() -> ctypes.CDLL:
    """The compiled decoder library (built by ``pip install``), loaded once."""
    global _lib
    if _lib is None:
        try:
            mod = importlib.import_module("endor_gds.decode._endor_cpu")
        except ImportError as exc:
            raise MissingDependencyError(
                "the CPU decoder library endor_gds.decode._endor_cpu is not built; reinstall with "
                "`pip install -e .` (needs a C compiler) or run `make test`"
            ) from exc
        lib = ctypes.CDLL(mod.__file__)
        p, u64 = ctypes.c_void_p, ctypes.c_uint64
        lib.endor_decode_tiles.restype = ctypes.c_int64
        lib.endor_decode_tiles.argtypes = [p, p, u64, p, p, u64, ctypes.c_uint32, u64, u64, ctypes.c_int]
        lib.endor_decode_expdict_tiles.restype = ctypes.c_int64
        lib.endor_decode_expdict_tiles.argtypes = [ctypes.POINTER(_ExpDictArgs), u64, u64, ctypes.c_int]
        lib.endor_decode_exphuff_tiles.restype = ctypes.c_int64
        lib.endor_decode_exphuff_tiles.argtypes = [ctypes.POINTER(_ExpHuffArgs), u64, u64, ctypes.c_int]
        lib.endor_matvec_rows.restype = ctypes.c_int64
        lib.endor_matvec_rows.argtypes = [p, u64, u64, ctypes.c_int]
        lib.endor_cpu_features.restype = ctypes.c_int
        lib.endor_cpu_features.argtypes = []
        lib.endor_exphuff_tables.restype = ctypes.c_int
        lib.endor_exphuff_tables.argtypes = [ctypes.POINTER(_ExpHuffArgs), p, p]
        lib.endor_crc32c_combine.restype = ctypes.c_uint32
        lib.endor_crc32c_combine.argtypes = [ctypes.c_uint32, ctypes.c_uint32, u64]
        _lib = lib
    return _lib


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32C of ``A + B`` from ``crc1`` of A, ``crc2`` of B and B's length in bytes."""
    return library().endor_crc32c_combine(crc1, crc2, len2)


def cpu_features() -> tuple[str, ...]:
    """The SIMD_FEATURES this CPU has (and the decoder uses by default)."""
    mask = library().endor_cpu_features()
    return tuple(name for name, bit in SIMD_FEATURES.items() if mask & bit)


def _check_streams(s: Streams, n: int, itemsize: int, where: str) -> None:
    """The facts endor_decode_expdict_tiles takes for granted about an expdict tensor's streams;
    what only a decode can tell (positions, offsets against the bitmap) the C code checks."""
    for kind, arr in s.segments().items():
        if not arr.flags.c_contiguous:
            raise ValueError(f"{where}: {kind} must be C-contiguous")
    p, layout = s.params, s.params.layout
    p.check()
    if layout.itemsize != itemsize:
        raise ValueError(f"{where}: expdict values of {layout.name} ({layout.itemsize}-byte), out "
                         f"is {itemsize}-byte")
    if s.residuals.dtype.itemsize != 1 or s.codes.dtype.itemsize != 1 or \
            s.residuals.size % layout.residual_bytes:
        raise ValueError(f"{where}: residuals and codes must be bytes, residuals a multiple of "
                         f"{layout.residual_bytes}")
    need = p.stream_nbytes(s.nnz)["codes"]
    if s.codes.size < need:
        raise ValueError(f"{where}: codes holds {s.codes.size} bytes, {s.nnz} values need {need}")
    if s.escape_offsets.dtype.itemsize != 4 or s.escape_offsets.size != num_tiles(n) + 1:
        raise ValueError(f"{where}: escape_offsets must be {num_tiles(n) + 1} uint32 for n={n}")
    if s.escape_positions.dtype.itemsize != 2 or s.escape_positions.size != p.escapes or \
            s.escape_values.dtype.itemsize != itemsize or s.escape_values.size != p.escapes:
        raise ValueError(f"{where}: escape_positions (uint16) and escape_values ({itemsize}-byte) "
                         f"must hold escapes={p.escapes} entries")


def check_encoded(bitmap: np.ndarray, values, tile_offsets: np.ndarray, n: int, itemsize: int,
                  where: str) -> None:
    """The checks on one encoded tensor of ``n`` elements of ``itemsize`` bytes (raw values, codec
    expdict :class:`Streams`, or codec exphuff :class:`HuffStreams`, whose dense form has no bitmap)
    before any pointer into it reaches C: the decoder's and the fused product's, in one place."""
    if isinstance(values, HuffStreams):
        _check_huff(values, bitmap, tile_offsets, n, itemsize, where)
        if bitmap is None:
            return
    arrays = {"bitmap": bitmap, "tile_offsets": tile_offsets}
    if not isinstance(values, (Streams, HuffStreams)):  # the codecs' streams are checked above/below
        arrays["values"] = values
    for label, arr in arrays.items():
        if not arr.flags.c_contiguous:
            raise ValueError(f"{where}: {label} must be C-contiguous")
    if itemsize not in (2, 4):
        raise ValueError(f"{where}: elements of {itemsize} bytes cannot be bitmap-decoded "
                         f"(supported: 2 = fp16/bf16, 4 = fp32)")
    if isinstance(values, Streams):
        _check_streams(values, n, itemsize, where)
    elif not isinstance(values, HuffStreams) and values.dtype.itemsize != itemsize:
        raise ValueError(f"{where}: values are {values.dtype.itemsize}-byte, out is {itemsize}-byte")
    if bitmap.dtype.itemsize != 4 or bitmap.size != -(-n // WORD_BITS):
        raise ValueError(f"{where}: bitmap must be {-(-n // WORD_BITS)} uint32 words for n={n}, "
                         f"got {bitmap.size} of {bitmap.dtype}")
    if tile_offsets.dtype.itemsize != 4 or tile_offsets.size != num_tiles(n) + 1:
        raise ValueError(f"{where}: tile_offsets must be {num_tiles(n) + 1} uint32 for n={n}, "
                         f"got {tile_offsets.size} of {tile_offsets.dtype}")


def _check_huff(s: HuffStreams, bitmap, tile_offsets, n: int, itemsize: int, where: str) -> None:
    """What endor_decode_exphuff_tiles takes for granted about an exphuff tensor's streams (what
    only a decode can tell, the codes and offsets against the bitmap, the C code checks)."""
    layout = s.params.layout
    s.params.check()
    for kind in STREAM_KINDS:
        if not getattr(s, kind).flags.c_contiguous:
            raise ValueError(f"{where}: {kind} must be C-contiguous")
    if layout.itemsize != itemsize:
        raise ValueError(f"{where}: exphuff values of {layout.name} ({layout.itemsize}-byte), out is {itemsize}-byte")
    if s.residuals.dtype.itemsize != 1 or s.bits.dtype.itemsize != 1 or s.residuals.size % layout.residual_bytes:
        raise ValueError(f"{where}: residuals and bits must be bytes, residuals a multiple of {layout.residual_bytes}")
    if s.params.nbits is None or s.params.nbits > 8 * s.bits.size:
        raise ValueError(f"{where}: bits holds {s.bits.size} bytes, the code is bound to {s.params.nbits} bits")
    if s.tile_bits.dtype.itemsize != 4 or s.tile_bits.size != num_tiles(n) + 1:
        raise ValueError(f"{where}: tile_bits must be {num_tiles(n) + 1} uint32 for n={n}")
    if s.chunk_bits.dtype.itemsize != 2 or s.chunk_bits.size != (CHUNKS_PER_TILE - 1) * num_tiles(n):
        raise ValueError(f"{where}: chunk_bits must be {(CHUNKS_PER_TILE - 1) * num_tiles(n)} uint16 for n={n}")
    if bitmap is None and (tile_offsets is not None or s.nnz != n):
        raise ValueError(f"{where}: a dense exphuff tensor (no bitmap) stores all {n} elements, has "
                         f"{s.nnz} residuals, and no tile offsets")


def _check(bitmap: np.ndarray, values, tile_offsets: np.ndarray, out: np.ndarray,
           where: str) -> None:
    """All argument checks of a decode, in one place, before any pointer reaches C."""
    if not out.flags.c_contiguous:
        raise ValueError(f"{where}: out must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError(f"{where}: out is read-only")
    check_encoded(bitmap, values, tile_offsets, out.size, out.dtype.itemsize, where)


def expdict_args(bitmap, s: Streams, offs, out: int, n: int) -> _ExpDictArgs:
    """``endor_expdict`` for one tensor of ``n`` elements decoding to address ``out`` (0: none)."""
    p = s.params
    a = _ExpDictArgs(bitmap.ctypes.data, offs.ctypes.data, s.residuals.ctypes.data,
                     s.codes.ctypes.data, s.escape_offsets.ctypes.data,
                     s.escape_positions.ctypes.data, s.escape_values.ctypes.data, out,
                     n, s.nnz, s.codes.size, p.escapes, p.layout.itemsize,
                     p.layout.man_bits, p.index_bits, 0)
    a.exponents[: len(p.exponents)] = p.exponents
    return a


def exphuff_args(bitmap, s: HuffStreams, offs, out: int, n: int) -> _ExpHuffArgs:
    """``endor_exphuff`` for one tensor of ``n`` elements decoding to address ``out`` (0: none)."""
    layout = s.params.layout
    a = _ExpHuffArgs(0 if bitmap is None else bitmap.ctypes.data, 0 if offs is None else offs.ctypes.data,
                     s.residuals.ctypes.data, s.bits.ctypes.data, s.tile_bits.ctypes.data,
                     s.chunk_bits.ctypes.data, out,
                     n, s.nnz, s.bits.size, layout.itemsize, layout.man_bits, layout.exp_bits,
                     s.params.nbits)
    a.lengths[: len(s.params.lengths)] = s.params.lengths
    return a


class Prepared:
    """Checked, split decode work: C arguments per task, and the arrays they point into (kept alive)."""

    __slots__ = ("tasks", "_keep")

    def __init__(self, tasks: list, keep: list):
        self.tasks, self._keep = tasks, keep


class CpuDecoder:
    """Rebuilds dense tensors from bitmap + values + tile offsets on the CPU.

    ``decode(items)`` takes ``(bitmap, values, tile_offsets, out)`` tuples (numpy arrays: uint32,
    unsigned element bit patterns, uint32, and the flat output of ``n`` elements; for codec
    expdict ``values`` is the tensor's :class:`~endor_gds.codec.expdict.Streams`) and decodes all of
    them, splitting the tiles of every tensor across the pool.

    ``simd``: True uses every feature of :func:`cpu_features`, False none (portable C); a
    collection of SIMD_FEATURES names restricts the decoder to those (tests run each path the CPU
    can run; the results are bit-identical). A name the CPU lacks is a ValueError.
    """

    def __init__(self, threads: int | None = None, *, simd: bool | Iterable[str] = True):
        threads = threads if threads is not None else defaults.get("decode_threads")
        self.threads = threads or (os.cpu_count() or 1)
        self._lib = library()
        have = cpu_features()
        if simd is True or simd is False:
            wanted = have if simd else ()
        else:
            wanted = (simd,) if isinstance(simd, str) else tuple(simd)
            for name in wanted:
                if name not in SIMD_FEATURES:
                    raise ValueError(f"unknown SIMD feature {name!r} (known: {', '.join(SIMD_FEATURES)})")
                if name not in have:
                    raise ValueError(f"this CPU lacks SIMD feature {name!r} (it has: "
                                     f"{', '.join(have) or 'none'})")
        #: the SIMD features in use, in SIMD_FEATURES order (empty: portable C)
        self.features = tuple(name for name in SIMD_FEATURES if name in wanted)
        #: the FEAT_* bits of csrc/endor_cpu.c a call may use
        self.feature_mask = sum(SIMD_FEATURES[name] for name in self.features)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="endor-decode") \
            if self.threads > 1 else None

    def __repr__(self) -> str:
        return f"<CpuDecoder threads={self.threads} simd={self.simd_name}>"

    @property
    def simd_name(self) -> str:
        """The features in use, as ``ssse3+pdep+avx2``, or ``scalar``."""
        return "+".join(self.features) or "scalar"

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
            if isinstance(values, Streams):
                args = expdict_args(bitmap, values, offs, out.ctypes.data, out.size)
            elif isinstance(values, HuffStreams):
                args = exphuff_args(bitmap, values, offs, out.ctypes.data, out.size)
            else:
                args = (bitmap.ctypes.data, values.ctypes.data, values.size, offs.ctypes.data,
                        out.ctypes.data, out.size, out.dtype.itemsize)
            tasks += [(args, label, t0, min(ntiles, t0 + step)) for t0 in range(0, ntiles, step)]
        return Prepared(tasks, list(items))

    def _run(self, args, t0: int, t1: int) -> int:
        if isinstance(args, _ExpDictArgs):
            return self._lib.endor_decode_expdict_tiles(ctypes.byref(args), t0, t1, self.feature_mask)
        if isinstance(args, _ExpHuffArgs):
            return self._lib.endor_decode_exphuff_tiles(ctypes.byref(args), t0, t1, self.feature_mask)
        return self._lib.endor_decode_tiles(*args, t0, t1, self.feature_mask)

    def run(self, prepared: "Prepared") -> None:
        """Decode everything in ``prepared``; raises DecodeError naming the first bad tensor/tile."""
        tasks = prepared.tasks
        results = self.map(self._run, [(args, t0, t1) for args, _, t0, t1 in tasks])
        for (_, label, t0, _t1), rc in zip(tasks, results):
            if rc:
                tile = rc - 1 if rc > 0 else t0
                raise DecodeError(
                    f"{label}: tile {tile} (elements {tile * TILE_ELEMS}..) disagrees with its tile "
                    f"offsets or bitmap (corrupted file? run `endor-gds verify`)"
                )

    def map(self, fn, calls: Sequence[tuple]) -> list:
        """``[fn(*args) for args in calls]``, spread over the pool (ctypes calls drop the GIL)."""
        if self._pool is None or len(calls) <= 1:
            return [fn(*args) for args in calls]
        futures = [self._pool.submit(fn, *args) for args in calls]
        return [f.result() for f in futures]

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
