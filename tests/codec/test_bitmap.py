import numpy as np
import pytest
import torch
from bitgen import SIZES, SPECIALS, random_bits

from endor_gds.codec.bitmap import (
    DTYPES,
    PAGE,
    TILE_ELEMS,
    bits_view,
    break_even_density,
    check_tile_offsets,
    choose_encoding,
    decode_bitmap_reference,
    encode_bitmap,
    num_tiles,
    stored_nbytes,
)
from endor_gds.errors import DecodeError


@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize("n", (0,) + SIZES)
@pytest.mark.parametrize("density", [0.0, 1.0, 0.5, 0.03])
def test_round_trip_bit_exact(rng, n, itemsize, density):
    bits = random_bits(rng, n, itemsize, density)
    enc = encode_bitmap(bits)
    assert enc.bitmap.dtype == np.dtype("<u4") and enc.bitmap.size == -(-n // 32)
    assert enc.tile_offsets.size == num_tiles(n) + 1
    assert enc.nnz == int(np.count_nonzero(bits))
    out = decode_bitmap_reference(enc.bitmap, enc.values, enc.tile_offsets, n)
    assert out.dtype == bits.dtype
    np.testing.assert_array_equal(out, bits)


def test_values_are_row_major_and_bitmap_is_little_endian():
    bits = np.array([0, 7, 0, 0, 9] + [0] * 28 + [5], dtype="<u2")  # 34 elements
    enc = encode_bitmap(bits)
    np.testing.assert_array_equal(enc.values, [7, 9, 5])
    assert enc.bitmap.tolist() == [(1 << 1) | (1 << 4), 1 << 1]
    assert enc.bitmap.tobytes()[:1] == bytes([0b00010010])
    assert enc.tile_offsets.tolist() == [0, 3]


def test_specials_survive_through_torch_views():
    for name, itemsize in (("F16", 2), ("BF16", 2), ("F32", 4)):
        d = DTYPES[name]
        t = torch.from_numpy(SPECIALS[itemsize].copy().view(np.uint8)).view(d.torch)
        enc = encode_bitmap(bits_view(t))
        assert enc.nnz == t.numel()  # -0.0 is a non-zero bit pattern: kept
        back = decode_bitmap_reference(enc.bitmap, enc.values, enc.tile_offsets, t.numel())
        assert back.tobytes() == SPECIALS[itemsize].tobytes(), name


def test_tile_offsets_count_values_before_each_tile():
    n = 3 * TILE_ELEMS + 5
    bits = np.zeros(n, dtype="<u2")
    bits[[0, 1, TILE_ELEMS + 3, 3 * TILE_ELEMS + 4]] = 1
    enc = encode_bitmap(bits)
    assert enc.tile_offsets.tolist() == [0, 2, 3, 3, 4]


@pytest.mark.parametrize("mutate, match", [
    (lambda o: o[:-1], "entries"),
    (lambda o: np.concatenate([[1], o[1:]]).astype("<u4"), "from 0 to nnz"),
    (lambda o: np.concatenate([o[:-1], [o[-1] + 1]]).astype("<u4"), "from 0 to nnz"),
    (lambda o: np.array([0, 5, 3, 8], dtype="<u4"), "non-decreasing"),
    (lambda o: np.array([0, TILE_ELEMS + 1, TILE_ELEMS + 2, 8], dtype="<u4"), "non-decreasing"),
])
def test_check_tile_offsets_rejects(mutate, match):
    n = 3 * TILE_ELEMS
    good = np.array([0, 3, 5, 8], dtype="<u4")
    check_tile_offsets(good, n, 8)
    with pytest.raises(DecodeError, match=match):
        check_tile_offsets(mutate(good), n, 8)


def test_reference_decoder_rejects_bitmap_offsets_mismatch(rng):
    bits = random_bits(rng, 2 * TILE_ELEMS, 2, 0.5)
    enc = encode_bitmap(bits)
    bitmap = enc.bitmap.copy()
    # move one set bit from tile 0 to tile 1: total popcount equal, tiles disagree
    w0 = int(np.flatnonzero(bitmap[:128])[0])
    bit = int(bitmap[w0]) & -int(bitmap[w0])
    bitmap[w0] ^= bit
    w1 = 128 + int(np.flatnonzero(bitmap[128:] != 0xFFFFFFFF)[0])
    free = ~int(bitmap[w1]) & 0xFFFFFFFF
    bitmap[w1] |= free & -free
    with pytest.raises(DecodeError, match="tile 0"):
        decode_bitmap_reference(bitmap, enc.values, enc.tile_offsets, bits.size)


def test_reference_decoder_rejects_bits_past_end():
    enc = encode_bitmap(np.ones(33, dtype="<u2"))
    bitmap = enc.bitmap.copy()
    bitmap[-1] |= 1 << 5
    with pytest.raises(DecodeError, match="past the last element"):
        decode_bitmap_reference(bitmap, enc.values, enc.tile_offsets, 33)


def test_break_even_density_matches_stored_sizes():
    n = 4096 * 4096
    for itemsize in (2, 4):
        d = break_even_density(itemsize)
        below = int(n * (d - 0.002))
        above = int(n * (d + 0.002))
        assert stored_nbytes("bitmap", n, below, itemsize) < stored_nbytes("dense", n, below, itemsize)
        assert stored_nbytes("bitmap", n, above, itemsize) > stored_nbytes("dense", n, above, itemsize)
    assert abs(break_even_density(2) - 0.937) < 1e-3


def test_choose_encoding_rules():
    f16 = DTYPES["F16"]
    assert choose_encoding(f16, (4096,), 0) == "dense"  # 1-D: always dense
    assert choose_encoding(f16, (1024, 1024), 512 * 1024) == "bitmap"
    assert choose_encoding(f16, (1024, 1024), 1024 * 1024) == "dense"  # no zeros
    assert choose_encoding(DTYPES["I64"], (1024, 1024), 0) == "dense"  # not a float type
    assert choose_encoding(f16, (8, 8), 0) == "dense"  # padding makes bitmap bigger
    assert stored_nbytes("dense", 1, 1, 2) == PAGE
