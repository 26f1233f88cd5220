"""The fused product y = x · Wᵀ from bitmap + values: as accurate as torch's own matmul against
float64, reproducible, and a DecodeError (never an overrun) on inconsistent input."""

import re

import numpy as np
import pytest
import torch
from bitgen import weight_bits
from decode_cases import corrupt_cases, encode_expdict, expdict_corrupt_cases
from exphuff_cases import exphuff_corrupt_cases, huff_tensor

from endor_gds.codec.bitmap import encode_bitmap
from endor_gds.decode.cpu import CpuDecoder, cpu_features
from endor_gds.decode.fused import MAX_ROWS, FusedWeight, reference_matmul
from endor_gds.errors import DecodeError

TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
# the vector path (AVX2 + FMA + F16C) where this CPU has it, and the portable C path
PATHS = [True, False] if "fma" in cpu_features() else [False]
# Shapes: rows crossing tile boundaries (cols 5632, 4097), odd widths (13, 199: rows start
# mid-word and mid-group), a single element, widths below one group of 8.
SHAPES = [(1, 1), (3, 7), (7, 13), (64, 4096), (33, 5632), (103, 199), (5, 4097), (300, 1000)]


@pytest.fixture(scope="module", params=PATHS, ids=lambda simd: "fma" if simd else "portable")
def decoder(request):
    with CpuDecoder(2, simd=request.param) as d:
        yield d


def _weight(rng, rows, cols, dtype, density, codec, index_bits=None, bits=None):
    """(FusedWeight, dense W as torch) of a magnitude-pruned N(0, 0.02) weight (or ``bits``); codec
    exphuff: dense (no bitmap) where nothing is pruned."""
    if bits is None:
        bits = weight_bits(rng, rows * cols, dtype, density)
    if codec == "raw":
        enc = encode_bitmap(bits)
        w = FusedWeight(enc.bitmap, enc.values, enc.tile_offsets, (rows, cols), TORCH[dtype])
    elif codec == "expdict":
        enc, values = encode_expdict(bits, dtype, index_bits)
        w = FusedWeight(enc.bitmap, values, enc.tile_offsets, (rows, cols), TORCH[dtype])
    else:
        t = huff_tensor(rng, bits, dtype, dense=density >= 1.0)
        w = FusedWeight(t.bitmap, t.streams(), t.offsets, (rows, cols), TORCH[dtype])
    dense = torch.from_numpy(bits.view(np.uint8).copy()).view(TORCH[dtype]).reshape(rows, cols)
    return w, dense


def _error(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> float:
    """Largest error against float64, relative to sum |x| |w| (+ |bias|): the scale of a dot
    product's error."""
    x64, w64 = x.double().numpy(), w.double().numpy()
    scale, want = np.abs(x64) @ np.abs(w64).T, reference_matmul(x64, w64)
    if bias is not None:
        scale, want = scale + np.abs(bias.double().numpy()), want + bias.double().numpy()
    err = np.abs(y.double().numpy() - want)
    return float(np.max(err / np.maximum(scale, 1e-30), initial=0.0))


# 2 units of fp32 rounding: for dots of a few terms torch is often exact, and "2x zero" is no bar
FLOOR = 2.0**-23


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("codec", ["raw", "expdict", "exphuff"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_as_accurate_as_torch(decoder, rng, dtype, codec, shape):
    """Every sparsity from none to all-zero, 1 to MAX_ROWS rows of x, a bias: the product's error
    against float64 is at most twice torch's own (x @ W.T in the same dtype) on the same inputs."""
    for density in (1.0, 0.5, 0.1, 0.0):
        w, dense = _weight(rng, *shape, dtype, density, codec)
        for m in (1, 2, 3, 4, 8, MAX_ROWS):
            x = torch.randn(m, shape[1]).to(TORCH[dtype])
            got, want = w(decoder, x), x @ dense.T
            assert got.dtype == x.dtype and got.shape == (m, shape[0])
            ours, torch_err = _error(got, x, dense), _error(want, x, dense)
            assert ours <= 2 * torch_err + FLOOR, (density, m, ours, torch_err)
        if density == 0.0:
            assert not w(decoder, x).any()
        bias = torch.randn(shape[0]).to(TORCH[dtype])
        ours = _error(w(decoder, x, bias), x, dense, bias)
        assert ours <= 2 * _error(torch.nn.functional.linear(x, dense, bias), x, dense, bias) + FLOOR


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
def test_expdict_escapes(decoder, rng, dtype):
    """A one-bit exponent index: most values are escapes, patched in per tile before the product."""
    w, dense = _weight(rng, 40, 1030, dtype, 0.6, "expdict", index_bits=1)
    x = torch.randn(3, 1030).to(TORCH[dtype])
    assert _error(w(decoder, x), x, dense) <= 2 * _error(x @ dense.T, x, dense) + FLOOR


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.03])
def test_exphuff_gives_the_expdict_products_bits(decoder, rng, dtype, density):
    """Both codecs rebuild each tile's values into the same buffer before the same product, so on
    the same weights exphuff (dense without a bitmap, or sparse) gives exactly expdict's fp32
    sums: one wrong value rebuilt anywhere would show. (Raw values are read in place, and near the
    end of the tensor its groups take the scalar path: the same sums to rounding, not bit for bit.)"""
    for shape in ((33, 5632), (103, 199), (5, 4097)):
        bits = weight_bits(rng, shape[0] * shape[1], dtype, density)
        x = torch.randn(5, shape[1]).to(TORCH[dtype])
        want = _weight(rng, *shape, dtype, density, "expdict", bits=bits)[0](decoder, x, out_dtype=torch.float32)
        w, _ = _weight(rng, *shape, dtype, density, "exphuff", bits=bits)
        assert torch.equal(w(decoder, x, out_dtype=torch.float32), want), shape


def test_reproducible_and_batch_invariant(rng):
    """The order of additions depends on the shape alone: any thread count gives the same bits,
    and a row of x gives the same bits alone or among others (a request's output does not depend
    on the batch it is served in)."""
    w, _ = _weight(rng, 257, 5632, "F16", 0.5, "raw")
    x = torch.randn(MAX_ROWS, 5632).half()
    with CpuDecoder(1) as one, CpuDecoder(2) as two, CpuDecoder(3) as three:
        y = w(one, x)
        assert torch.equal(w(two, x), y) and torch.equal(w(three, x), y)
        for m in (1, 2, 4, 5, 8):
            assert torch.equal(w(two, x[:m]), y[:m]), m
        assert torch.equal(w(two, x[3:4]), y[3:4])


def test_leading_dimensions_and_argument_checks(rng):
    w, dense = _weight(rng, 48, 64, "BF16", 0.5, "raw")
    with CpuDecoder(2) as d:
        x = torch.randn(2, 3, 64).bfloat16()  # (batch, sequence, features)
        assert w(d, x).shape == (2, 3, 48)
        assert torch.equal(w(d, x).reshape(6, 48), w(d, x.reshape(6, 64)))
        with pytest.raises(ValueError, match="x has 65 features, the weight takes 64"):
            w(d, torch.randn(1, 65).bfloat16())
        with pytest.raises(ValueError, match="x is torch.float32, the weight torch.bfloat16"):
            w(d, torch.randn(1, 64))
        with pytest.raises(ValueError, match=f"takes 1 to {MAX_ROWS} rows of x, got {MAX_ROWS + 1}"):
            w(d, torch.randn(MAX_ROWS + 1, 64).bfloat16())
    enc = encode_bitmap(weight_bits(rng, 100, "F16", 0.5))
    with pytest.raises(ValueError, match="2-D fp16/bf16/fp32"):
        FusedWeight(enc.bitmap, enc.values, enc.tile_offsets, (100,), torch.float16)
    with pytest.raises(ValueError, match="bitmap must be"):
        FusedWeight(enc.bitmap, enc.values, enc.tile_offsets, (10, 20), torch.float16)
    with pytest.raises(ValueError, match="takes codec raw, expdict or exphuff values, got list"):
        FusedWeight(enc.bitmap, list(enc.values), enc.tile_offsets, (10, 10), torch.float16)


@pytest.mark.parametrize("codec", ["raw", "expdict", "exphuff"])
@pytest.mark.parametrize("threads", [1, 2])
def test_inconsistent_input_is_decode_error(rng, codec, threads):
    """The decoder's corrupted tensors (6 tiles, 103 x 199: rows start mid-word and tasks mid-tile;
    exphuff's dense ones 19 x 647): every one is a DecodeError naming a tile, whichever rows each
    thread takes."""
    cases = corrupt_cases(rng, 2) if codec == "raw" else expdict_corrupt_cases(rng, "F16") \
        if codec == "expdict" else exphuff_corrupt_cases(rng, "F16")
    with CpuDecoder(threads) as d:
        for label, (t, _) in cases.items():
            shape = {103 * 199: (103, 199), 19 * 647: (19, 647)}[t.n]
            values = np.frombuffer(t.values, "<u2", count=t.nnz) if codec == "raw" else t.streams()
            w = FusedWeight(t.bitmap, values, t.offsets, shape, torch.float16, label)
            with pytest.raises(DecodeError, match=rf"{re.escape(label)}: tile \d+ .*disagrees"):
                w(d, torch.randn(2, shape[1]).half())


@pytest.mark.skipif("fma" not in cpu_features(), reason="this CPU has no vector path to compare with")
@pytest.mark.parametrize("dtype", ["F16", "BF16"])
@pytest.mark.parametrize("codec", ["raw", "expdict", "exphuff"])
def test_portable_path_adds_in_the_vector_paths_order(rng, dtype, codec):
    """The product of two fp16 (or bf16) numbers is exact in fp32, so an FMA rounds exactly as a
    multiply then an add: the portable and the vector path give the same bits iff they add in the
    same order, which is what this checks on the fp32 sums (odd widths: scalar heads and tails;
    1-16 rows)."""
    with CpuDecoder(2) as fma, CpuDecoder(2, simd=False) as portable:
        for shape in ((33, 5632), (103, 199), (300, 1000), (5, 4097)):
            w, _ = _weight(rng, *shape, dtype, 0.5, codec)
            for m in (1, 3, 4, 5, 16):
                x = torch.randn(m, shape[1]).to(TORCH[dtype])
                sums = [w(d, x, out_dtype=torch.float32) for d in (fma, portable)]
                assert sums[0].dtype == torch.float32 and torch.equal(*sums), (shape, m)
