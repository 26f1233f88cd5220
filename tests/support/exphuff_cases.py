"""Decoder test inputs for codec exphuff (format v3), shared by the emulated and the GPU kernel
tests: valid tensors as the file holds them, dense (no bitmap) or sparse, and corrupted ones with
the first bad (tile, reason) the kernel must report (as decode_cases does for raw and expdict)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from bitgen import weight_bits
from decode_cases import BAD_OFFSETS, COUNT_MISMATCH, key

from endor_gds.codec.bitmap import (
    TILE_ELEMS,
    check_tile_offsets,
    decode_bitmap_reference,
    encode_bitmap,
    pad_to_page,
)
from endor_gds.codec.expdict import LAYOUTS, exponent_histogram
from endor_gds.codec.exphuff import (
    CHUNK_VALUES,
    CHUNKS_PER_TILE,
    ExpHuff,
    HuffStreams,
    best_exphuff,
    canonical_codes,
    code_lengths,
    decode_values_reference,
    dense_tile_offsets,
    encode_values,
)

BAD_BITS = 5  # endor::kBadBits (cuda/endor_decode.cu)


@dataclass
class HuffTensor:
    """One exphuff descriptor's inputs as the file would hold them (``bitmap`` and ``offsets``
    None for a dense tensor), and what decoding must give."""

    dtype: str  # "BF16", "F16", "F32"
    n: int
    bitmap: np.ndarray | None  # uint32 words
    offsets: np.ndarray | None  # uint32, ntiles + 1
    nnz: int  # declared in the descriptor
    params: ExpHuff  # bound: nbits is the stream's length
    residuals: bytes  # values_capacity bytes (nnz * residual_bytes, then padding if any)
    bits: bytes  # bits_capacity bytes (ceil(nbits / 8), then padding if any)
    tile_bits: np.ndarray  # uint32, ntiles + 1
    chunk_bits: np.ndarray  # uint16, 7 * ntiles
    label: str = "t"

    @property
    def elem_bytes(self) -> int:
        return LAYOUTS[self.dtype].itemsize

    @property
    def dense(self) -> bool:
        return self.bitmap is None

    def streams(self) -> HuffStreams:
        """The streams exactly as declared: nnz residuals, the bytes of nbits bits."""
        rb = self.params.layout.residual_bytes
        return HuffStreams(self.params, np.frombuffer(self.residuals, np.uint8, self.nnz * rb),
                           np.frombuffer(self.bits, np.uint8, -(-self.params.nbits // 8)),
                           self.tile_bits, self.chunk_bits)

    def reference(self) -> np.ndarray:
        """The reference decoders on these exact inputs (raise DecodeError when they are bad)."""
        if self.dense:
            return decode_values_reference(self.streams(), dense_tile_offsets(self.n), self.nnz)
        check_tile_offsets(self.offsets, self.n, self.nnz)
        vals = decode_values_reference(self.streams(), self.offsets, self.nnz)
        return decode_bitmap_reference(self.bitmap, vals, self.offsets, self.n)


def _padded(rng, data: bytes, capacity: str) -> bytes:
    if capacity == "page":  # as in a file: the segment padded to 4096 bytes, here with garbage
        data += rng.integers(1, 256, pad_to_page(len(data)) - len(data), dtype=np.uint8).tobytes()
    return data


def huff_tensor(rng, bits: np.ndarray, dtype: str, *, dense: bool, capacity: str = "exact",
                label: str = "t", params: ExpHuff | None = None) -> HuffTensor:
    """``bits`` (element bit patterns) as an exphuff tensor: every element a value (``dense``) or
    the non-zeros under a bitmap; the code is the best for the values, or ``params``' lengths."""
    layout = LAYOUTS[dtype]
    if dense:
        bitmap = offsets = None
        values, tiles = bits, dense_tile_offsets(bits.size)
    else:
        enc = encode_bitmap(bits)
        bitmap, offsets, values, tiles = enc.bitmap.copy(), enc.tile_offsets.copy(), enc.values, enc.tile_offsets
    if params is None:
        params = best_exphuff(exponent_histogram(values, layout), layout)
    s = encode_values(values, tiles, ExpHuff(layout, params.lengths))
    return HuffTensor(dtype, bits.size, bitmap, offsets, values.size, s.params,
                      _padded(rng, s.residuals.tobytes(), capacity), _padded(rng, s.bits.tobytes(), capacity),
                      s.tile_bits.copy(), s.chunk_bits.copy(), label)


def make_exphuff_tensor(rng, n, dtype, density, capacity="exact", label="t", *, dense=None,
                        outliers=False) -> HuffTensor:
    """Weights (bitgen.weight_bits, ``density`` of them kept) as an exphuff tensor; dense (no
    bitmap) by default when nothing is pruned."""
    bits = weight_bits(rng, n, dtype, density, outliers=outliers)
    return huff_tensor(rng, bits, dtype, dense=density >= 1.0 if dense is None else dense,
                       capacity=capacity, label=label)


def deep_code_tensor(rng, dtype, n=3 * TILE_ELEMS + 100, *, dense=True, capacity="exact",
                     label="deep") -> HuffTensor:
    """Codes up to the 12-bit limit (tests/codec/test_exphuff.py::test_code_lengths_limited_and_complete):
    30 exponents with Fibonacci counts give Huffman lengths up to 29, cut to 12. The first tile
    holds the rarest exponents (the longest codes, whole chunks of 12-bit codes), the rest every
    exponent at random; random residual bits. Sparse: a third of the elements zeroed."""
    layout = LAYOUTS[dtype]
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    first = 1 if dtype == "F16" else 100  # 30 exponents: fp16 has 31 usable
    hist = np.zeros(1 << layout.exp_bits, dtype=np.int64)
    hist[first:first + 30] = fib
    lengths = code_lengths(hist)
    assert lengths.max() == 12
    order = np.argsort(-lengths[first:first + 30], kind="stable") + first
    exps = np.concatenate([np.repeat(order, -(-TILE_ELEMS // 30))[:TILE_ELEMS],
                           rng.integers(first, first + 30, max(0, n - TILE_ELEMS))])[:n]
    res = rng.integers(0, 1 << (layout.man_bits + 1), n, dtype=np.int64)
    bits = ((res >> layout.man_bits) << (8 * layout.itemsize - 1) | exps.astype(np.int64) << layout.man_bits
            | (res & ((1 << layout.man_bits) - 1))).astype(layout.bits)
    if not dense:
        bits[rng.random(n) < 1 / 3] = 0
    return huff_tensor(rng, bits, dtype, dense=dense, capacity=capacity, label=label,
                       params=ExpHuff(layout, tuple(int(x) for x in lengths)))


def exphuff_corrupt_cases(rng, dtype) -> dict[str, tuple[HuffTensor, int]]:
    """Corrupted copies of one sparse exphuff tensor of 6 tiles (5 * 4096 + 17 elements, half of
    them values) and of one dense tensor, each with the error key the kernel must report when the
    tensor is descriptor 1 of its table."""
    n = 5 * TILE_ELEMS + 17
    base = make_exphuff_tensor(rng, n, dtype, 0.5, "exact", "corrupt")
    counts = np.diff(base.offsets.astype(np.int64))
    assert counts[1] <= 6 * CHUNK_VALUES, "tile 1 needs empty chunks 6 and 7"
    tb, cb = base.tile_bits, base.chunk_bits
    per = CHUNKS_PER_TILE - 1
    cases = {}

    def with_(t=base, **kw):
        return replace(t, **{k: v.copy() if isinstance(v, np.ndarray) else v for k, v in kw.items()})

    for name, j, delta in (("tile bits +1", 2, 1), ("tile bits -1", 2, -1)):
        t = with_(tile_bits=tb)
        t.tile_bits[j] = int(t.tile_bits[j]) + delta  # tile 1 ends, tile 2 starts, a bit away from their codes
        cases[name] = (t, key(1, 1, BAD_BITS))
    for delta in (1, -1, 2, -2):
        t = with_(chunk_bits=cb)
        t.chunk_bits[per * 1 + 1] = int(t.chunk_bits[per * 1 + 1]) + delta  # tile 1, chunk 2 starts a bit or two away
        cases[f"chunk offset {delta:+d}"] = (t, key(1, 1, BAD_BITS))
    t = with_(chunk_bits=cb)
    t.chunk_bits[per * 1 + 5] = int(t.chunk_bits[per * 1 + 5]) - 1  # tile 1, chunk 6 (empty): before the end
    cases["empty chunk not at the end"] = (t, key(1, 1, BAD_BITS))
    t = with_(chunk_bits=cb)
    t.chunk_bits[per * 5] = int(t.chunk_bits[per * 5]) + 1  # the last tile (17 elements): chunk 1 past the tile's end
    cases["chunk past the tile end"] = (t, key(1, 5, BAD_BITS))
    t = with_(tile_bits=tb)
    t.tile_bits[0] = 1
    cases["tile bits not from 0"] = (t, key(1, 0, BAD_BITS))
    t = with_(tile_bits=tb)
    t.tile_bits[3] = 0xFFFFFFFF  # far past the stream: nothing may be read there
    cases["tile bits huge"] = (t, key(1, 2, BAD_BITS))
    t = with_(tile_bits=tb)
    t.tile_bits[2] = int(t.tile_bits[1]) - 1
    cases["tile bits decreasing"] = (t, key(1, 1, BAD_BITS))
    # bits cut short: the stream a byte shorter, the code bound to 8 bits fewer
    nbits = base.params.nbits - 8
    short = with_(params=replace(base.params, nbits=nbits), bits=base.bits[: -(-nbits // 8)])
    past = np.flatnonzero(tb[1:].astype(np.int64) > nbits)
    cases["bits cut short"] = (short, key(1, int(min(past[0], tb.size - 2)), BAD_BITS))
    # a hole in the code: the last symbol in canonical order dropped (no other code changes), so
    # its codes decode to no exponent; the first tile holding that exponent is bad
    lengths = np.asarray(base.params.lengths)
    used = np.flatnonzero(lengths)
    last = max(used, key=lambda s: (lengths[s], s))
    assert canonical_codes(lengths)[last] == (1 << int(lengths[last])) - 1  # the code is complete
    holed = list(base.params.lengths)
    holed[last] = 0
    exps = _value_exponents(base)
    tiles = np.searchsorted(base.offsets.astype(np.int64), np.flatnonzero(exps == last), side="right") - 1
    cases["code table with a hole"] = (with_(params=replace(base.params, lengths=tuple(holed))),
                                       key(1, int(tiles[0]), BAD_BITS))
    b = base.bitmap.copy()
    b[200] ^= 1  # tile 1's popcount changes: found before any code is read
    cases["bitmap flip"] = (with_(bitmap=b), key(1, 1, COUNT_MISMATCH))
    t = with_(offsets=base.offsets)
    t.offsets[3] = 0xFFFFFFFF
    cases["tile offset huge"] = (t, key(1, 2, BAD_OFFSETS))
    dense = make_exphuff_tensor(rng, 3 * TILE_ELEMS + 5, dtype, 1.0, "exact", "corrupt-dense")
    t = with_(dense, tile_bits=dense.tile_bits)
    t.tile_bits[2] = int(t.tile_bits[2]) + 1
    cases["dense tile bits +1"] = (t, key(1, 1, BAD_BITS))
    t = with_(dense, chunk_bits=dense.chunk_bits)
    t.chunk_bits[per * 3] = 0  # the 5-element last tile: chunk 1 is empty, must start at the end
    cases["dense empty chunk at 0"] = (t, key(1, 3, BAD_BITS))
    return cases


def _value_exponents(t: HuffTensor) -> np.ndarray:
    """The exponent of each of ``t``'s values (decoded by the reference)."""
    layout = t.params.layout
    vals = t.reference()
    if not t.dense:
        vals = vals[vals != 0]
    return (vals.astype(np.int64) >> layout.man_bits) & ((1 << layout.exp_bits) - 1)
