"""Format v2 value codec ``expdict``: the non-zero values of a bitmap tensor, losslessly, in fewer bits.

``docs/format.md`` (section "Codec expdict") is the prose version of this module.

The exponent field of trained (or randomly initialised) weights carries little information: at
50 % magnitude pruning almost every surviving value has one of 4-8 exponents. So a value is
stored as

* its **residual** ``r = sign << M | mantissa`` (``M`` mantissa bits: bf16 7, fp16 10, fp32 23),
  whose low ``8 * residual_bytes`` bits go to the ``residuals`` stream (1, 1 and 3 bytes), and
* a **field** of ``w = index_bits + high_bits`` bits in the ``codes`` bit stream: the index of its
  exponent in the tensor's dictionary of ``2 ** index_bits`` exponents (low bits), then the
  residual bits that did not fit whole bytes (fp16: 3, the others: 0).

Every width is fixed, so value ``k`` of the tensor sits at byte ``k * residual_bytes`` and bit
``k * w``: a tile decodes on its own from its tile offsets, as in format v1. A value whose exponent
is not in the dictionary is an **escape**: its residual and field are stored as zeros and its full
bit pattern goes to ``escape_values``, with its position (value index within its tile, uint16)
in ``escape_positions``; ``escape_offsets`` (uint32, one per tile + 1) says where each tile's
escapes start, so no decoder scans the tensor to find them.

Decoders move bit patterns only (``value = sign << (8 * itemsize - 1) | exponent << M | mantissa``),
so -0.0, NaN payloads, subnormals and infinities survive exactly, as dictionary entries or as
escapes.

This module is the reference: plain numpy, written to be read. The C decoder and the CUDA kernel
are tested bit-exactly against :func:`decode_values_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from endor_gds.codec.bitmap import num_tiles, pad_to_page
from endor_gds.errors import DecodeError

__all__ = [
    "LAYOUTS",
    "MAX_INDEX_BITS",
    "FloatLayout",
    "ExpDict",
    "Streams",
    "exponent_histogram",
    "best_expdict",
    "encode_values",
    "decode_values_reference",
    "check_escapes",
]

MAX_INDEX_BITS = 4  # up to 16 exponents: one pshufb table on the CPU, 16 bytes in a GPU descriptor
STREAM_KINDS = ("residuals", "codes", "escape_offsets", "escape_positions", "escape_values")


@dataclass(frozen=True)
class FloatLayout:
    """Bit fields of a floating point type, as far as the codec needs them."""

    name: str  # safetensors dtype name
    itemsize: int
    exp_bits: int
    man_bits: int

    @property
    def residual_bits(self) -> int:  # sign + mantissa
        return self.man_bits + 1

    @property
    def residual_bytes(self) -> int:  # whole bytes of the residual in the residuals stream
        return self.residual_bits // 8

    @property
    def high_bits(self) -> int:  # residual bits left over, stored in the code field
        return self.residual_bits % 8

    @property
    def bits(self) -> np.dtype:
        return np.dtype("<u2") if self.itemsize == 2 else np.dtype("<u4")


LAYOUTS: dict[str, FloatLayout] = {
    "BF16": FloatLayout("BF16", 2, 8, 7),  # residual: 1 byte, no high bits
    "F16": FloatLayout("F16", 2, 5, 10),  # residual: 1 byte + 3 bits in the field
    "F32": FloatLayout("F32", 4, 8, 23),  # residual: 3 bytes, no high bits
}


@dataclass(frozen=True)
class ExpDict:
    """The per-tensor parameters of the codec (the manifest's ``expdict`` object)."""

    layout: FloatLayout
    index_bits: int  # b, 1..4
    exponents: tuple[int, ...]  # exactly 2**b distinct exponent values; index i -> exponents[i]
    escapes: int  # number of values stored as escapes

    @property
    def field_bits(self) -> int:
        return self.index_bits + self.layout.high_bits

    def stream_nbytes(self, nnz: int) -> dict[str, int]:
        """Bytes of the residuals and codes streams of ``nnz`` values."""
        return {"residuals": nnz * self.layout.residual_bytes, "codes": -(-nnz * self.field_bits // 8)}

    def segment_nbytes(self, n: int, nnz: int) -> dict[str, int]:
        """Unpadded bytes of the codec's segments for ``nnz`` values of an ``n``-element tensor."""
        return {
            **self.stream_nbytes(nnz),
            "escape_offsets": 4 * (num_tiles(n) + 1),
            "escape_positions": 2 * self.escapes,
            "escape_values": self.layout.itemsize * self.escapes,
        }

    def manifest(self) -> dict:
        return {"index_bits": self.index_bits, "exponents": list(self.exponents),
                "escapes": self.escapes}

    def check(self) -> None:
        """``ValueError`` unless the parameters are well formed (the file reader checks the same
        facts with messages naming the file, see layout.py)."""
        b, e = self.index_bits, self.exponents
        if not 1 <= b <= MAX_INDEX_BITS:
            raise ValueError(f"index_bits must be in [1, {MAX_INDEX_BITS}], got {b}")
        if len(e) != 1 << b or len(set(e)) != len(e) or \
                not all(0 <= x < 1 << self.layout.exp_bits for x in e):
            raise ValueError(f"exponents must be {1 << b} distinct integers in "
                             f"[0, {(1 << self.layout.exp_bits) - 1}], got {list(e)}")
        if self.escapes < 0:
            raise ValueError(f"escapes must be >= 0, got {self.escapes}")


@dataclass
class Streams:
    """A tensor's values in the expdict codec: the parameters and the five streams (numpy)."""

    params: ExpDict
    residuals: np.ndarray  # uint8, nnz * residual_bytes
    codes: np.ndarray  # uint8, ceil(nnz * field_bits / 8)
    escape_offsets: np.ndarray  # uint32, ntiles + 1
    escape_positions: np.ndarray  # uint16, escapes
    escape_values: np.ndarray  # element bit patterns, escapes

    @classmethod
    def from_bytes(cls, params: ExpDict, segs: dict) -> Streams:
        """Streams over the raw bytes of a tensor's segments (kind -> uint8 array), no copies."""
        return cls(params, segs["residuals"], segs["codes"], segs["escape_offsets"].view("<u4"),
                   segs["escape_positions"].view("<u2"),
                   segs["escape_values"].view(params.layout.bits))

    @property
    def nnz(self) -> int:
        """The number of values, from the residuals stream (``residual_bytes`` each)."""
        return self.residuals.size // self.params.layout.residual_bytes

    def segments(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in STREAM_KINDS}


# --------------------------------------------------------------------------------------------
# Choosing the dictionary


def split_values(values: np.ndarray, layout: FloatLayout) -> tuple[np.ndarray, np.ndarray]:
    """(exponent, residual) of each value, as uint32 (4 bytes a value: encoding a 70B-shaped
    matrix, 117 M values, stays at a few GB of temporaries)."""
    v = values.astype(np.uint32)
    m = np.uint32(layout.man_bits)
    exp = (v >> m) & np.uint32((1 << layout.exp_bits) - 1)
    sign = v >> np.uint32(8 * layout.itemsize - 1)
    return exp, (sign << m) | (v & np.uint32((1 << layout.man_bits) - 1))


def exponent_histogram(values: np.ndarray, layout: FloatLayout) -> np.ndarray:
    """How many of ``values`` (bit patterns) have each exponent (``2 ** exp_bits`` counts)."""
    exp = (values >> values.dtype.type(layout.man_bits)) & values.dtype.type((1 << layout.exp_bits) - 1)
    return np.bincount(exp, minlength=1 << layout.exp_bits)


def _dictionary(hist: np.ndarray, index_bits: int) -> tuple[tuple[int, ...], int]:
    """The ``2 ** index_bits`` most frequent exponents (ties: the smaller exponent first; unused
    exponents fill the rest, so the dictionary always has ``2 ** b`` distinct entries and every
    code is valid) and the number of values left as escapes."""
    order = np.lexsort((np.arange(hist.size), -hist))  # by count descending, then by exponent
    top = order[: 1 << index_bits]
    return tuple(int(x) for x in top), int(hist.sum() - hist[top].sum())


def best_expdict(hist: np.ndarray, n: int, layout: FloatLayout) -> tuple[ExpDict, int]:
    """The index width (1..4) whose encoding of the values counted in ``hist`` is smallest on disk
    (codec segments, each padded to a page, escapes included, plus the dictionary: one byte an
    entry, its share of the manifest); returns it and those bytes.

    The bitmap and tile offsets are the same for every width, so they do not enter the choice.
    """
    nnz = int(hist.sum())
    best = None
    for b in range(1, MAX_INDEX_BITS + 1):
        exponents, escapes = _dictionary(hist, b)
        p = ExpDict(layout, b, exponents, escapes)
        size = sum(pad_to_page(x) for x in p.segment_nbytes(n, nnz).values()) + len(exponents)
        if best is None or size < best[1]:  # strict: the narrower width wins a tie
            best = (p, size)
    return best


# --------------------------------------------------------------------------------------------
# Encoding and the reference decoder


def _pack_fields(fields: np.ndarray, w: int) -> np.ndarray:
    """Little-endian bit stream of ``w``-bit fields: field k at bits [k*w, k*w + w).

    Eight fields fill exactly ``w`` bytes, so groups of eight are assembled in a uint64 and their
    low ``w`` bytes kept.
    """
    k = fields.size
    groups = np.zeros(-(-k // 8) * 8, dtype=np.uint8)  # a field has at most 7 bits
    groups[:k] = fields
    groups = groups.reshape(-1, 8)
    acc = np.zeros(groups.shape[0], dtype=np.uint64)
    for j in range(8):
        acc |= groups[:, j].astype(np.uint64) << np.uint64(j * w)
    return acc.view(np.uint8).reshape(-1, 8)[:, :w].reshape(-1)[: -(-k * w // 8)].copy()


def _unpack_fields(codes: np.ndarray, k: int, w: int) -> np.ndarray:
    """The ``k`` fields of ``w`` bits of :func:`_pack_fields`'s stream (as int64)."""
    groups = -(-k // 8)
    raw = np.zeros(groups * w, dtype=np.uint8)
    raw[: codes.size] = codes[: groups * w]
    wide = np.zeros((groups, 8), dtype=np.uint8)
    wide[:, :w] = raw.reshape(groups, w)
    acc = wide.view(np.uint64).reshape(-1)
    mask = np.uint64((1 << w) - 1)
    out = np.stack([(acc >> np.uint64(j * w)) & mask for j in range(8)], axis=1).reshape(-1)
    return out[:k].astype(np.int64)


def _tile_of(index: np.ndarray, tile_offsets: np.ndarray) -> np.ndarray:
    """Tile of each global value index (the tile whose [off[t], off[t+1]) holds it)."""
    return np.searchsorted(tile_offsets.astype(np.int64), index, side="right") - 1


def encode_values(values: np.ndarray, tile_offsets: np.ndarray, params: ExpDict) -> Streams:
    """Encode the packed non-zero ``values`` (bit patterns, in tensor order) of a tensor whose v1
    tile offset table is ``tile_offsets``; ``params.escapes`` must match what the dictionary leaves
    (``best_expdict`` computes it)."""
    params.check()
    layout = params.layout
    values = np.ascontiguousarray(values).reshape(-1)
    exp, res = split_values(values, layout)
    index_of = np.full(1 << layout.exp_bits, 255, dtype=np.uint8)  # 255: not in the dictionary
    index_of[list(params.exponents)] = np.arange(len(params.exponents))
    idx = index_of[exp].astype(np.uint32)
    del exp
    escaped = idx == 255
    nesc = int(np.count_nonzero(escaped))
    if nesc != params.escapes:
        raise ValueError(f"the dictionary leaves {nesc} escapes, params say {params.escapes}")
    res[escaped] = 0  # canonical: an escape's residual and field are zero
    idx[escaped] = 0
    rb = layout.residual_bytes
    fields = idx | ((res >> np.uint32(8 * rb)) << np.uint32(params.index_bits))
    del idx
    residuals = res.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :rb].reshape(-1).copy()
    del res
    codes = _pack_fields(fields, params.field_bits)
    where = np.flatnonzero(escaped)
    tile = _tile_of(where, tile_offsets)
    ntiles = tile_offsets.size - 1
    escape_offsets = np.zeros(ntiles + 1, dtype="<u4")
    escape_offsets[1:] = np.cumsum(np.bincount(tile, minlength=ntiles))
    positions = (where - tile_offsets.astype(np.int64)[tile]).astype("<u2")
    return Streams(params, residuals, codes, escape_offsets, positions,
                   values[escaped].astype(layout.bits))


def check_escapes(streams: Streams, tile_offsets: np.ndarray, where: str = "tensor") -> None:
    """Raise :class:`DecodeError` unless the escape table fits the tile offsets.

    Valid: ``escape_offsets`` has ``ntiles + 1`` entries from 0 to ``escapes``, non-decreasing; in
    every tile the positions are strictly increasing and below the tile's number of values (so a
    tile has at most as many escapes as values, and no value is patched twice).
    """
    eo = np.asarray(streams.escape_offsets).astype(np.int64)
    offs = np.asarray(tile_offsets).astype(np.int64)
    nesc = streams.params.escapes
    if eo.shape != offs.shape:
        raise DecodeError(f"{where}: escape offset table has {eo.size} entries, expected {offs.size}")
    if eo[0] != 0 or eo[-1] != nesc:
        raise DecodeError(f"{where}: escape offsets must run from 0 to escapes={nesc}, got "
                          f"{int(eo[0])}..{int(eo[-1])}")
    steps = np.diff(eo)
    bad = np.flatnonzero((steps < 0) | (steps > np.diff(offs)))
    if bad.size:
        t = int(bad[0])
        raise DecodeError(f"{where}: tile {t} claims {int(steps[t])} escapes for "
                          f"{int(offs[t + 1] - offs[t])} values (escape offsets must be "
                          f"non-decreasing, at most one escape per value)")
    pos = np.asarray(streams.escape_positions).astype(np.int64)
    if pos.size != nesc or streams.escape_values.size != nesc:
        raise DecodeError(f"{where}: {pos.size} escape positions and {streams.escape_values.size} "
                          f"escape values, expected {nesc}")
    tile = np.repeat(np.arange(steps.size), steps)
    count = np.diff(offs)[tile]
    first = np.ones(nesc, dtype=bool)
    first[1:] = tile[1:] != tile[:-1]
    increasing = np.ones(nesc, dtype=bool)
    increasing[1:] = pos[1:] > pos[:-1]
    bad = np.flatnonzero((pos >= count) | ~(first | increasing))
    if bad.size:
        e = int(bad[0])
        raise DecodeError(f"{where}: tile {int(tile[e])} escape {e} has position {int(pos[e])}, "
                          f"which is past its {int(count[e])} values or not above the previous one "
                          f"(positions must be strictly increasing within a tile)")


def decode_values_reference(streams: Streams, tile_offsets: np.ndarray, nnz: int,
                            where: str = "tensor") -> np.ndarray:
    """The ``nnz`` packed values (bit patterns) rebuilt from the streams (reference decoder).

    ``tile_offsets`` must already be valid (``format.check_tile_offsets``); the streams are
    checked here and a mismatch is a :class:`DecodeError`.
    """
    p, layout = streams.params, streams.params.layout
    try:
        p.check()
    except ValueError as exc:
        raise DecodeError(f"{where}: {exc}") from None
    sizes = p.stream_nbytes(nnz)
    for kind in ("residuals", "codes"):
        got = getattr(streams, kind).nbytes
        if got != sizes[kind]:
            raise DecodeError(f"{where}: {kind} holds {got} bytes, expected {sizes[kind]}")
    check_escapes(streams, tile_offsets, where)
    rb, m = layout.residual_bytes, layout.man_bits
    low = np.zeros((nnz, 4), dtype=np.uint8)
    low[:, :rb] = streams.residuals.reshape(nnz, rb)
    fields = _unpack_fields(streams.codes, nnz, p.field_bits)
    res = low.view("<u4").reshape(-1).astype(np.int64) | ((fields >> p.index_bits) << (8 * rb))
    exp = np.asarray(p.exponents, dtype=np.int64)[fields & ((1 << p.index_bits) - 1)]
    sign = res >> m
    values = (sign << (8 * layout.itemsize - 1)) | (exp << m) | (res & ((1 << m) - 1))
    out = values.astype(layout.bits)
    if p.escapes:
        eo = streams.escape_offsets.astype(np.int64)
        tile = np.repeat(np.arange(eo.size - 1), np.diff(eo))
        out[tile_offsets.astype(np.int64)[tile] + streams.escape_positions] = streams.escape_values
    return out
