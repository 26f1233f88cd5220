"""Decoder test inputs shared by the emulated and the GPU kernel tests: valid tensors as the file
holds them (raw values, format v1, or the expdict codec, format v2), and corrupted ones with the
first bad (tile, reason) a decoder must report."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from bitgen import random_bits, weight_bits

from endor_gds.codec.bitmap import TILE_ELEMS, decode_bitmap_reference, encode_bitmap, pad_to_page
from endor_gds.codec.expdict import (
    LAYOUTS,
    ExpDict,
    Streams,
    _dictionary,
    best_expdict,
    decode_values_reference,
    encode_values,
    exponent_histogram,
)

BAD_OFFSETS, BITS_PAST_END, COUNT_MISMATCH, BAD_ESCAPES = 1, 2, 3, 4  # endor::Reason (cuda/)


@dataclass
class Tensor:
    """One descriptor's inputs as the file would hold them, and what decoding must give."""

    elem_bytes: int
    n: int
    bitmap: np.ndarray  # uint32 words
    values: bytes  # values_capacity bytes (packed values, then padding if any)
    offsets: np.ndarray  # uint32, ntiles + 1
    nnz: int  # declared in the descriptor
    label: str = "t"
    # codec expdict: `values` holds the residuals (then padding), these the other streams
    expdict: ExpDict | None = None
    codes: bytes = b""  # codes_capacity bytes
    escape_offsets: np.ndarray | None = None  # uint32, ntiles + 1
    escape_positions: np.ndarray | None = None  # uint16, expdict.escapes
    escape_values: np.ndarray | None = None  # element bit patterns, expdict.escapes

    def streams(self) -> Streams:
        """The expdict streams exactly as declared: nnz residuals, the codes nnz values need."""
        p = self.expdict
        need = p.stream_nbytes(self.nnz)
        return Streams(p, np.frombuffer(self.values, np.uint8, need["residuals"]),
                       np.frombuffer(self.codes, np.uint8, need["codes"]), self.escape_offsets,
                       self.escape_positions, self.escape_values)

    def reference(self) -> np.ndarray:
        """The reference decoders on these exact inputs (raise DecodeError when they are bad)."""
        dt = np.dtype("<u2") if self.elem_bytes == 2 else np.dtype("<u4")
        if self.expdict is None:
            vals = np.frombuffer(self.values, dtype=dt, count=self.nnz)
        else:
            from endor_gds.codec.bitmap import check_tile_offsets  # noqa: PLC0415

            check_tile_offsets(self.offsets, self.n, self.nnz)
            vals = decode_values_reference(self.streams(), self.offsets, self.nnz)
        return decode_bitmap_reference(self.bitmap, vals, self.offsets, self.n)


def make_tensor(rng, n, elem_bytes, density, capacity="exact", label="t") -> Tensor:
    bits = random_bits(rng, n, elem_bytes, density)
    enc = encode_bitmap(bits)
    values = _padded(rng, enc.values.tobytes(), capacity)
    return Tensor(elem_bytes, n, enc.bitmap.copy(), values, enc.tile_offsets.copy(), enc.nnz, label)


def _padded(rng, data: bytes, capacity: str) -> bytes:
    if capacity == "page":  # as in a file: the segment padded to 4096 bytes, here with garbage
        data += rng.integers(1, 256, pad_to_page(len(data)) - len(data), dtype=np.uint8).tobytes()
    return data


def expdict_bits(rng, n, dtype, density, kind="outliers") -> np.ndarray:
    """Inputs for codec expdict tests: ``weights`` (N(0, 0.02), magnitude-pruned), ``outliers``
    (the same with rare far exponents and special patterns: escapes) or ``uniform`` bit patterns
    (every exponent about as likely: escapes everywhere, codec raw wins)."""
    if kind == "uniform":
        return random_bits(rng, n, LAYOUTS[dtype].itemsize, density)
    return weight_bits(rng, n, dtype, density, outliers=kind == "outliers")


def encode_expdict(bits, dtype, index_bits=None):
    """(bitmap encoding, expdict Streams) of ``bits``, with the packer's index width or the given."""
    layout = LAYOUTS[dtype]
    enc = encode_bitmap(bits)
    hist = exponent_histogram(enc.values, layout)
    p = best_expdict(hist, bits.size, layout)[0] if index_bits is None else \
        ExpDict(layout, index_bits, *_dictionary(hist, index_bits))
    return enc, encode_values(enc.values, enc.tile_offsets, p)


def make_expdict_tensor(rng, n, dtype, density, capacity="exact", label="t", *, kind="outliers",
                        index_bits=None) -> Tensor:
    """A tensor with codec expdict (see expdict_bits for ``kind``), the best or the given index
    width."""
    layout = LAYOUTS[dtype]
    enc, s = encode_expdict(expdict_bits(rng, n, dtype, density, kind), dtype, index_bits)
    p = s.params
    return Tensor(layout.itemsize, n, enc.bitmap.copy(), _padded(rng, s.residuals.tobytes(), capacity),
                  enc.tile_offsets.copy(), enc.nnz, label, p, _padded(rng, s.codes.tobytes(), capacity),
                  s.escape_offsets.copy(), s.escape_positions.copy(), s.escape_values.copy())


def key(desc, tile, reason):
    return desc << 40 | tile << 8 | reason


def corrupt_cases(rng, eb) -> dict[str, tuple[Tensor, int]]:
    """Corrupted copies of one tensor of 6 tiles (5 * 4096 + 17 elements), each with the error key
    the kernel must report when the tensor is descriptor 1 of its table."""
    n = 5 * TILE_ELEMS + 17
    base = make_tensor(rng, n, eb, 0.5, "exact", "corrupt")

    def variant(bitmap=None, offsets=None, nnz=None):
        t = Tensor(eb, n, base.bitmap.copy() if bitmap is None else bitmap,
                   base.values, base.offsets.copy() if offsets is None else offsets,
                   base.nnz if nnz is None else nnz, "corrupt")
        if nnz is not None:
            t.values = base.values[: nnz * eb]
        return t

    cases = {}
    b = base.bitmap.copy()
    b[200] ^= 1  # word 200 is in tile 1: its popcount changes
    cases["bitmap flip"] = (variant(bitmap=b), key(1, 1, COUNT_MISMATCH))
    o = base.offsets.copy()
    o[2] += 7
    cases["offset +7"] = (variant(offsets=o), key(1, 1, COUNT_MISMATCH))
    o = base.offsets.copy()
    o[3] = 0xFFFFFFFF  # far past the values: must not be read
    cases["offset huge"] = (variant(offsets=o), key(1, 2, BAD_OFFSETS))
    o = base.offsets.copy()
    o[2] = o[1] - 1
    cases["decreasing"] = (variant(offsets=o), key(1, 1, BAD_OFFSETS))
    o = base.offsets.copy()
    o[1] = 5000  # tile 0 would claim 5000 > 4096 values
    cases["tile claims 5000"] = (variant(offsets=o), key(1, 0, BAD_OFFSETS))
    o = base.offsets.copy()
    o[0] = 1
    cases["first not 0"] = (variant(offsets=o), key(1, 0, BAD_OFFSETS))
    o = base.offsets.copy()
    o[-1] = base.nnz + 10
    cases["last past nnz"] = (variant(offsets=o), key(1, 5, BAD_OFFSETS))
    short = base.nnz - 100  # the first tile whose end passes the declared nnz is reported
    first_past = int(np.flatnonzero(base.offsets[1:] > short)[0])
    cases["nnz short"] = (variant(nnz=short), key(1, first_past, BAD_OFFSETS))
    longer = variant(nnz=base.nnz)  # 5 more values declared than the table accounts for
    longer.nnz, longer.values = base.nnz + 5, base.values + bytes(5 * eb)
    cases["nnz long"] = (longer, key(1, 5, BAD_OFFSETS))
    shifted = variant(offsets=base.offsets + 3)  # consistent tile by tile, but starts at 3
    shifted.nnz, shifted.values = base.nnz + 3, bytes(3 * eb) + base.values
    cases["shifted by 3"] = (shifted, key(1, 0, BAD_OFFSETS))
    b = base.bitmap.copy()
    b[-1] |= np.uint32(1 << 30)  # n % 32 == 17: bit 30 of the last word is past n
    cases["bit past n"] = (variant(bitmap=b), key(1, 5, BITS_PAST_END))
    cases["all ones"] = (variant(bitmap=np.full_like(base.bitmap, 0xFFFFFFFF)),
                         key(1, 0, COUNT_MISMATCH))
    return cases


def expdict_corrupt_cases(rng, dtype) -> dict[str, tuple[Tensor, int]]:
    """Corrupted copies of one expdict tensor of 6 tiles with escapes in its first tiles, each with
    the error key the kernel must report when the tensor is descriptor 1 of its table."""
    from dataclasses import replace  # noqa: PLC0415

    n = 5 * TILE_ELEMS + 17
    base = make_expdict_tensor(rng, n, dtype, 0.5, "exact", "corrupt", index_bits=1)
    eo = base.escape_offsets
    assert (np.diff(eo.astype(np.int64))[:3] >= 2).all(), "tiles 0-2 need two escapes"
    cases = {}

    def with_(**kw):
        return replace(base, **{k: v.copy() if isinstance(v, np.ndarray) else v for k, v in kw.items()})

    t = with_(escape_offsets=eo)
    t.escape_offsets[2] += 1  # tile 1 claims one more escape, tile 2 one fewer
    cases["escape offset +1"] = (t, key(1, 1, BAD_ESCAPES))
    t = with_(escape_offsets=eo)
    t.escape_offsets[3] = 0xFFFFFFFF  # far past the escapes: must not be read
    cases["escape offset huge"] = (t, key(1, 2, BAD_ESCAPES))
    t = with_(escape_offsets=eo)
    t.escape_offsets[0] = 1
    cases["escapes not from 0"] = (t, key(1, 0, BAD_ESCAPES))
    t = with_(escape_offsets=eo)
    t.escape_offsets[-1] -= 1
    cases["escapes not to the end"] = (t, key(1, 5, BAD_ESCAPES))
    t = with_(escape_positions=base.escape_positions)
    t.escape_positions[eo[1] + 1] = t.escape_positions[eo[1]]  # tile 1: a position repeated
    cases["position repeated"] = (t, key(1, 1, BAD_ESCAPES))
    t = with_(escape_positions=base.escape_positions)
    t.escape_positions[eo[3] - 1] = 0xFFFF  # tile 2: far past the tile's values
    cases["position huge"] = (t, key(1, 2, BAD_ESCAPES))
    t = with_(escape_positions=base.escape_positions)
    t.escape_positions[eo[1]] = base.offsets[2] - base.offsets[1]  # tile 1: one past its values
    cases["position one past"] = (t, key(1, 1, BAD_ESCAPES))
    t = with_(offsets=base.offsets)
    t.offsets[2] += 7  # tile offsets are checked as for raw values
    cases["tile offset +7"] = (t, key(1, 1, COUNT_MISMATCH))
    t = with_(bitmap=base.bitmap)
    t.bitmap[200] ^= 1
    cases["bitmap flip"] = (t, key(1, 1, COUNT_MISMATCH))
    t = with_(offsets=base.offsets)
    t.offsets[3] = 0xFFFFFFFF  # bad tile offsets are found before the escape offsets are read
    cases["offset huge"] = (t, key(1, 2, BAD_OFFSETS))
    return cases
