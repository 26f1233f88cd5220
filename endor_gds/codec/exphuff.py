"""A value codec with entropy-coded exponents (``exphuff``): the reference, in plain numpy.

Format version 3 (``docs/format.md``, "Codec exphuff", is the prose version of this module). The
C decoder (``endor_decode_exphuff_tiles``, through :class:`endor_gds.decode.cpu.CpuDecoder`) and the
CUDA kernel are tested bit-exactly against :func:`decode_values_reference`.

The exponent of trained or randomly initialised weights carries ~2.6 bits, which the expdict codec
(format v2) stores as a fixed-width dictionary index of 1-4 bits (plus escapes), and a dense tensor
pays a bitmap besides. Here a value is stored as

* its **residual** ``sign << M | mantissa``: the low ``8 * residual_bytes`` bits in the
  ``residuals`` stream (bf16 1 byte, fp16 1, fp32 3), as in expdict, and
* in the ``bits`` stream, MSB first: the canonical Huffman **code** of its exponent (at most
  :data:`MAX_CODE_BITS` bits, so a decoder finds it with one table lookup on the next 12 bits),
  then the residual bits that did not fit whole bytes (fp16: 3).

``tile_bits`` (uint32, one per tile + 1) is where each tile's first value starts in ``bits``, and
``chunk_bits`` (uint16, 7 per tile) where its chunks 1-7 of :data:`CHUNK_VALUES` values start,
counted from the tile's start (a chunk past the tile's values starts at its end), so every tile,
and every chunk of it, decodes on its own. Tiles are those of the bitmap (``tile_offsets``) for a
sparse tensor, or every :data:`~endor_gds.codec.bitmap.TILE_ELEMS` elements of a dense tensor
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

__all__ = ["MAX_CODE_BITS", "CHUNK_VALUES", "CHUNKS_PER_TILE", "STREAM_KINDS", "ExpHuff", "HuffStreams",
           "code_lengths", "canonical_codes", "best_exphuff", "dense_tile_offsets", "encode_values",
           "check_bit_offsets", "decode_values_reference", "stored_nbytes"]

MAX_CODE_BITS = 12  # one lookup in a 4096-entry table (8 KiB of u16 on a GPU: shared memory)
# A tile's values are decoded in chunks of CHUNK_VALUES, each from its own bit offset, so that a
# GPU decodes a tile with CHUNKS_PER_TILE threads and a CPU core runs independent chains; the
# offsets cost 7 x 16 bits per tile (0.027 bits per element).
CHUNK_VALUES = 512
CHUNKS_PER_TILE = TILE_ELEMS // CHUNK_VALUES
STREAM_KINDS = ("residuals", "bits", "tile_bits", "chunk_bits")


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
    """The per-tensor parameters (the manifest's ``exphuff`` object): the float layout, the code
    length of each exponent, and the length of the ``bits`` stream in bits (None while no tensor
    is bound to the code)."""

    layout: FloatLayout
    lengths: tuple[int, ...]  # 2 ** exp_bits entries, 0 = exponent absent
    nbits: int | None = None

    def value_bits(self, hist: np.ndarray) -> int:
        """Bits in the ``bits`` stream for values whose exponents are counted in ``hist``."""
        return int((np.asarray(self.lengths) + self.layout.high_bits) @ hist.astype(np.int64))

    def unit_bits(self) -> tuple[int, int]:
        """The fewest and most bits one value takes in the ``bits`` stream (code + high bits)."""
        used = [x for x in self.lengths if x] or [0]
        return min(used) + self.layout.high_bits, max(used) + self.layout.high_bits

    def segment_nbytes(self, n: int, nnz: int) -> dict[str, int]:
        """Unpadded bytes of the codec's segments for ``nnz`` values of an ``n``-element tensor."""
        if self.nbits is None:
            raise ValueError("the code is bound to no tensor (nbits is None)")
        return {"residuals": nnz * self.layout.residual_bytes, "bits": -(-self.nbits // 8),
                "tile_bits": 4 * (num_tiles(n) + 1), "chunk_bits": 2 * (CHUNKS_PER_TILE - 1) * num_tiles(n)}

    def manifest(self) -> dict:
        return {"code_lengths": list(self.lengths), "bits": self.nbits}

    def check(self) -> None:
        """``ValueError`` unless the lengths make a prefix code within :data:`MAX_CODE_BITS`."""
        ln = np.asarray(self.lengths, dtype=np.int64)
        if ln.size != 1 << self.layout.exp_bits or ln.min() < 0 or ln.max() > MAX_CODE_BITS:
            raise ValueError(f"lengths must be {1 << self.layout.exp_bits} integers in [0, {MAX_CODE_BITS}]")
        used = ln[ln > 0]
        if used.size and float(np.sum(2.0 ** -used)) > 1.0:
            raise ValueError("code lengths over-subscribe the code space (Kraft sum > 1)")
        if self.nbits is not None and not 0 <= self.nbits < 1 << 32:
            raise ValueError(f"bits must be in [0, 2^32), got {self.nbits}")


@dataclass
class HuffStreams:
    """A tensor's values in the exphuff codec."""

    params: ExpHuff
    residuals: np.ndarray  # uint8, nnz * residual_bytes
    bits: np.ndarray  # uint8, MSB-first bit stream: per value its exponent's code, then high bits
    tile_bits: np.ndarray  # uint32, ntiles + 1: bit offset of each tile's first value
    chunk_bits: np.ndarray  # uint16, (CHUNKS_PER_TILE - 1) per tile: its chunks 1.. from its start

    @classmethod
    def from_bytes(cls, params: ExpHuff, segs: dict) -> HuffStreams:
        """Streams over the raw bytes of a tensor's segments (kind -> uint8 array), no copies."""
        return cls(params, segs["residuals"], segs["bits"], segs["tile_bits"].view("<u4"),
                   segs["chunk_bits"].view("<u2"))

    @property
    def nnz(self) -> int:
        return self.residuals.size // self.params.layout.residual_bytes

    def segments(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in STREAM_KINDS}


def dense_tile_offsets(n: int) -> np.ndarray:
    """The tile offsets of a dense tensor's values: every value is stored, tile t holds elements
    ``[t * TILE_ELEMS, (t + 1) * TILE_ELEMS)``."""
    return np.minimum(np.arange(num_tiles(n) + 1, dtype=np.int64) * TILE_ELEMS, n).astype(np.uint32)


def best_exphuff(hist: np.ndarray, layout: FloatLayout) -> ExpHuff:
    """The code for values whose exponents are counted in ``hist`` (length-limited Huffman),
    bound to those values (``nbits``)."""
    lengths = tuple(int(x) for x in code_lengths(hist))
    return ExpHuff(layout, lengths, ExpHuff(layout, lengths).value_bits(hist))


def stored_nbytes(params: ExpHuff, n: int, nnz: int, *, bitmap: bool) -> int:
    """Bytes on disk of a tensor of ``n`` elements, ``nnz`` of them stored, in this codec (bound
    code), every segment padded to a page: its streams, the code lengths (one byte each, the
    manifest's share) and, for a sparse tensor, bitmap and tile offsets. Equal to what
    :func:`encode_values` writes (tested)."""
    segments = list(params.segment_nbytes(n, nnz).values())
    if bitmap:
        segments += [4 * -(-n // 32), 4 * (num_tiles(n) + 1)]
    return sum(pad_to_page(s) for s in segments) + len(params.lengths)


def _chunk_starts(tile_offsets: np.ndarray) -> np.ndarray:
    """Value index where chunk c of tile t starts, ``[ntiles, CHUNKS_PER_TILE + 1]`` (column 0:
    the tile's first value, the last column its end; chunks past the tile's values are empty)."""
    offs = tile_offsets.astype(np.int64)
    starts = offs[:-1, None] + CHUNK_VALUES * np.arange(CHUNKS_PER_TILE + 1)
    return np.minimum(starts, offs[1:, None])


def encode_values(values: np.ndarray, tile_offsets: np.ndarray, params: ExpHuff) -> HuffStreams:
    """Encode ``values`` (bit patterns, in tile order) with ``params``, whose lengths must cover
    every exponent present (``ValueError`` otherwise). Returns the streams with ``params`` bound
    to their length."""
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
    if params.nbits is not None and params.nbits != total:
        raise ValueError(f"the code is bound to {params.nbits} bits, these values take {total}")
    # A value's string (<= 15 bits) starting at bit `first % 8` of byte `first // 8` lies within
    # that byte and the next two: place it in a 24-bit window and add each window byte into the
    # stream (strings never share a bit, so adding is OR-ing; bincount adds without a Python loop).
    first = start[:-1]
    window = word << (24 - (first & 7) - width)
    nbytes = -(-total // 8)
    stream = np.zeros(nbytes + 2, dtype=np.int64)
    for i in range(3):
        stream += np.bincount((first >> 3) + i, weights=(window >> (16 - 8 * i)) & 0xFF,
                              minlength=nbytes + 2).astype(np.int64)[: nbytes + 2]
    tile_bits = start[tile_offsets.astype(np.int64)].astype(np.uint32)
    chunks = start[_chunk_starts(tile_offsets)]
    chunk_bits = (chunks[:, 1:CHUNKS_PER_TILE] - chunks[:, :1]).astype("<u2").reshape(-1)
    return HuffStreams(ExpHuff(layout, params.lengths, total), residuals, stream[:nbytes].astype(np.uint8),
                       tile_bits, chunk_bits)


def check_bit_offsets(streams: HuffStreams, tile_offsets: np.ndarray, where: str = "tensor") -> None:
    """Raise :class:`DecodeError` unless the tile and chunk bit offsets are possible for the code.

    Valid: ``tile_bits`` has ``ntiles + 1`` entries from 0 to ``bits``; every chunk (and so every
    tile) spans between its value count times the shortest and the longest unit (code + high
    bits); chunk offsets are relative to their tile. Whether the codes really end there only a
    decode can tell; every decoder checks that, chunk by chunk.
    """
    p = streams.params
    tb = np.asarray(streams.tile_bits).astype(np.int64)
    offs = np.asarray(tile_offsets).astype(np.int64)
    if tb.shape != offs.shape:
        raise DecodeError(f"{where}: tile bit table has {tb.size} entries, expected {offs.size}")
    if tb[0] != 0 or tb[-1] != p.nbits:
        raise DecodeError(f"{where}: tile bits must run from 0 to bits={p.nbits}, got {int(tb[0])}..{int(tb[-1])}")
    ntiles = offs.size - 1
    cb = np.asarray(streams.chunk_bits).astype(np.int64)
    if cb.size != ntiles * (CHUNKS_PER_TILE - 1):
        raise DecodeError(f"{where}: chunk bit table has {cb.size} entries, expected "
                          f"{ntiles * (CHUNKS_PER_TILE - 1)}")
    if not ntiles:
        return
    edges = np.concatenate([np.zeros((ntiles, 1), np.int64), cb.reshape(ntiles, -1),
                            np.diff(tb)[:, None]], axis=1) + tb[:-1, None]
    span, count = np.diff(edges, axis=1), np.diff(_chunk_starts(offs), axis=1)
    shortest, longest = p.unit_bits()
    bad = np.argwhere((span < count * shortest) | (span > count * longest))
    if bad.size:
        t, c = (int(x) for x in bad[0])
        raise DecodeError(f"{where}: tile {t} chunk {c} spans {int(span[t, c])} bits for "
                          f"{int(count[t, c])} values of {shortest}-{longest} bits")


def decode_values_reference(streams: HuffStreams, tile_offsets: np.ndarray, nnz: int,
                            where: str = "tensor") -> np.ndarray:
    """The values' bit patterns, every chunk decoded on its own from its bit offset (all chunks
    of the tensor in step, as GPU threads would). ``DecodeError`` when the tables are impossible
    (:func:`check_bit_offsets`), a code is not in the table, or a chunk does not end where the
    next begins."""
    p, layout = streams.params, streams.params.layout
    try:
        p.check()
    except ValueError as exc:
        raise DecodeError(f"{where}: {exc}") from None
    if streams.residuals.size != nnz * layout.residual_bytes or streams.bits.size != -(-(p.nbits or 0) // 8):
        raise DecodeError(f"{where}: residuals or bits hold the wrong number of bytes")
    check_bit_offsets(streams, tile_offsets, where)
    lengths = np.asarray(p.lengths, dtype=np.int64)
    codes = canonical_codes(lengths)
    # the decode table: the next MAX_CODE_BITS bits -> (exponent, length); length 0 = no code
    table_exp = np.zeros(1 << MAX_CODE_BITS, dtype=np.int64)
    table_len = np.zeros(1 << MAX_CODE_BITS, dtype=np.int64)
    for s in np.flatnonzero(lengths):
        lo = int(codes[s]) << (MAX_CODE_BITS - int(lengths[s]))
        table_exp[lo:lo + (1 << (MAX_CODE_BITS - int(lengths[s])))] = s
        table_len[lo:lo + (1 << (MAX_CODE_BITS - int(lengths[s])))] = lengths[s]
    stream = np.concatenate([streams.bits, np.zeros(4, np.uint8)]).astype(np.int64)

    def peek(pos, width):  # the `width` (<= 16) bits from bit `pos` on, MSB first
        byte = pos >> 3
        window = stream[byte] << 16 | stream[byte + 1] << 8 | stream[byte + 2]
        return (window >> (24 - (pos & 7) - width)) & ((1 << width) - 1)

    rb, hb, m = layout.residual_bytes, layout.high_bits, layout.man_bits
    res_lo = streams.residuals[: nnz * rb].reshape(-1, rb).astype(np.int64) @ (1 << (8 * np.arange(rb)))
    offs = tile_offsets.astype(np.int64)
    ntiles = offs.size - 1
    tb = streams.tile_bits.astype(np.int64)
    bounds = np.concatenate([np.zeros((ntiles, 1), np.int64),
                             streams.chunk_bits.astype(np.int64).reshape(ntiles, -1),
                             np.diff(tb)[:, None]], axis=1) + tb[:-1, None]
    first = _chunk_starts(offs)
    k, stop = first[:, :-1].reshape(-1), first[:, 1:].reshape(-1)  # per chunk: next value, end
    pos, end = bounds[:, :-1].reshape(-1).copy(), bounds[:, 1:].reshape(-1)
    out = np.zeros(nnz, dtype=np.int64)
    for _ in range(CHUNK_VALUES):
        live = np.flatnonzero(k < stop)
        if not live.size:
            break
        window = peek(pos[live], MAX_CODE_BITS)
        length = table_len[window]
        bad = live[(length == 0) | (pos[live] + length + hb > end[live])]
        if bad.size:
            c = int(bad[0])
            raise DecodeError(f"{where}: tile {c // CHUNKS_PER_TILE} chunk {c % CHUNKS_PER_TILE}: value "
                              f"{int(k[c])} has no valid exponent code at bit {int(pos[c])}")
        high = peek(pos[live] + length, hb) if hb else 0
        r = res_lo[k[live]] | high << (8 * rb)
        out[k[live]] = (r >> m) << (8 * layout.itemsize - 1) | table_exp[window] << m | (r & ((1 << m) - 1))
        pos[live] += length + hb
        k[live] += 1
    wrong = np.flatnonzero(pos != end)
    if wrong.size:
        c = int(wrong[0])
        raise DecodeError(f"{where}: tile {c // CHUNKS_PER_TILE} chunk {c % CHUNKS_PER_TILE} ends at bit "
                          f"{int(pos[c])}, the next starts at {int(end[c])}")
    return out.astype(layout.bits)
