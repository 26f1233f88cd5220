"""The exphuff value codec's reference (issue 22, first part): bit-exact round trips, the
length-limited canonical code, sizes, and corrupted streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bitgen import SPECIALS, random_bits, weight_bits

from endor_gds.codec import exphuff
from endor_gds.codec.bitmap import TILE_ELEMS, encode_bitmap, pad_to_page
from endor_gds.codec.expdict import LAYOUTS, exponent_histogram
from endor_gds.errors import DecodeError
from endor_gds.packing.prune import magnitude_prune


def _values(rng, n, dtype, density, kind):
    """(values, tile offsets, bitmap or None): a dense tensor's elements with dense tiles, or a
    sparse tensor's non-zeros with its bitmap's tiles."""
    layout = LAYOUTS[dtype]
    if kind == "weights":  # N(0, 0.02), outliers far out, every special pattern
        bits = weight_bits(rng, n, dtype, density, outliers=True)
    elif kind == "uniform":  # every exponent about as likely: the all-symbol alphabet
        bits = random_bits(rng, n, layout.itemsize, density)
    else:  # "one": a single exponent (and zeros)
        bits = np.full(n, 0x3C00 if dtype == "F16" else 0x3F80 if dtype == "BF16" else 0x3F800000,
                       dtype=layout.bits)
        bits[rng.random(n) >= density] = 0
    if density == 1.0 and kind != "one":
        return bits, exphuff.dense_tile_offsets(n), None
    enc = encode_bitmap(bits)
    return enc.values, enc.tile_offsets, enc


def _round_trip(values, offsets, dtype):
    layout = LAYOUTS[dtype]
    hist = exponent_histogram(values, layout)
    params = exphuff.best_exphuff(hist, layout)
    params.check()
    streams = exphuff.encode_values(values, offsets, params)
    back = exphuff.decode_values_reference(streams, offsets, values.size)
    assert back.dtype == values.dtype
    np.testing.assert_array_equal(back, values)
    assert streams.bits.size == -(-params.value_bits(hist) // 8)
    return params, streams, hist


@pytest.mark.parametrize("dtype", tuple(LAYOUTS))
@pytest.mark.parametrize("density", [1.0, 0.5, 0.03])
@pytest.mark.parametrize("kind", ["weights", "uniform", "one"])
def test_round_trip_bit_exact(rng, dtype, density, kind):
    """Dense tensors (no bitmap, every element a value) and sparse ones; -0.0, infinities, NaN
    payloads and subnormals (the SPECIALS of bitgen) survive as patterns; one- and all-symbol
    alphabets; tails of a partial last tile."""
    values, offsets, _ = _values(rng, 3 * TILE_ELEMS + 77, dtype, density, kind)
    params, _, hist = _round_trip(values, offsets, dtype)
    if kind == "weights":
        assert np.isin(SPECIALS[LAYOUTS[dtype].itemsize], values).sum() > 0
    if kind == "one" and hist.sum():
        assert sorted(set(params.lengths)) == [0, 1]


def test_code_lengths_limited_and_complete():
    """Counts growing like Fibonacci numbers make Huffman's code as deep as the alphabet is long:
    the lengths are cut to MAX_CODE_BITS and the code stays complete (Kraft sum exactly 1), and a
    tile made of the rarest exponents, which get the longest codes, round-trips."""
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    hist = np.zeros(256, dtype=np.int64)
    hist[100:130] = fib
    free = exphuff.code_lengths(hist, max_bits=64)
    assert free.max() == 29  # what an unlimited Huffman code does with this histogram
    lengths = exphuff.code_lengths(hist)
    assert lengths.max() == exphuff.MAX_CODE_BITS and (lengths[hist == 0] == 0).all()
    assert sum(2.0 ** -int(x) for x in lengths if x) == 1.0
    # values: the two rarest exponents fill the first tile, the others follow
    layout = LAYOUTS["BF16"]
    order = np.argsort(-lengths[100:130], kind="stable") + 100
    exps = np.concatenate([np.repeat(order, 3)[:TILE_ELEMS], np.repeat(np.arange(100, 130), 200)])
    values = (exps.astype(np.uint16) << 7) | np.uint16(0x55)
    offsets = exphuff.dense_tile_offsets(values.size)
    params = exphuff.ExpHuff(layout, tuple(int(x) for x in lengths))
    streams = exphuff.encode_values(values, offsets, params)
    np.testing.assert_array_equal(exphuff.decode_values_reference(streams, offsets, values.size), values)


def test_within_one_bit_of_the_entropy(rng):
    """An unlimited-length Huffman code spends between H and H + 1 bits per value on the exponent
    (here 50 %-pruned bf16 weights: short codes, no limit reached)."""
    layout = LAYOUTS["BF16"]
    values = encode_bitmap(weight_bits(rng, 200_000, "BF16", 0.5)).values
    hist = exponent_histogram(values, layout)
    p = hist[hist > 0] / hist.sum()
    entropy = float(-(p * np.log2(p)).sum())
    per_value = exphuff.best_exphuff(hist, layout).value_bits(hist) / hist.sum()
    assert entropy <= per_value < entropy + 1
    print(f"\nexponent: entropy {entropy:.3f} bits, Huffman {per_value:.3f} bits per value")


@pytest.mark.parametrize("dtype", tuple(LAYOUTS))
def test_stored_nbytes_is_what_is_written(rng, dtype):
    for density in (1.0, 0.5):
        values, offsets, enc = _values(rng, 5 * TILE_ELEMS + 3, dtype, density, "weights")
        params, s, hist = _round_trip(values, offsets, dtype)
        n = 5 * TILE_ELEMS + 3
        written = [s.residuals.nbytes, s.bits.nbytes, s.tile_bits.nbytes]
        if enc is not None:
            written += [enc.bitmap.nbytes, enc.tile_offsets.nbytes]
        want = sum(pad_to_page(x) for x in written) + len(params.lengths)
        assert exphuff.stored_nbytes(params, hist, n, bitmap=enc is not None) == want


def test_corrupted_streams_are_decode_errors(rng):
    values, offsets, _ = _values(rng, 2 * TILE_ELEMS, "BF16", 1.0, "weights")
    params, s, _ = _round_trip(values, offsets, "BF16")
    bad = exphuff.HuffStreams(params, s.residuals, s.bits, s.tile_bits.copy())
    bad.tile_bits[1] += 1  # tile 0 would end one bit before tile 1 begins
    with pytest.raises(DecodeError, match="tile 0 ends at bit"):
        exphuff.decode_values_reference(bad, offsets, values.size)
    short = exphuff.HuffStreams(params, s.residuals, s.bits[: s.bits.size // 2], s.tile_bits)
    with pytest.raises(DecodeError, match="no valid exponent code|ends at bit"):
        exphuff.decode_values_reference(short, offsets, values.size)
    # a code table with a hole (one exponent's code removed): the stream hits the hole
    lengths = list(params.lengths)
    lengths[int(np.argmax(lengths))] = 0
    holed = exphuff.HuffStreams(exphuff.ExpHuff(params.layout, tuple(lengths)), s.residuals, s.bits, s.tile_bits)
    with pytest.raises(DecodeError):
        exphuff.decode_values_reference(holed, offsets, values.size)
    with pytest.raises(ValueError, match="has no code"):
        exphuff.encode_values(values, offsets, holed.params)
    with pytest.raises(ValueError, match="Kraft"):
        exphuff.ExpHuff(params.layout, (1, 1, 1) + (0,) * 253).check()


def test_pruned_weights_per_row(rng):
    """The codec takes what the packer's pruner leaves: magnitude-pruned rows of a bf16 weight."""
    w = torch.from_numpy(rng.standard_normal((64, 300), dtype=np.float32) * 0.02).bfloat16()
    bits = magnitude_prune(w, 0.6).view(torch.int16).numpy().view("<u2").reshape(-1)
    enc = encode_bitmap(bits)
    _round_trip(enc.values, enc.tile_offsets, "BF16")
