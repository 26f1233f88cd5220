import numpy as np
import pytest
from bitgen import SIZES, random_bits

from endor_gds.cpu_decode import CpuDecoder
from endor_gds.errors import DecodeError
from endor_gds.format import TILE_ELEMS, decode_bitmap_reference, encode_bitmap


@pytest.fixture(scope="module", params=[(1, True), (2, True), (3, False)],
                ids=["1thread-simd", "2threads-simd", "3threads-scalar"])
def decoder(request):
    threads, simd = request.param
    with CpuDecoder(threads, simd=simd) as d:
        yield d


def _poisoned(n, dtype):
    out = np.empty(n, dtype=dtype)
    out.fill(np.iinfo(dtype).max)  # an element the decoder forgets to write fails the comparison
    return out


@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize("n", (0,) + SIZES + (300_001,))
@pytest.mark.parametrize("density", [0.0, 1.0, 0.5, 0.1, 0.97])
def test_bit_exact_against_reference(decoder, rng, n, itemsize, density):
    bits = random_bits(rng, n, itemsize, density)
    enc = encode_bitmap(bits)
    ref = decode_bitmap_reference(enc.bitmap, enc.values, enc.tile_offsets, n)
    out = _poisoned(n, bits.dtype)
    decoder.decode([(enc.bitmap, enc.values, enc.tile_offsets, out)])
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize("shift", [0, 1, 3])
def test_misaligned_output(decoder, rng, itemsize, shift):
    """Aligned outputs take the streaming-store path, others the ordinary one: same bits."""
    n = 3 * 4096 + 77
    bits = random_bits(rng, n, itemsize, 0.5)
    enc = encode_bitmap(bits)
    backing = _poisoned(n + 8, bits.dtype)
    out = backing[shift:shift + n]
    assert (out.ctypes.data % 16 == 0) == (shift == 0 and backing.ctypes.data % 16 == 0)
    decoder.decode([(enc.bitmap, enc.values, enc.tile_offsets, out)])
    np.testing.assert_array_equal(out, bits)
    assert (backing[:shift] == np.iinfo(bits.dtype).max).all()  # nothing written outside out
    assert (backing[shift + n:] == np.iinfo(bits.dtype).max).all()


def test_many_tensors_in_one_call(decoder, rng):
    items, refs = [], []
    for n, itemsize in [(5000, 2), (33, 4), (70_000, 2), (1, 2), (4097, 4)]:
        bits = random_bits(rng, n, itemsize, rng.random())
        enc = encode_bitmap(bits)
        out = _poisoned(n, bits.dtype)
        items.append((enc.bitmap, enc.values, enc.tile_offsets, out))
        refs.append(bits)
    decoder.decode(items)
    for (_, _, _, out), ref in zip(items, refs):
        np.testing.assert_array_equal(out, ref)


def _corrupt_cases(rng):
    n = 5 * TILE_ELEMS + 17
    bits = random_bits(rng, n, 2, 0.5)
    enc = encode_bitmap(bits)
    cases = {}
    b = enc.bitmap.copy()
    b[200] ^= 0xFFFF  # tile 1 now has a different popcount than its offsets say
    cases["bitmap flip"] = (b, enc.values, enc.tile_offsets)
    o = enc.tile_offsets.copy()
    o[2] += 7
    cases["offset +7"] = (enc.bitmap, enc.values, o)
    o = enc.tile_offsets.copy()
    o[3] = 0xFFFFFFFF  # points far past the values: must not be read
    cases["offset huge"] = (enc.bitmap, enc.values, o)
    o = enc.tile_offsets.copy()
    o[-1] = enc.nnz + 10
    cases["last past nnz"] = (enc.bitmap, enc.values, o)
    cases["values short"] = (enc.bitmap, enc.values[:-100].copy(), enc.tile_offsets)
    b = enc.bitmap.copy()
    b[-1] |= np.uint32(1 << 30)  # bit past n in the last word
    cases["bit past n"] = (b, enc.values, enc.tile_offsets)
    b = np.full_like(enc.bitmap, 0xFFFFFFFF)  # every bit set: far more than nnz values
    cases["all ones"] = (b, enc.values, enc.tile_offsets)
    return n, cases


def test_inconsistent_input_is_decode_error_not_overrun(decoder, rng):
    n, cases = _corrupt_cases(rng)
    for label, (bitmap, values, offs) in cases.items():
        out = np.zeros(n, dtype="<u2")
        with pytest.raises(DecodeError, match="disagrees"):
            decoder.decode([(bitmap, values, offs, out)], where=[label])


@pytest.mark.parametrize("bad, match", [
    (lambda b, v, o, out: (b[:-1], v, o, out), "bitmap must be"),
    (lambda b, v, o, out: (b, v, o[:-1], out), "tile_offsets must be"),
    (lambda b, v, o, out: (b, v.view(np.uint8), o, out), "values are"),
    (lambda b, v, o, out: (b, v, o, out.astype(np.uint8)), "cannot be bitmap-decoded"),
    (lambda b, v, o, out: (b, v, o, np.zeros(2 * out.size, out.dtype)[::2]), "C-contiguous"),
])
def test_argument_checks(decoder, rng, bad, match):
    bits = random_bits(rng, 1000, 2, 0.5)
    enc = encode_bitmap(bits)
    out = np.zeros(1000, dtype="<u2")
    with pytest.raises(ValueError, match=match):
        decoder.decode([bad(enc.bitmap, enc.values, enc.tile_offsets, out)])
