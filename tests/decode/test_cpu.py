import re
from dataclasses import replace

import crc32c
import numpy as np
import pytest
from bitgen import SIZES, random_bits, weight_bits
from decode_cases import corrupt_cases, expdict_corrupt_cases

from endor_gds.codec.bitmap import TILE_ELEMS, decode_bitmap_reference, encode_bitmap
from endor_gds.decode.cpu import CpuDecoder, cpu_features, crc32c_combine
from endor_gds.errors import DecodeError

# Every code path this CPU can run: all features (the default), none (portable C), and the subsets
# that swap one SIMD routine for its fallback (without pdep: the scalar field spread; without avx2:
# the scalar 2-byte expdict rebuild). Subsets naming a feature this CPU lacks are left out.
_PATHS = [(1, True), (2, True), (3, False), (2, ("ssse3",)), (2, ("ssse3", "avx2"))]
_PATHS = [(t, s) for t, s in _PATHS if isinstance(s, bool) or set(s) <= set(cpu_features())]


def _path_id(path) -> str:
    threads, simd = path
    name = {True: "all", False: "scalar"}[simd] if isinstance(simd, bool) else "+".join(simd)
    return f"{threads}thr-{name}"


@pytest.fixture(scope="module", params=_PATHS, ids=_path_id)
def decoder(request):
    threads, simd = request.param
    with CpuDecoder(threads, simd=simd) as d:
        yield d


def test_simd_feature_selection(monkeypatch):
    with CpuDecoder(1) as d:
        assert d.features == cpu_features()
    with CpuDecoder(1, simd=False) as d:
        assert d.features == () and d.simd_name == "scalar"
    with pytest.raises(ValueError, match="unknown SIMD feature 'sse9'"):
        CpuDecoder(1, simd=("ssse3", "sse9"))
    monkeypatch.setattr("endor_gds.decode.cpu.cpu_features", lambda: ("ssse3",))
    with CpuDecoder(1, simd="ssse3") as d:  # one name alone, not its letters
        assert d.simd_name == "ssse3"
    with pytest.raises(ValueError, match="this CPU lacks SIMD feature 'avx2'"):
        CpuDecoder(1, simd=("avx2",))


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


# -- codec expdict (format v2) ------------------------------------------------------------------

def _expdict_item(rng, n, dtype, density, kind, index_bits=None):
    """(bitmap, streams, tile offsets, poisoned out) and the tensor's dense bits."""
    from decode_cases import encode_expdict, expdict_bits  # noqa: PLC0415

    bits = expdict_bits(rng, n, dtype, density, kind)
    enc, streams = encode_expdict(bits, dtype, index_bits)
    return (enc.bitmap, streams, enc.tile_offsets, _poisoned(n, bits.dtype)), bits


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("n", (0,) + SIZES + (300_001,))
@pytest.mark.parametrize("kind", ["weights", "outliers", "uniform"])
def test_expdict_bit_exact_against_reference(decoder, rng, dtype, n, kind):
    from endor_gds.codec.expdict import decode_values_reference  # noqa: PLC0415

    for density in (0.5, 1.0, 0.1):
        for b in (None, 1, 4):
            item, bits = _expdict_item(rng, n, dtype, density, kind, b)
            bitmap, streams, offs, out = item
            ref = decode_bitmap_reference(bitmap, decode_values_reference(streams, offs, streams.nnz),
                                          offs, n)
            np.testing.assert_array_equal(ref, bits)
            decoder.decode([item])
            np.testing.assert_array_equal(out, ref, err_msg=f"{dtype} n={n} {kind} d={density} b={b}")


def test_expdict_and_raw_in_one_call(decoder, rng):
    items, refs = [], []
    for n, dtype, kind in [(5000, "BF16", "outliers"), (33, "F32", "weights"), (70_000, "F16", "outliers"),
                           (1, "BF16", "weights"), (4097, "F32", "uniform")]:
        item, bits = _expdict_item(rng, n, dtype, 0.5, kind)
        items.append(item)
        refs.append(bits)
        raw_bits = random_bits(rng, n, bits.itemsize, 0.5)
        enc = encode_bitmap(raw_bits)
        items.append((enc.bitmap, enc.values, enc.tile_offsets, _poisoned(n, raw_bits.dtype)))
        refs.append(raw_bits)
    decoder.decode(items)
    for item, ref in zip(items, refs):
        np.testing.assert_array_equal(item[3], ref)


def _expdict_corrupt_cases(rng):
    """Inconsistent expdict inputs for a 6-tile bf16 tensor with escapes in its first tiles."""
    from dataclasses import replace  # noqa: PLC0415

    n = 5 * TILE_ELEMS + 17
    (bitmap, s, offs, _), _bits = _expdict_item(rng, n, "BF16", 0.5, "outliers", 1)
    assert (np.diff(s.escape_offsets.astype(int))[:3] >= 2).all(), "tiles 0-2 need two escapes"
    cases = {}
    eo = s.escape_offsets.copy()
    eo[2] += 1  # tile 1 ends, tile 2 starts, one escape later
    cases["escape offset +1"] = (bitmap, replace(s, escape_offsets=eo), offs)
    eo = s.escape_offsets.copy()
    eo[3] = 0xFFFFFFFF
    cases["escape offset huge"] = (bitmap, replace(s, escape_offsets=eo), offs)
    pos = s.escape_positions.copy()
    pos[s.escape_offsets[1] + 1] = pos[s.escape_offsets[1]]  # tile 1: a position repeated
    cases["position repeated"] = (bitmap, replace(s, escape_positions=pos), offs)
    pos = s.escape_positions.copy()
    pos[s.escape_offsets[2] - 1] = 4095  # tile 1 has about 2048 values: past its end
    cases["position past the tile"] = (bitmap, replace(s, escape_positions=pos), offs)
    o = offs.copy()
    o[2] += 7
    cases["tile offset +7"] = (bitmap, s, o)
    b = bitmap.copy()
    b[200] ^= 0xFFFF
    cases["bitmap flip"] = (b, s, offs)
    cases["all ones"] = (np.full_like(bitmap, 0xFFFFFFFF), s, offs)
    return n, cases


def test_expdict_inconsistent_input_is_decode_error(decoder, rng):
    from endor_gds.codec.expdict import decode_values_reference  # noqa: PLC0415

    n, cases = _expdict_corrupt_cases(rng)
    for label, (bitmap, streams, offs) in cases.items():
        with pytest.raises(DecodeError):  # the reference refuses the same input
            decode_bitmap_reference(bitmap, decode_values_reference(streams, offs, streams.nnz), offs, n)
        out = np.zeros(n, dtype="<u2")
        with pytest.raises(DecodeError, match="disagrees"):
            decoder.decode([(bitmap, streams, offs, out)], where=[label])


def test_expdict_argument_checks(decoder, rng):
    from dataclasses import replace  # noqa: PLC0415

    from endor_gds.codec.expdict import LAYOUTS, ExpDict  # noqa: PLC0415

    (bitmap, s, offs, out), _ = _expdict_item(rng, 5000, "F16", 0.5, "outliers", 2)
    cases = [
        (replace(s, codes=s.codes[:-1]), "codes holds"),
        (replace(s, escape_offsets=s.escape_offsets[:-1]), "escape_offsets must be 3 uint32"),
        (replace(s, escape_positions=s.escape_positions.astype("<u4")), "escape_positions"),
        (replace(s, escape_values=s.escape_values[:-1]), "escape_values"),
        (replace(s, params=replace(s.params, layout=LAYOUTS["F32"])), "out is 2-byte"),
        (replace(s, params=ExpDict(LAYOUTS["F16"], 2, (1, 1, 2, 3), s.params.escapes)), "distinct"),
        (replace(s, residuals=s.residuals[::2]), "C-contiguous"),
    ]
    for streams, match in cases:
        with pytest.raises(ValueError, match=match):
            decoder.decode([(bitmap, streams, offs, out)])


@pytest.mark.parametrize("codec", ["raw", "expdict"])
def test_kernel_corruptions_name_the_kernels_tile(rng, codec):
    """Every corruption the CUDA kernel's tests report is a DecodeError here too, naming the tile
    the kernel names; among them a table shifted by 3 and an escape table not starting at 0,
    consistent tile by tile, which this decoder once decoded silently 3 values off."""
    cases = corrupt_cases(rng, 2) if codec == "raw" else expdict_corrupt_cases(rng, "F16")
    with CpuDecoder(1) as d:
        for label, (t, key) in cases.items():
            values = np.frombuffer(t.values, "<u2", count=t.nnz) if codec == "raw" else t.streams()
            tile = (key >> 8) & 0xFFFFFFFF
            with pytest.raises(DecodeError, match=rf"^{re.escape(label)}: tile {tile} "):
                d.decode([(t.bitmap, values, t.offsets, np.zeros(t.n, "<u2"))], where=[label])


# -- codec exphuff (issue 22: the C decoder of the reference in codec/exphuff.py) ----------------


def _exphuff_case(rng, n, dtype, density):
    """(bitmap or None, streams, tile offsets or None, the bit patterns): a dense tensor when
    ``density`` is 1, else bitmap + non-zeros; weights with outliers and every special pattern."""
    from endor_gds.codec import exphuff  # noqa: PLC0415 - this section's module
    from endor_gds.codec.expdict import LAYOUTS, exponent_histogram  # noqa: PLC0415

    layout = LAYOUTS[dtype]
    bits = weight_bits(rng, n, dtype, density, outliers=True) if n else np.zeros(0, layout.bits)
    if density == 1.0:
        values, offsets, bitmap = bits, exphuff.dense_tile_offsets(n), None
    else:
        enc = encode_bitmap(bits)
        values, offsets, bitmap = enc.values, enc.tile_offsets, enc.bitmap
    params = exphuff.best_exphuff(exponent_histogram(values, layout), layout)
    return bitmap, exphuff.encode_values(values, offsets, params), (None if bitmap is None else offsets), bits


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.02])
@pytest.mark.parametrize("n", [1, 4097, 3 * TILE_ELEMS, 9 * TILE_ELEMS + 5])
def test_exphuff_bit_exact(decoder, rng, dtype, density, n):
    """Fewer tiles than are decoded side by side, a multiple of them, and tails; dense tensors
    (no bitmap) and sparse ones: the same bits as the numpy reference's input."""
    bitmap, streams, offsets, bits = _exphuff_case(rng, n, dtype, density)
    out = _poisoned(n, bits.dtype)
    decoder.decode([(bitmap, streams, offsets, out)])
    np.testing.assert_array_equal(out, bits)


def test_exphuff_inconsistent_input_is_decode_error(rng):
    """Tables that disagree with the stream, and a stream cut short, are DecodeErrors and nothing
    is read out of bounds. (Flipped bits inside the stream can decode to other values of the same
    total length, the prefix code resynchronising: that is the CRC's to catch, not the decoder's.)"""
    from endor_gds.codec.exphuff import HuffStreams  # noqa: PLC0415

    n = 9 * TILE_ELEMS + 5
    with CpuDecoder(2) as d:
        for density in (1.0, 0.5):
            bitmap, s, offsets, bits = _exphuff_case(rng, n, "F16", density)
            cases = {}
            tb = s.tile_bits.copy()
            tb[3] += 1
            cases["tile bits +1"] = HuffStreams(s.params, s.residuals, s.bits, tb, s.chunk_bits)
            tb = s.tile_bits.copy()
            tb[5] = 0xFFFFFFFF  # far past the stream: must not be read
            cases["tile bits huge"] = HuffStreams(s.params, s.residuals, s.bits, tb, s.chunk_bits)
            short = s.bits[: s.bits.size * 2 // 3].copy()  # the stream (and its length) cut short
            cases["bits cut short"] = HuffStreams(replace(s.params, nbits=8 * short.size), s.residuals, short,
                                                  s.tile_bits, s.chunk_bits)
            tb = s.tile_bits.copy()
            tb[-1] -= 1  # the last tile ends a bit before the stream does
            cases["last tile short"] = HuffStreams(s.params, s.residuals, s.bits, tb, s.chunk_bits)
            for where, delta in ((0, 1), (1, -1), (6, 1), (7 * 4 + 2, 5)):
                cb = s.chunk_bits.copy()  # a chunk offset off by a few bits, up or down
                cb[where] = (int(cb[where]) + delta) % 65536
                cases[f"chunk bits {where} {delta:+d}"] = HuffStreams(s.params, s.residuals, s.bits, s.tile_bits, cb)
            cb = s.chunk_bits.copy()
            cb[7 * 9 + 6] = 0xFFFF  # last tile: an empty chunk must start at the tile's end
            cases["empty chunk elsewhere"] = HuffStreams(s.params, s.residuals, s.bits, s.tile_bits, cb)
            for label, bad in cases.items():
                out = np.zeros(n, dtype=bits.dtype)
                with pytest.raises(DecodeError, match="disagrees"):
                    d.decode([(bitmap, bad, offsets, out)], where=[label])
            with pytest.raises(ValueError, match="tile_bits must be"):
                d.decode([(bitmap, HuffStreams(s.params, s.residuals, s.bits, s.tile_bits[:-1], s.chunk_bits),
                           offsets, np.zeros(n, dtype=bits.dtype))])
            with pytest.raises(ValueError, match="the code is bound to"):
                d.decode([(bitmap, HuffStreams(s.params, s.residuals, s.bits[:-1], s.tile_bits, s.chunk_bits),
                           offsets, np.zeros(n, dtype=bits.dtype))])
            with pytest.raises(ValueError, match="chunk_bits must be"):
                d.decode([(bitmap, HuffStreams(s.params, s.residuals, s.bits, s.tile_bits, s.chunk_bits[:-1]),
                           offsets, np.zeros(n, dtype=bits.dtype))])
        with pytest.raises(ValueError, match="a dense exphuff tensor"):  # residuals of fewer values
            bitmap, s, offsets, bits = _exphuff_case(rng, n, "BF16", 1.0)
            d.decode([(None, HuffStreams(s.params, s.residuals[:-1], s.bits, s.tile_bits, s.chunk_bits), None,
                       np.zeros(n, dtype=bits.dtype))])


@pytest.mark.parametrize("seed", range(4))
def test_crc32c_combine_matches_the_whole(seed):
    """crc32c_combine(crc(A), crc(B), len(B)) == crc(A + B) for any split, lengths 0 to MiBs."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    for a, b in [(0, 0), (0, 1), (1, 0), (5, 7), (4096, 4096), (1 << 20, (3 << 20) - (1 << 20))] + \
            [tuple(sorted(rng.integers(0, len(data), 2))) for _ in range(20)]:
        head, tail = data[:a], data[a:a + b]
        assert crc32c_combine(crc32c.crc32c(head), crc32c.crc32c(tail), len(tail)) == \
            crc32c.crc32c(head + tail), (a, b)
