"""The fused product on the CPU: ``y = x · Wᵀ`` straight from a weight's bitmap + values.

For a few rows of ``x`` (a decode step, a small batch) decoding ``W`` to dense first costs more
than the product itself: the decoder writes the dense matrix and the matmul reads it back.
``endor_matvec_rows`` in csrc/endor_cpu.c expands each group of 8 elements in a register and
multiplies it into fp32 accumulators instead (codecs raw, expdict and exphuff, whose tiles are
rebuilt into an L1 buffer first; fp16, bf16, fp32), threads splitting the output rows. A dense
exphuff tensor (no bitmap: every element stored) is multiplied as a bitmap tensor whose bits are
all set, with one tile offset per tile. The order of additions is fixed by the shape (not the thread count)
but is not the dense matmul's: results agree with ``x @ W.T`` to fp32 rounding, not bit for bit
(tests measure torch's own error and hold this product to it).
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch

from endor_gds.codec.bitmap import TILE_ELEMS, WORD_BITS
from endor_gds.codec.expdict import Streams
from endor_gds.codec.exphuff import MAX_CODE_BITS, HuffStreams, dense_tile_offsets
from endor_gds.decode.cpu import CpuDecoder, check_encoded, expdict_args, exphuff_args, library
from endor_gds.errors import DecodeError

__all__ = ["AUTO_MAX_ROWS", "CODECS", "FusedWeight", "MAX_ROWS", "reference_matmul"]

CODECS = ("raw", "expdict", "exphuff")  # the value codecs the product reads

MAX_ROWS = 16  # rows of x one call takes (MATVEC_MAX_M: an accumulator per row per output)
# fused_max_rows="auto": up to how many rows of x the product beat decode + torch's own product
# (bench_decode, Llama-7B shapes, 50 %, 2-core Zen 5: docs/performance.md). fp16: at every row
# count up to 16 (torch's fp16 product is slow on CPUs); fp32: up to 8; bf16: at 1 row only, as
# torch's bf16 product runs natively on CPUs with AVX512-BF16 (0.3-0.9x at 2-16 rows).
AUTO_MAX_ROWS = {torch.float16: 16, torch.float32: 8, torch.bfloat16: 1}
_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # DT_* in csrc/endor_cpu.c
# A task of at least this many elements (~20 us at batch 1) keeps the ctypes call and thread
# hand-off (a few us) small, while a 2048-wide projection still splits over the cores.
_MIN_ELEMS_PER_TASK = 1 << 18


class _MatvecArgs(ctypes.Structure):
    """``endor_matvec`` in csrc/endor_cpu.c."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("bitmap", "tile_offsets", "values", "expdict", "exphuff",
                                                      "huff_table", "huff_units", "x", "y")] + \
        [(name, ctypes.c_uint64) for name in ("rows", "cols", "nnz")] + \
        [(name, ctypes.c_uint32) for name in ("m", "dtype")]


@functools.lru_cache(maxsize=16)
def _all_set(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The bitmap (every bit of n elements set, none past n) and tile offsets of a dense tensor:
    what lets the product take a dense exphuff tensor like a bitmap one (shared per shape)."""
    bitmap = np.full(-(-n // WORD_BITS), 0xFFFFFFFF, dtype=np.uint32)
    if n % WORD_BITS:
        bitmap[-1] = (1 << (n % WORD_BITS)) - 1
    for a in (bitmap, offsets := dense_tile_offsets(n).astype(np.uint32)):
        a.flags.writeable = False
    return bitmap, offsets


class FusedWeight:
    """One 2-D weight in bitmap + values (or dense exphuff) form (``shape = (out_features,
    in_features)``), checked once, ready for any number of products; keeps the arrays its pointers
    point into alive."""

    def __init__(self, bitmap: np.ndarray | None, values, tile_offsets: np.ndarray | None,
                 shape: tuple[int, int], dtype: torch.dtype, where: str = "weight"):
        if not isinstance(values, (np.ndarray, Streams, HuffStreams)):
            raise ValueError(f"{where}: the fused product takes codec raw, expdict or exphuff values, got "
                             f"{type(values).__name__}")
        if len(shape) != 2 or dtype not in _DTYPES:
            raise ValueError(f"{where}: the fused product takes 2-D fp16/bf16/fp32 weights, got "
                             f"{tuple(shape)} {dtype}")
        self.rows, self.cols = int(shape[0]), int(shape[1])
        self.dtype, self.where = dtype, where
        n = self.rows * self.cols
        check_encoded(bitmap, values, tile_offsets, n, dtype.itemsize, where)
        self._codec_args = raw = table = units = None
        if isinstance(values, Streams):
            self._codec_args = expdict_args(bitmap, values, tile_offsets, 0, n)
        elif isinstance(values, HuffStreams):
            self._codec_args = exphuff_args(bitmap, values, tile_offsets, 0, n)
            table, units = np.empty(1 << MAX_CODE_BITS, np.uint16), np.empty(1 << MAX_CODE_BITS, np.uint64)
            if library().endor_exphuff_tables(ctypes.byref(self._codec_args), table.ctypes.data,
                                              units.ctypes.data):
                raise ValueError(f"{where}: exphuff code lengths or layout the decoder does not take")
            if bitmap is None:
                bitmap, tile_offsets = _all_set(n)
        else:
            raw = values.ctypes.data
        codec_ptr = None if self._codec_args is None else ctypes.addressof(self._codec_args)
        self._base = (bitmap.ctypes.data, tile_offsets.ctypes.data, raw,
                      codec_ptr if isinstance(values, Streams) else None,
                      codec_ptr if isinstance(values, HuffStreams) else None,
                      None if table is None else table.ctypes.data,
                      None if units is None else units.ctypes.data)
        self._nnz = values.size if raw is not None else values.nnz
        self._keep = (bitmap, values, tile_offsets, table, units)
        self._ranges: dict[int, list[tuple[int, int]]] = {}  # row ranges, by thread count

    def ranges(self, threads: int) -> list[tuple[int, int]]:
        """Row ranges, one task per thread (at least ``_MIN_ELEMS_PER_TASK`` elements each): more,
        smaller tasks measured slower (0.89 against 0.72 ms for 5632 x 2048 fp16 at 2 threads)."""
        got = self._ranges.get(threads)
        if got is None:
            tasks = max(1, min(threads, self.rows * self.cols // _MIN_ELEMS_PER_TASK))
            bounds = [self.rows * k // tasks for k in range(tasks + 1)]
            got = self._ranges[threads] = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
        return got

    def __call__(self, decoder: CpuDecoder, x: torch.Tensor, bias: torch.Tensor | None = None, *,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x @ W.T (+ bias)`` for ``x`` of shape ``(..., in_features)`` with at most
        :data:`MAX_ROWS` rows, accumulated in fp32 on ``decoder``'s threads, returned in ``x``'s
        dtype (or ``out_dtype``: ``torch.float32`` gives the sums before rounding)."""
        lead = x.shape[:-1]
        if x.shape[-1] != self.cols:
            raise ValueError(f"{self.where}: x has {x.shape[-1]} features, the weight takes {self.cols}")
        if x.dtype != self.dtype:  # as F.linear: the product takes x in the weight's dtype
            raise ValueError(f"{self.where}: x is {x.dtype}, the weight {self.dtype}")
        xs = x.reshape(-1, self.cols).contiguous()  # read as it is: widened in the kernel
        m = xs.shape[0]
        if not 1 <= m <= MAX_ROWS:
            raise ValueError(f"{self.where}: the fused product takes 1 to {MAX_ROWS} rows of x, got {m}")
        y = torch.empty((m, self.rows), dtype=torch.float32)
        args = _MatvecArgs(*self._base, xs.data_ptr(), y.data_ptr(), self.rows, self.cols, self._nnz,
                           m, _DTYPES[self.dtype])
        lib, mask, ranges = library(), decoder.feature_mask, self.ranges(decoder.threads)
        results = decoder.map(lib.endor_matvec_rows, [(ctypes.byref(args), r0, r1, mask) for r0, r1 in ranges])
        for (r0, _r1), rc in zip(ranges, results):
            if rc:
                tile = rc - 1 if rc > 0 else r0 * self.cols // TILE_ELEMS
                raise DecodeError(f"{self.where}: tile {tile} (elements {tile * TILE_ELEMS}..) disagrees "
                                  f"with its tile offsets or bitmap (corrupted file? run `endor-gds verify`)")
        if bias is not None:
            y += bias
        # .to(dtype=...): with the dtype as a positional argument, tensor.to keeps ~1 byte of
        # Python memory per call in torch 2.13 (test_memory_flat_across_tokens)
        return y.to(dtype=out_dtype or x.dtype).reshape(*lead, self.rows)


def reference_matmul(x: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """What the fused product approximates, exactly: ``x @ W.T`` in float64 from the dense weight
    (the reference decoders give it bit-exactly from bitmap + values)."""
    return x.astype(np.float64) @ dense.astype(np.float64).T
