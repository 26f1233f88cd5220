"""A value codec with entropy-coded exponents (``exphuff``): the reference, in plain numpy.

Issue 22's first part; not yet written by the packer or read by the runtime. The C decoder
(``endor_decode_exphuff_tiles``, through :class:`endor_gds.decode.cpu.CpuDecoder`) is tested
bit-exactly against :func:`decode_values_reference`; no CUDA kernel yet.

The exponent of trained or randomly initialised weights carries ~2.6 bits, which the expdict codec
(format v2) stores as a fixed-width dictionary index of 1-4 bits (plus escapes), and a dense tensor
pays a bitmap besides. Here a value is stored as

* its **residual** ``sign << M | mantissa``: the low ``8 * residual_bytes`` bits in the
  ``residuals`` stream (bf16 1 byte, fp16 1, fp32 3), as in expdict, and
* in the ``bits`` stream, MSB first: the canonical Huffman **code** of its exponent (at most
  :data:`MAX_CODE_BITS` bits, so a decoder finds it with one table lookup on the next 12 bits),
  then the residual bits that did not fit whole bytes (fp16: 3).

``tile_bits`` (uint32, one per tile + 1) is where each tile's first value starts in ``bits``, so
every tile still decodes on its own. Tiles are those of the bitmap (``tile_offsets``) for a sparse
tensor, or every :data:`~endor_gds.codec.bitmap.TILE_ELEMS` elements of a dense tensor
(:func:`dense_tile_offsets`), which needs no bitmap at all. The code is given by its lengths per
exponent (``lengths``, 0 = exponent absent), the canonical order being (length, exponent).
Decoders move bit patterns only, so -0.0, NaN payloads, subnormals and infinities round-trip.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from endor_gds.codec.bitmap import TILE_ELEMS, num_tiles, pad_to_page
from endor_gds.codec.expdict import FloatLayout, split_values
from endor_gds.errors import DecodeError

__all__ = ["MAX_CODE_BITS", "ExpHuff", "HuffStreams", "code_lengths", "canonical_codes", "best_exphuff",
           "dense_tile_offsets", "encode_values", "decode_values_reference", "stored_nbytes"]

MAX_CODE_BITS = 12  # one lookup in a 4096-entry table (8 KiB of u16 on a GPU: shared memory)


def code_lengths(hist: np.ndarray, max_bits: int = MAX_CODE_BITS) -> np.ndarray:
    """Huffman code lengths (int array like ``hist``, 0 where the count is 0), limited to
    ``max_bits``: the optimal code when it fits, else the JPEG (ITU T.81, K.3) adjustment of the
    number of codes per length, which keeps the code complete. One symbol gets a 1-bit code."""
    used = np.flatnonzero(hist)
    lengths = np.zeros(hist.size, dtype=np.int64)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used[0]] = 1
        return lengths
    # Huffman's tree by a heap of (count, tiebreak, symbols below); each merge deepens its symbols
    heap = [(int(hist[s]), i, [int(s)]) for i, s in enumerate(used)]
    heapq.heapify(heap)
    tiebreak = len(heap)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tiebreak, s1 + s2))
        tiebreak += 1
    if lengths.max() <= max_bits:
        return lengths
    count = np.bincount(lengths[used], minlength=lengths.max() + 1)
    for i in range(count.size - 1, max_bits, -1):  # move the longest codes up, two at a time
        while count[i] > 0:
            j = i - 2
            while count[j] == 0:
                j -= 1
            count[i] -= 2
            count[i - 1] += 1
            count[j + 1] += 2
            count[j] -= 1
    # the most frequent symbols get the shortest of the adjusted lengths
    order = used[np.lexsort((used, -hist[used]))]
    new = np.concatenate([np.full(int(c), n) for n, c in enumerate(count[: max_bits + 1]) if c])
    lengths[order] = new
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code of each symbol (int64; the code's ``lengths[s]`` low bits, MSB first):
    symbols sorted by (length, symbol) get consecutive codes, shifted left at each longer length."""
    codes = np.zeros(lengths.size, dtype=np.int64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        prev = int(lengths[s])
        codes[s] = code
        code += 1
    return codes


@dataclass(frozen=True)
class ExpHuff:
    """The per-tensor parameters: the float layout and the code length of each exponent."""

    layout: FloatLayout
    lengths: tuple[int, ...]  # 2 ** exp_bits entries, 0 = exponent absent

    def value_bits(self, hist: np.ndarray) -> int:
        """Bits in the ``bits`` stream for values whose exponents are counted in ``hist``."""
        return int((np.asarray(self.lengths) + self.layout.high_bits) @ hist.astype(np.int64))

    def check(self) -> None:
        """``ValueError`` unless the lengths make a prefix code within :data:`MAX_CODE_BITS`."""
        ln = np.asarray(self.lengths, dtype=np.int64)
        if ln.size != 1 << self.layout.exp_bits or ln.min() < 0 or ln.max() > MAX_CODE_BITS:
            raise ValueError(f"lengths must be {1 << self.layout.exp_bits} integers in [0, {MAX_CODE_BITS}]")
        used = ln[ln > 0]
        if used.size and float(np.sum(2.0 ** -used)) > 1.0:
            raise ValueError("code lengths over-subscribe the code space (Kraft sum > 1)")


@dataclass
class HuffStreams:
    """A tensor's values in the exphuff codec."""

    params: ExpHuff
    residuals: np.ndarray  # uint8, nnz * residual_bytes
    bits: np.ndarray  # uint8, MSB-first bit stream: per value its exponent's code, then high bits
    tile_bits: np.ndarray  # uint32, ntiles + 1: bit offset of each tile's first value

    @property
    def nnz(self) -> int:
        return self.residuals.size // self.params.layout.residual_bytes


def dense_tile_offsets(n: int) -> np.ndarray:
    """The tile offsets of a dense tensor's values: every value is stored, tile t holds elements
    ``[t * TILE_ELEMS, (t + 1) * TILE_ELEMS)``."""
    return np.minimum(np.arange(num_tiles(n) + 1, dtype=np.int64) * TILE_ELEMS, n).astype(np.uint32)


def best_exphuff(hist: np.ndarray, layout: FloatLayout) -> ExpHuff:
    """The code for values whose exponents are counted in ``hist`` (length-limited Huffman)."""
    return ExpHuff(layout, tuple(int(x) for x in code_lengths(hist)))


def stored_nbytes(params: ExpHuff, hist: np.ndarray, n: int, *, bitmap: bool) -> int:
    """Bytes on disk of a tensor of ``n`` elements in this codec, every segment padded to a page:
    residuals, bits, tile bits, the code lengths (one byte each, the manifest's share) and, for a
    sparse tensor, bitmap and tile offsets. Equal to what :func:`encode_values` writes (tested)."""
    nnz = int(hist.sum())
    segments = [nnz * params.layout.residual_bytes, -(-params.value_bits(hist) // 8), 4 * (num_tiles(n) + 1)]
    if bitmap:
        segments += [4 * -(-n // 32), 4 * (num_tiles(n) + 1)]
    return sum(pad_to_page(s) for s in segments) + len(params.lengths)


def encode_values(values: np.ndarray, tile_offsets: np.ndarray, params: ExpHuff) -> HuffStreams:
    """Encode ``values`` (bit patterns, in tile order) with ``params``, whose lengths must cover
    every exponent present (``ValueError`` otherwise)."""
    layout = params.layout
    exp, res = split_values(values, layout)
    lengths = np.asarray(params.lengths, dtype=np.int64)
    if exp.size and (lengths[exp] == 0).any():
        raise ValueError("an exponent of these values has no code (lengths[e] == 0)")
    codes = canonical_codes(lengths)
    rb, hb = layout.residual_bytes, layout.high_bits
    residuals = np.stack([(res >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(rb)], axis=1) \
        .astype(np.uint8).reshape(-1)
    # each value's bit string: code then high residual bits, at most MAX_CODE_BITS + 3 bits
    width = lengths[exp] + hb
    word = (codes[exp] << hb) | (res.astype(np.int64) >> (8 * rb))
    start = np.concatenate([[0], np.cumsum(width)])
    total = int(start[-1])
    if total >= 1 << 32:
        raise ValueError(f"{total} bits do not fit uint32 tile bit offsets")
    bits = np.zeros(total, dtype=np.uint8)
    for b in range(int(width.max(initial=0))):  # bit b (from the MSB) of every value that has one
        has = width > b
        bits[start[:-1][has] + b] = (word[has] >> (width[has] - 1 - b)) & 1
    tile_bits = start[tile_offsets.astype(np.int64)].astype(np.uint32)
    return HuffStreams(params, residuals, np.packbits(bits), tile_bits)


def decode_values_reference(streams: HuffStreams, tile_offsets: np.ndarray, nnz: int,
                            where: str = "tensor") -> np.ndarray:
    """The values' bit patterns, tile by tile from ``tile_bits`` (each tile on its own, as a GPU
    block would). ``DecodeError`` when a code is not in the table, the stream ends early, or a
    tile does not end where the next begins."""
    p, layout = streams.params, streams.params.layout
    lengths = np.asarray(p.lengths, dtype=np.int64)
    codes = canonical_codes(lengths)
    # the decode table: the next MAX_CODE_BITS bits -> (exponent, length); length 0 = no code
    table_exp = np.zeros(1 << MAX_CODE_BITS, dtype=np.int64)
    table_len = np.zeros(1 << MAX_CODE_BITS, dtype=np.int64)
    for s in np.flatnonzero(lengths):
        lo = int(codes[s]) << (MAX_CODE_BITS - int(lengths[s]))
        table_exp[lo:lo + (1 << (MAX_CODE_BITS - int(lengths[s])))] = s
        table_len[lo:lo + (1 << (MAX_CODE_BITS - int(lengths[s])))] = lengths[s]
    bits = np.unpackbits(streams.bits).astype(np.int64)
    padded = np.concatenate([bits, np.zeros(MAX_CODE_BITS + 8, dtype=np.int64)])
    rb, hb, m = layout.residual_bytes, layout.high_bits, layout.man_bits
    res_lo = streams.residuals[: nnz * rb].reshape(-1, rb).astype(np.int64) @ (1 << (8 * np.arange(rb)))
    weights = 1 << np.arange(MAX_CODE_BITS - 1, -1, -1)
    out = np.zeros(nnz, dtype=np.int64)
    tb = streams.tile_bits.astype(np.int64)
    for t in range(tile_offsets.size - 1):
        pos = int(tb[t])
        for k in range(int(tile_offsets[t]), int(tile_offsets[t + 1])):
            peek = int(padded[pos:pos + MAX_CODE_BITS] @ weights)
            length = int(table_len[peek])
            if length == 0 or pos + length + hb > bits.size:
                raise DecodeError(f"{where}: tile {t}: value {k} has no valid exponent code at bit {pos}")
            high = int(padded[pos + length:pos + length + hb] @ (1 << np.arange(hb - 1, -1, -1))) if hb else 0
            pos += length + hb
            r = int(res_lo[k]) | high << (8 * rb)
            out[k] = (r >> m) << (8 * layout.itemsize - 1) | int(table_exp[peek]) << m | (r & ((1 << m) - 1))
        if pos != int(tb[t + 1]):
            raise DecodeError(f"{where}: tile {t} ends at bit {pos}, the next starts at {int(tb[t + 1])}")
    return out.astype(layout.bits)
