"""Format v2, codec expdict: the numpy reference (the spec in code), the packer's choice, the
container's validation, and the bits per element on TinyLlama shapes (issue 9)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from bitgen import SIZES, SPECIALS, random_bits, weight_bits
from decode_cases import encode_expdict, expdict_bits
from manifest_edit import manifest_edit

import endor_gds
from endor_gds.benchmarks.models import build_model
from endor_gds.codec.bitmap import (
    DTYPES,
    TILE_ELEMS,
    decode_bitmap_reference,
    encode_bitmap,
    pad_to_page,
    stored_nbytes,
)
from endor_gds.codec.expdict import (
    LAYOUTS,
    ExpDict,
    _dictionary,
    best_expdict,
    check_escapes,
    decode_values_reference,
    encode_values,
    exponent_histogram,
)
from endor_gds.container import format_version_for
from endor_gds.errors import DecodeError, FormatError
from endor_gds.packing.policy import CODECS, EXPHUFF_MIN_SAVING, Storage, choose_storage

DTYPE_NAMES = tuple(LAYOUTS)  # BF16, F16, F32


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("n", (0,) + SIZES)
@pytest.mark.parametrize("kind", ["weights", "outliers", "uniform"])
def test_round_trip_every_index_width(rng, dtype, n, kind):
    bits = expdict_bits(rng, n, dtype, 0.5, kind)
    for b in range(1, 5):
        enc, streams = encode_expdict(bits, dtype, b)
        values = decode_values_reference(streams, enc.tile_offsets, enc.nnz)
        assert values.dtype == bits.dtype
        np.testing.assert_array_equal(values, enc.values)
        out = decode_bitmap_reference(enc.bitmap, values, enc.tile_offsets, n)
        np.testing.assert_array_equal(out, bits)
        sizes = streams.params.segment_nbytes(n, enc.nnz)
        assert {k: a.nbytes for k, a in streams.segments().items()} == sizes


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_specials_survive_as_escapes_or_entries(rng, dtype):
    """-0.0, +-inf, NaN payloads and subnormals among ordinary weights: bit-exact, and with a
    1-bit dictionary the rare exponents are escapes, found per tile."""
    itemsize = LAYOUTS[dtype].itemsize
    bits = weight_bits(rng, 3 * TILE_ELEMS + 7, dtype, 0.6)
    where = rng.choice(np.flatnonzero(bits), SPECIALS[itemsize].size, replace=False)
    bits[where] = SPECIALS[itemsize]
    enc, streams = encode_expdict(bits, dtype, 1)
    assert streams.params.escapes >= SPECIALS[itemsize].size - 2  # at most 2 share an entry
    assert set(SPECIALS[itemsize].tolist()) <= set(streams.escape_values.tolist()) | \
        set(enc.values[np.isin(enc.values, SPECIALS[itemsize])].tolist())
    values = decode_values_reference(streams, enc.tile_offsets, enc.nnz)
    assert values.tobytes() == enc.values.tobytes()
    # every tile's escapes are listed for that tile only, positions within its values
    eo = streams.escape_offsets
    for t in range(enc.tile_offsets.size - 1):
        pos = streams.escape_positions[eo[t]:eo[t + 1]]
        assert (np.diff(pos.astype(int)) > 0).all()
        assert (pos < enc.tile_offsets[t + 1] - enc.tile_offsets[t]).all()


def test_layout_of_one_bf16_value():
    """The byte layout of docs/format.md, by hand: bf16 1.5 = 0x3FC0 (sign 0, exponent 127,
    mantissa 0x40) and -0.75 = 0xBF40 (sign 1, exponent 126, mantissa 0x40)."""
    values = np.array([0x3FC0, 0xBF40, 0x3FC0], dtype="<u2")
    offs = np.array([0, 3], dtype="<u4")
    p = ExpDict(LAYOUTS["BF16"], 1, (127, 126), 0)
    s = encode_values(values, offs, p)
    assert s.residuals.tolist() == [0x40, 0xC0, 0x40]  # sign << 7 | mantissa
    assert s.codes.tolist() == [0b010]  # indices 0, 1, 0 at bits 0, 1, 2
    fp16 = ExpDict(LAYOUTS["F16"], 2, (15, 14, 1, 2), 0)
    # fp16 1.5 = 0x3E00: exponent 15, mantissa 0x200; residual 0x200 = low byte 0x00, high bits
    # 0b010 above the 2-bit index 0 -> field 0b01000
    s = encode_values(np.array([0x3E00], "<u2"), np.array([0, 1], "<u4"), fp16)
    assert s.residuals.tolist() == [0x00] and s.codes.tolist() == [0b01000]


def test_escape_table_checks(rng):
    bits = weight_bits(rng, 2 * TILE_ELEMS, "BF16", 0.5, outliers=True)
    enc, s = encode_expdict(bits, "BF16", 1)
    assert s.params.escapes >= 4
    check_escapes(s, enc.tile_offsets)

    def bad(**change):
        from dataclasses import replace  # noqa: PLC0415

        return replace(s, **change)

    eo = s.escape_offsets.copy()
    eo[1] += 1
    with pytest.raises(DecodeError, match="escape"):
        check_escapes(bad(escape_offsets=eo), enc.tile_offsets)
    eo = s.escape_offsets.copy()
    eo[0] = 1
    with pytest.raises(DecodeError, match="from 0 to escapes"):
        check_escapes(bad(escape_offsets=eo), enc.tile_offsets)
    pos = s.escape_positions.copy()
    first, second = int(s.escape_offsets[0]), int(s.escape_offsets[0]) + 1
    assert s.escape_offsets[1] >= 2, "tile 0 needs two escapes for this case"
    pos[second] = pos[first]  # not strictly increasing
    with pytest.raises(DecodeError, match="strictly increasing"):
        decode_values_reference(bad(escape_positions=pos), enc.tile_offsets, enc.nnz)
    pos = s.escape_positions.copy()
    pos[int(s.escape_offsets[1]) - 1] = enc.tile_offsets[1]  # past tile 0's values
    with pytest.raises(DecodeError, match="past its"):
        check_escapes(bad(escape_positions=pos), enc.tile_offsets)
    with pytest.raises(DecodeError, match="codes holds"):
        decode_values_reference(bad(codes=s.codes[:-1]), enc.tile_offsets, enc.nnz)


def test_best_index_width_is_the_smallest_on_disk(rng):
    layout = LAYOUTS["BF16"]
    for kind in ("weights", "outliers", "uniform"):
        bits = expdict_bits(rng, 20 * TILE_ELEMS, "BF16", 0.5, kind)
        enc = encode_bitmap(bits)
        hist = exponent_histogram(enc.values, layout)
        best, size = best_expdict(hist, bits.size, layout)
        sizes = []
        for b in range(1, 5):
            p = ExpDict(layout, b, *_dictionary(hist, b))
            sizes.append(stored_nbytes("bitmap", bits.size, enc.nnz, 2, p) + (1 << b))
            assert p.escapes == int(np.count_nonzero(~np.isin(
                (enc.values >> 7) & 0xFF, p.exponents)))
        assert stored_nbytes("bitmap", bits.size, enc.nnz, 2, best) + len(best.exponents) == min(sizes)
        assert size == sum(pad_to_page(x) for x in best.segment_nbytes(bits.size, enc.nnz).values()) \
            + len(best.exponents)  # the dictionary's bytes


def _sizes(dtype, shape, bits) -> dict:
    """Each codec's choice for ``bits`` and its size, page padding and parameters counted."""
    nnz = int(np.count_nonzero(bits))
    out = {}
    for codec in CODECS:
        store = choose_storage(dtype, shape, bits, codec)
        out[codec] = (store, store.nbytes(bits.size, nnz, dtype.itemsize))
    return out


def test_choose_storage(rng):
    """``auto`` is the smallest of dense, raw and expdict (on a tie the simpler), or exphuff where
    that is smaller by EXPHUFF_MIN_SAVING; the forced codecs use their codec whatever the size."""
    bf16, f16 = DTYPES["BF16"], DTYPES["F16"]
    shape = (256, 1024)
    weights = weight_bits(rng, 256 * 1024, "BF16", 0.5)
    spread = random_bits(rng, 256 * 1024, 2, 0.5)  # exponents spread uniformly
    dense = weight_bits(rng, 256 * 1024, "BF16", 1.0)  # unpruned
    for dtype, bits in ((bf16, weights), (f16, spread), (bf16, dense)):
        sizes = _sizes(dtype, shape, bits)
        best = min(sizes["raw"][1], sizes["expdict"][1])
        want = sizes["exphuff"][1] if sizes["exphuff"][1] <= (1 - EXPHUFF_MIN_SAVING) * best else best
        assert sizes["auto"][1] == want
        assert sizes["raw"][0].codec == "raw" and sizes["expdict"][0].codec == "expdict"
        assert sizes["exphuff"][0].codec == "exphuff"
    # 50 %-pruned weights: each codec smaller than the last, exphuff by too little to give up the
    # fused product of expdict; exphuff keeps the bitmap
    sizes = _sizes(bf16, shape, weights)
    assert sizes["exphuff"][1] < sizes["expdict"][1] < sizes["raw"][1]
    assert sizes["exphuff"][1] > (1 - EXPHUFF_MIN_SAVING) * sizes["expdict"][1]
    assert sizes["exphuff"][0].encoding == "bitmap" and sizes["auto"][0].codec == "expdict"
    # exponents spread uniformly: the dictionary escapes most values and loses to raw
    sizes = _sizes(f16, shape, spread)
    assert sizes["expdict"][1] > sizes["raw"][1] and sizes["expdict"][0].expdict.escapes > 0
    # unpruned: expdict still shrinks it (bitmap 1 + residual 8 + index 3 bits + escapes), and
    # exphuff, with no bitmap at all, more
    sizes = _sizes(bf16, shape, dense)
    assert sizes["expdict"][1] < 13 / 16 * dense.nbytes
    assert sizes["exphuff"][1] < 11 / 16 * dense.nbytes and sizes["exphuff"][0].encoding == "dense"
    assert (sizes["auto"][0].encoding, sizes["auto"][0].codec) == ("dense", "exphuff")
    # what can never be bitmap-encoded stays dense, whatever the codec
    for codec in ("expdict", "exphuff"):
        assert choose_storage(bf16, (4096,), weights[:4096], codec) == Storage("dense")
        assert choose_storage(DTYPES["I16"], shape, weights, codec) == Storage("dense")
    with pytest.raises(ValueError, match="unknown codec 'zstd'"):
        choose_storage(bf16, shape, weights, "zstd")


# -- the container --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("v2") / "m", "llama", torch.bfloat16,
                       hidden_size=128, intermediate_size=352)


def test_pack_versions_and_codecs(bf16_model, tmp_path):
    files = {}
    for codec in ("raw", "auto", "expdict"):
        files[codec] = tmp_path / f"{codec}.endor"
        endor_gds.pack(bf16_model, files[codec], prune="magnitude", codec=codec, progress=False)
    # auto takes the smallest codec, exphuff (format v3) among them: the same weights, read below
    with endor_gds.open(files["raw"]) as raw, endor_gds.open(files["expdict"]) as ed, \
            endor_gds.open(files["auto"]) as auto:
        assert raw.format_version == 1 and {e.codec for e in raw.tensors.values()} == {"raw"}
        assert ed.format_version == 2
        assert auto.format_version == format_version_for(e.codec for e in auto.tensors.values()) >= 2
        linear = [n for n, e in ed.tensors.items() if e.encoding == "bitmap"]
        assert linear and all(ed.tensors[n].codec == "expdict" for n in linear)
        assert auto.summary()["totals"]["stored_bytes"] < raw.summary()["totals"]["stored_bytes"]
        for name in raw.tensors:
            want = raw.read_tensor(name).view(torch.uint8)
            assert torch.equal(ed.read_tensor(name).view(torch.uint8), want), name
            assert torch.equal(auto.read_tensor(name).view(torch.uint8), want), name
        s = ed.summary()
        t = next(t for t in s["tensors"] if t["codec"] == "expdict")
        assert t["expdict"]["index_bits"] in (1, 2, 3, 4)
        assert t["bits_per_element"] == pytest.approx(8 * t["stored_bytes"] / np.prod(t["shape"]))
        assert s["totals"]["codecs"]["expdict"] == len(linear)


def test_inspect_shows_codec_and_bits(bf16_model, tmp_path, capsys):
    from endor_gds.cli.main import main  # noqa: PLC0415

    dst = tmp_path / "m.endor"
    assert main(["pack", str(bf16_model), str(dst), "--prune", "magnitude", "--codec", "expdict",
                 "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(dst), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "format v2" in out and "bits/el" in out
    assert any("q_proj" in line and "expdict b" in line for line in out.splitlines())
    assert "bits per element (tensors by codec, bits per element: " in out and " expdict at " in out


def _first_expdict(m):
    return next(t for t in m["tensors"] if t.get("codec") == "expdict")


@pytest.mark.parametrize("edit, match", [
    (lambda m: _first_expdict(m)["expdict"].update(index_bits=5), r"index_bits must be an integer in \[1, 4\]"),
    (lambda m: _first_expdict(m)["expdict"].update(index_bits=0), r"index_bits must be an integer in \[1, 4\]"),
    (lambda m: _first_expdict(m)["expdict"]["exponents"].pop(), "must be .* distinct integers"),
    (lambda m: _first_expdict(m)["expdict"]["exponents"].__setitem__(1, _first_expdict(m)["expdict"]["exponents"][0]),
     "distinct"),
    (lambda m: _first_expdict(m)["expdict"]["exponents"].__setitem__(0, 256),
     r"exponent must be an integer in \[0, 255\]"),
    (lambda m: _first_expdict(m)["expdict"].update(escapes=-1), "escapes must be an integer"),
    (lambda m: _first_expdict(m)["expdict"].update(escapes=_first_expdict(m)["expdict"]["escapes"] + 1),
     "needs segments"),
    (lambda m: _first_expdict(m).pop("expdict"), "expdict must be an object"),
    (lambda m: _first_expdict(m).update(codec="raw"), "expdict parameters given for codec 'raw'"),
    (lambda m: _first_expdict(m).update(encoding="dense"), "codec expdict needs encoding 'bitmap'"),
    (lambda m: m.update(format_version=1), "format_version must be an integer in"),
])
def test_malformed_expdict_manifest_is_a_format_error(bf16_model, tmp_path, edit, match):
    src = tmp_path / "m.endor"
    endor_gds.pack(bf16_model, src, prune="magnitude", codec="expdict", progress=False)
    bad = manifest_edit(src, edit, tmp_path)
    with pytest.raises(FormatError, match=match):
        endor_gds.open(bad)


def test_expdict_in_a_version_1_file_is_refused(bf16_model, tmp_path):
    """A version-1 reader's view: codec expdict does not exist in version 1."""
    from endor_gds.fuzz import fuzzlib  # noqa: PLC0415

    src = tmp_path / "m.endor"
    endor_gds.pack(bf16_model, src, prune="magnitude", codec="expdict", progress=False)
    base = fuzzlib.load_base(src)
    m = json.loads(base.manifest_text)
    m["format_version"] = 1
    data = fuzzlib.with_header(fuzzlib.with_manifest(base, fuzzlib.dump(m)), version=1)
    (tmp_path / "v1.endor").write_bytes(data)
    with pytest.raises(FormatError, match="codec must be one of 'raw', got 'expdict'"):
        endor_gds.open(tmp_path / "v1.endor")


def test_bad_escape_table_is_refused_at_open(bf16_model, tmp_path):
    """An escape offset table rewritten (CRC fixed): refused at open, or at the first read."""
    from endor_gds.fuzz import fuzzlib  # noqa: PLC0415

    dst = tmp_path / "m.endor"
    endor_gds.pack(bf16_model, dst, prune="magnitude", codec="expdict", progress=False)
    base = fuzzlib.load_base(dst)
    seg = next(s for s in base.segments if s.kind == "escape_offsets" and "q_proj" in s.label)
    data = bytearray(base.data)
    data[seg.offset + 4:seg.offset + 8] = (2**31).to_bytes(4, "little")  # past every escape
    (tmp_path / "bad.endor").write_bytes(fuzzlib.with_segment_crc(base, bytes(data), seg))
    with pytest.raises(DecodeError, match="escape"):
        endor_gds.open(tmp_path / "bad.endor")
    f = endor_gds.open(tmp_path / "bad.endor", check_tiles=False)  # deferred to the read
    with f, pytest.raises(DecodeError, match="escape"):
        f.read_tensor(seg.label.split()[1].split(":")[0])


@pytest.mark.slow
def test_bits_per_element_tinyllama_bf16(tmp_path):
    """Issue 9's figure: a 50 %-pruned bf16 model with N(0, 0.02) weights at TinyLlama-1.1B layer
    shapes (hidden 2048, MLP 5632, 4 KV heads of 64: k/v 256x2048), two layers, packed with
    codec expdict. Bits per element over the sparse tensors, counting everything the file holds for
    them: every segment with its page padding (bitmap, tile offsets, residuals, codes, escape
    offsets, positions and values) plus the expdict objects of the manifest (the dictionaries)."""
    src = build_model(tmp_path / "tl", "llama", torch.bfloat16, hidden_size=2048,
                      intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                      num_hidden_layers=2, vocab_size=1024, tokenizer=False)
    dst = tmp_path / "tl.endor"
    endor_gds.pack(src, dst, prune="magnitude", sparsity=0.5, progress=False, codec="expdict")
    with endor_gds.open(dst) as f:
        sparse = [e for e in f.tensors.values() if e.encoding == "bitmap"]
        assert len(sparse) == 14 and all(e.codec == "expdict" for e in sparse)
        assert {e.shape for e in sparse} == {(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)}
        stored = sum(e.stored_nbytes for e in sparse)
        stored += sum(len(json.dumps(t["expdict"])) for t in f.manifest["tensors"] if "expdict" in t)
        numel = sum(e.numel for e in sparse)
        bits = 8 * stored / numel
        escapes = sum(e.expdict.escapes for e in sparse)
        widths = sorted({e.expdict.index_bits for e in sparse})
        print(f"\nTinyLlama shapes, bf16, 50 % magnitude, 2 layers: {bits:.4f} bits per element over "
              f"the sparse tensors (index widths {widths}, {escapes} escapes in {numel} elements)")
        assert bits <= 6.6
        assert f.summary()["totals"]["encoded_bits_per_element"] == pytest.approx(bits, abs=1e-3)
        for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
            got = f.read_tensor(name)
            assert (got != 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
