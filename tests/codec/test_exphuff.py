"""The exphuff value codec's reference (issue 22, first part): bit-exact round trips, the
length-limited canonical code, sizes, and corrupted streams."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from bitgen import SPECIALS, random_bits, weight_bits
from manifest_edit import manifest_edit

import endor_gds
from endor_gds.benchmarks.models import build_model
from endor_gds.codec import exphuff
from endor_gds.codec.bitmap import TILE_ELEMS, encode_bitmap, pad_to_page
from endor_gds.codec.expdict import LAYOUTS, exponent_histogram
from endor_gds.errors import DecodeError, FormatError
from endor_gds.packing.policy import choose_storage
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
        written = [a.nbytes for a in s.segments().values()]
        if enc is not None:
            written += [enc.bitmap.nbytes, enc.tile_offsets.nbytes]
        want = sum(pad_to_page(x) for x in written) + len(params.lengths)
        assert s.params == params  # the code chosen for the histogram is bound to its bit count
        assert exphuff.stored_nbytes(params, n, int(hist.sum()), bitmap=enc is not None) == want


def test_corrupted_streams_are_decode_errors(rng):
    values, offsets, _ = _values(rng, 2 * TILE_ELEMS, "BF16", 1.0, "weights")
    params, s, _ = _round_trip(values, offsets, "BF16")
    bad = exphuff.HuffStreams(params, s.residuals, s.bits, s.tile_bits.copy(), s.chunk_bits)
    bad.tile_bits[1] += 1  # tile 0 would end one bit before tile 1 begins
    with pytest.raises(DecodeError, match="tile (0 chunk 7 ends at bit|1 chunk 0: value)"):
        exphuff.decode_values_reference(bad, offsets, values.size)
    moved = exphuff.HuffStreams(params, s.residuals, s.bits, s.tile_bits, s.chunk_bits.copy())
    moved.chunk_bits[9] += 2  # tile 1's chunk 3 starts two bits late
    with pytest.raises(DecodeError, match="tile 1 chunk (2 ends at bit|3: value)"):
        exphuff.decode_values_reference(moved, offsets, values.size)
    moved.chunk_bits[9] = 0xFFFF  # past its tile's end
    with pytest.raises(DecodeError, match="tile 1 chunk 2 spans"):
        exphuff.decode_values_reference(moved, offsets, values.size)
    short = exphuff.HuffStreams(params, s.residuals, s.bits[: s.bits.size // 2], s.tile_bits, s.chunk_bits)
    with pytest.raises(DecodeError, match="wrong number of bytes"):
        exphuff.decode_values_reference(short, offsets, values.size)
    # a code table with a hole (one exponent's code removed): the stream hits the hole
    lengths = list(params.lengths)
    lengths[int(np.argmax(lengths))] = 0
    holed = exphuff.HuffStreams(exphuff.ExpHuff(params.layout, tuple(lengths), params.nbits), s.residuals, s.bits,
                                s.tile_bits, s.chunk_bits)
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


def test_layout_of_the_format_example():
    """docs/format.md's example of codec exphuff, byte for byte."""
    layout = LAYOUTS["BF16"]
    lengths = [0] * 256
    lengths[126] = lengths[127] = 1
    values = np.array([0x3FC0, 0xBF40, 0x3FC0], dtype="<u2")  # 1.5, -0.75, 1.5
    offsets = exphuff.dense_tile_offsets(3)
    s = exphuff.encode_values(values, offsets, exphuff.ExpHuff(layout, tuple(lengths)))
    assert s.residuals.tobytes() == bytes([0x40, 0xC0, 0x40])
    assert s.bits.tobytes() == bytes([0xA0]) and s.params.nbits == 3
    assert s.tile_bits.tolist() == [0, 3] and s.chunk_bits.tolist() == [3] * 7
    assert s.params.manifest() == {"code_lengths": lengths, "bits": 3}


# -- the container (format v3) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("v3") / "m", "llama", torch.bfloat16,
                       hidden_size=128, intermediate_size=352)


@pytest.fixture(scope="module")
def v3_files(bf16_model, tmp_path_factory):
    """The same model packed pruned with codec raw (v1) and exphuff, and unpruned with exphuff."""
    root = tmp_path_factory.mktemp("v3files")
    files = {}
    for key, prune, codec in (("raw", "magnitude", "raw"), ("pruned", "magnitude", "exphuff"),
                              ("unpruned", "none", "exphuff"), ("unpruned-raw", "none", "raw")):
        files[key] = root / f"{key}{'-dense' if prune == 'none' else ''}.endor"  # fuzzlib.load_base's naming
        endor_gds.pack(bf16_model, files[key], prune=prune, codec=codec, progress=False)
    return files


def test_pack_version_3_reads_back_bit_exact(v3_files):
    with endor_gds.open(v3_files["raw"]) as raw, endor_gds.open(v3_files["pruned"]) as pruned, \
            endor_gds.open(v3_files["unpruned"]) as unpruned, endor_gds.open(v3_files["unpruned-raw"]) as plain:
        assert raw.format_version == 1 and pruned.format_version == 3 and unpruned.format_version == 3
        coded = {e.name: e for e in pruned.tensors.values() if e.codec == "exphuff"}
        # 50 % pruned: the bitmap pays for itself where a matrix fills its pages (the MLP's)
        assert {e.encoding for n, e in coded.items() if ".mlp." in n} == {"bitmap"}
        for packed, source in ((pruned, raw), (unpruned, plain)):
            for e in (e for e in packed.tensors.values() if e.codec == "exphuff"):
                # the packer's size (policy.Storage.nbytes) is what the file holds for the tensor
                bits = source.read_tensor_bits(e.name)
                store = choose_storage(e.dtype, e.shape, bits, "exphuff")
                assert (store.encoding, store.exphuff) == (e.encoding, e.exphuff)
                assert store.nbytes(e.numel, int(np.count_nonzero(bits)), 2) == e.stored_nbytes + 256
        dense = [e for e in unpruned.tensors.values() if e.codec == "exphuff"]
        assert dense and {e.encoding for e in dense} == {"dense"} and all(e.nnz == e.numel for e in dense)
        for name in raw.tensors:
            assert torch.equal(pruned.read_tensor(name).view(torch.uint8), raw.read_tensor(name).view(torch.uint8))
            assert torch.equal(unpruned.read_tensor(name).view(torch.uint8), plain.read_tensor(name).view(torch.uint8))
        t = unpruned.summary()["totals"]
        assert t["codecs"]["exphuff"] == len(dense)
        assert t["codec_bits_per_element"]["exphuff"] < 14  # bf16 N(0, 0.02): ~10.6 at real sizes
        assert t["stored_bytes"] < plain.summary()["totals"]["stored_bytes"]


def test_inspect_shows_codec_and_bits(v3_files, capsys):
    from endor_gds.cli.main import main  # noqa: PLC0415

    assert main(["inspect", str(v3_files["unpruned"]), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "format v3" in out and "bits/el" in out
    line = next(line for line in out.splitlines() if "q_proj" in line)
    assert "dense" in line and "exphuff <=" in line
    assert "exphuff at " in out and "bits per element" in out


def _first(m):
    return next(t for t in m["tensors"] if t.get("codec") == "exphuff")


def _set_length(m, exp, value):
    _first(m)["exphuff"]["code_lengths"][exp] = value


@pytest.mark.parametrize("edit, match", [
    (lambda m: _set_length(m, 0, 13), r"code length must be an integer in \[0, 12\]"),
    (lambda m: _first(m)["exphuff"]["code_lengths"].pop(), "code_lengths must be 256 integers|Kraft"),
    (lambda m: _first(m)["exphuff"].update(code_lengths=[1] * 256), "Kraft"),
    (lambda m: _first(m)["exphuff"].update(bits=_first(m)["exphuff"]["bits"] + 8), "needs segments"),
    (lambda m: _first(m)["exphuff"].update(bits=-1), "bits must be an integer"),
    (lambda m: _first(m).pop("exphuff"), "exphuff must be an object"),
    (lambda m: _first(m).update(codec="raw"), "exphuff parameters given for codec 'raw'"),
    (lambda m: _first(m).update(nnz=_first(m)["nnz"] - 1), "a dense exphuff tensor stores all"),
    (lambda m: m.update(format_version=2), "format_version must be an integer in"),
])
def test_malformed_exphuff_manifest_is_a_format_error(v3_files, tmp_path, edit, match):
    bad = manifest_edit(v3_files["unpruned"], edit, tmp_path)
    with pytest.raises(FormatError, match=match):
        endor_gds.open(bad)


def test_exphuff_in_a_version_2_file_is_refused(v3_files, tmp_path):
    from endor_gds.fuzz import fuzzlib  # noqa: PLC0415

    base = fuzzlib.load_base(v3_files["pruned"])
    m = json.loads(base.manifest_text)
    m["format_version"] = 2
    (tmp_path / "v2.endor").write_bytes(fuzzlib.with_header(fuzzlib.with_manifest(base, fuzzlib.dump(m)), version=2))
    with pytest.raises(FormatError, match="codec must be one of 'raw', 'expdict', got 'exphuff'"):
        endor_gds.open(tmp_path / "v2.endor")


@pytest.mark.parametrize("kind, patch", [("tile_bits", (4, 0xFFFF)), ("chunk_bits", (2, 0xFFFF))])
def test_bad_bit_tables_are_refused_at_open(v3_files, tmp_path, kind, patch):
    """A tile or chunk bit table rewritten (CRC fixed): refused at open, or at the first read."""
    from endor_gds.fuzz import fuzzlib  # noqa: PLC0415

    base = fuzzlib.load_base(v3_files["unpruned"])
    seg = next(s for s in base.segments if s.kind == kind and "gate_proj" in s.label)
    data = bytearray(base.data)
    width = 4 if kind == "tile_bits" else 2
    data[seg.offset + patch[0]:seg.offset + patch[0] + width] = patch[1].to_bytes(width, "little")
    (tmp_path / "bad.endor").write_bytes(fuzzlib.with_segment_crc(base, bytes(data), seg))
    with pytest.raises(DecodeError, match="tile 1|tile 0"):
        endor_gds.open(tmp_path / "bad.endor")
    f = endor_gds.open(tmp_path / "bad.endor", check_tiles=False)  # deferred to the read
    with f, pytest.raises(DecodeError):
        f.read_tensor(seg.label.split()[1].split(":")[0])
