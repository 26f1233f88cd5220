"""Decoder test inputs shared by the emulated and the GPU kernel tests: valid tensors as the file
holds them, and corrupted ones with the first bad (tile, reason) a decoder must report."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from bitgen import random_bits

from endor_gds.format import TILE_ELEMS, decode_bitmap_reference, encode_bitmap, pad_to_page

BAD_OFFSETS, BITS_PAST_END, COUNT_MISMATCH = 1, 2, 3  # endor::Reason in cuda/endor_decode.cu


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

    def reference(self) -> np.ndarray:
        """decode_bitmap_reference of these exact inputs (raises DecodeError when they are bad)."""
        dt = np.dtype("<u2") if self.elem_bytes == 2 else np.dtype("<u4")
        vals = np.frombuffer(self.values, dtype=dt, count=self.nnz)
        return decode_bitmap_reference(self.bitmap, vals, self.offsets, self.n)


def make_tensor(rng, n, elem_bytes, density, capacity="exact", label="t") -> Tensor:
    bits = random_bits(rng, n, elem_bytes, density)
    enc = encode_bitmap(bits)
    values = enc.values.tobytes()
    if capacity == "page":  # as in a file: the segment padded to 4096 bytes, here with garbage
        values += rng.integers(1, 256, pad_to_page(len(values)) - len(values), dtype=np.uint8).tobytes()
    return Tensor(elem_bytes, n, enc.bitmap.copy(), values, enc.tile_offsets.copy(), enc.nnz, label)


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
