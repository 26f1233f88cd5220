"""Fuzzing the .endor reader with mutated real files (issue 7).

The engine (endor_gds/fuzz/fuzzlib.py) and the oracle (endor_gds/fuzz/fuzzcheck.py) are the ones
bench/fuzz_format.py runs for long runs; here hypothesis drives a few hundred cases with a
fixed derandomised profile so CI is deterministic, every mutation op runs at least once, each
escape found so far has a named regression test, the oracle's own checks are shown to fail when
they should, and the C decoder also gets raw garbage that never went through the checks at open.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from endor_gds.benchmarks.models import build_model
from endor_gds.container import EndorFile
from endor_gds.decode.cpu import CpuDecoder
from endor_gds.errors import ChecksumError, DecodeError, EndorError, FormatError
from endor_gds.fuzz import fuzzcheck, fuzzlib

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("ENDOR_FUZZ_EXAMPLES", "200"))


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-corpus")
    fuzzlib.build_corpus(folder, build_model)
    return folder


@pytest.fixture(scope="session")
def bases(corpus_dir):
    return [fuzzlib.load_base(p) for p in sorted(corpus_dir.glob("*.endor"))]


@pytest.fixture(scope="session")
def decoder():
    with CpuDecoder(1) as d:
        yield d


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-work")


def _run(base, mutant, workdir, decoder, **kw):
    return fuzzcheck.run_case(base, mutant, workdir, decoder, **kw)


def _assert_kept_promises(base, mutant, r):
    assert r.escape is None, f"{base.name} {mutant.op}: {mutant.detail}\n{r.outcome}: {r.escape}"


def test_corpus_covers_what_the_fuzzer_needs(bases):
    encodings = {(b.name, t["encoding"], t["dtype"]) for b in bases for t in b.manifest["tensors"]}
    assert {d for _, e, d in encodings if e == "bitmap"} == {"F16", "BF16", "F32"}
    dense_only = [b for b in bases if all(t["encoding"] == "dense" for t in b.manifest["tensors"])]
    assert dense_only, "a dense-only file"
    assert any(b.files for b in bases) and any(not b.files for b in bases)
    assert any(b.manifest.get("tied") for b in bases)
    # partial bitmap words and partial tiles exercise the decoders' edges
    numels = [np.prod(t["shape"]) for b in bases for t in b.manifest["tensors"] if t["encoding"] == "bitmap"]
    assert any(n % 32 for n in numels) and any(n % 4096 for n in numels)
    # format v2: expdict tensors of 2-byte types with and without high residual bits, escapes
    assert {b.manifest["format_version"] for b in bases} == {1, 2, 3, 4, 5}
    expdict = [t for b in bases for t in b.manifest["tensors"] if t.get("codec") == "expdict"]
    assert {t["dtype"] for t in expdict} == {"BF16", "F16"}
    assert sum(t["expdict"]["escapes"] > 0 for t in expdict) >= 4
    assert {t["expdict"]["index_bits"] for t in expdict} >= {1, 2} or len(expdict) > 4
    # format v3: exphuff tensors, bitmap and dense (fp16 both: high residual bits after the code),
    # partial tiles and partial 512-value chunks, codes longer than a byte (outliers) and at the
    # 12-bit limit
    exphuff = [t for b in bases for t in b.manifest["tensors"] if t.get("codec") == "exphuff"]
    kinds = {(t["encoding"], t["dtype"]) for t in exphuff}
    assert kinds >= {("bitmap", "F16"), ("dense", "F16"), ("dense", "BF16"), ("dense", "F32")}
    dense_numels = [np.prod(t["shape"]) for t in exphuff if t["encoding"] == "dense"]
    assert any(n % 512 for n in dense_numels) and any(n % 4096 > 512 for n in dense_numels)
    longest = {(t["encoding"], max(t["exphuff"]["code_lengths"])) for t in exphuff}
    assert any(e == "bitmap" and n > 8 for e, n in longest) and max(n for _, n in longest) == 12
    # format v4: a mixture-of-experts file, two layers of experts, bitmap and dense slices in them
    moe = _experts_base(bases)
    assert moe.manifest["format_version"] == 4
    experts = [e for e in moe.manifest["extents"] if e["kind"] == "expert"]
    assert len({e["layer"] for e in experts}) >= 2
    in_experts = {t["encoding"] for t in moe.manifest["tensors"] if t["extent"] in {e["name"] for e in experts}}
    assert in_experts == {"bitmap", "dense"}
    # format v5: a tensor-parallel file, two layers of two ranks' shard extents and no other layer
    # extents, bitmap and dense shards in them
    tp = _shards_base(bases)
    assert tp.manifest["format_version"] == 5 and tp.manifest["tensor_parallel"]["ranks"] == [0, 1]
    assert {(e["layer"], e["rank"]) for e in tp.manifest["extents"] if e["kind"] == "shard"} == \
        {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert {e["kind"] for e in tp.manifest["extents"]} == {"resident", "shard"}
    assert {t["encoding"] for t in tp.manifest["tensors"] if t["name"].startswith("rank.")} == {"bitmap", "dense"}


def _has_experts(base) -> bool:
    return any(e.get("kind") == "expert" for e in base.manifest["extents"])


def _experts_base(bases):
    return next(b for b in bases if _has_experts(b))


def _has_shards(base) -> bool:
    return any(e.get("kind") == "shard" for e in base.manifest["extents"])


def _shards_base(bases):
    return next(b for b in bases if _has_shards(b))


# ops that mutate one codec's parameters or tables run on a file that has them, json.experts on
# the file with expert extents and json.shards on the one with shard extents; the other ops on the
# files with neither (the cases they had before those files were added to the corpus: the
# hypothesis test below draws them for any op)
_OP_CODEC = {"json.expdict": "expdict", "segment.escape_positions": "expdict",
             "json.exphuff": "exphuff", "segment.bit_offsets": "exphuff"}
_OP_LAYOUT = {"json.experts": _has_experts, "json.shards": _has_shards}


@pytest.mark.parametrize("op", fuzzlib.OPS)
def test_every_op_once(bases, decoder, workdir, op):
    index = fuzzlib.OPS.index(op)
    codec = _OP_CODEC.get(op)
    fit = [b for b in bases if (codec is None or any(t.get("codec") == codec for t in b.manifest["tensors"]))
           and all(has(b) == (op == layout_op) for layout_op, has in _OP_LAYOUT.items())]
    base = fit[index % len(fit)]
    mutant = fuzzlib.mutate(base, op, fuzzlib.case_rng(0, index))
    _assert_kept_promises(base, mutant, _run(base, mutant, workdir, decoder))


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_files_never_escape(bases, decoder, workdir, data):
    base = data.draw(st.sampled_from(bases), label="base")
    op = data.draw(st.sampled_from(fuzzlib.OPS), label="op")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    mutant = fuzzlib.mutate(base, op, fuzzlib.case_rng(seed, 0))
    _assert_kept_promises(base, mutant, _run(base, mutant, workdir, decoder))


def test_oracle_handles_scalar_tensors(bases, decoder, workdir):
    """A manifest may legally turn a 1-D tensor into a scalar (sizes made consistent); the
    oracle itself once failed on 0-dim tensors (found by the bench, fixed in fuzzcheck._bits)."""
    base = bases[0]

    def scalar(m):
        t = next(t for t in m["tensors"] if len(t["shape"]) == 1)
        t["shape"], t["nnz"] = [], 1
        fuzzlib.consistent_sizes(t)

    mutant = fuzzlib.Mutant("json.shape", "1-D -> scalar", _with(base, scalar), True)
    r = _run(base, mutant, workdir, decoder)
    assert (r.outcome, r.escape) == ("ok: valid, different", None)


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(n=st.integers(0, 3 * 4096 + 33), itemsize=st.sampled_from([2, 4]), data=st.data())
def test_c_decoder_on_raw_garbage(decoder, n, itemsize, data):
    """The C decoder's own guards, without the checks at open in front of them: arbitrary bitmap
    words, value counts and tile offsets, on fenced buffers (an out-of-bounds access is a
    segfault). It returns or raises DecodeError; when the reference decoder accepts the same
    input, both produce the same bits."""
    from endor_gds.codec.bitmap import decode_bitmap_reference, num_tiles  # noqa: PLC0415
    from endor_gds.errors import DecodeError  # noqa: PLC0415
    from endor_gds.fuzz.fence import fenced_copy, fenced_empty  # noqa: PLC0415

    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    words = -(-n // 32)
    bitmap = rng.integers(0, 2**32, words, dtype=np.uint64).astype("<u4")
    bitmap &= rng.choice(np.array([0, 0xFFFFFFFF, 0x55555555, 0xFFFFFFFF], dtype="<u4"), words)
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little").astype(bool)
    if data.draw(st.booleans(), label="clear bits past n"):
        bits[n:] = False
        bitmap = np.packbits(bits, bitorder="little").view("<u4")
    counts = np.zeros(num_tiles(n) + 1, dtype=np.int64)
    if n:  # the consistent table for this bitmap; damaged below
        padded = np.zeros(num_tiles(n) * 4096, dtype=bool)
        padded[:n] = bits[:n]
        counts[1:] = np.cumsum(padded.reshape(-1, 4096).sum(1))
    exact = data.draw(st.booleans(), label="nnz matches the bitmap")
    nnz = int(counts[-1]) if exact else data.draw(st.integers(0, n + 64), label="nnz")
    values = rng.integers(1, 2**16, nnz, dtype=np.uint64).astype("<u2" if itemsize == 2 else "<u4")
    offs = counts.astype("<u4")
    for _ in range(data.draw(st.integers(0, 3), label="damage")):
        offs[rng.integers(offs.size)] = rng.choice([0, nnz, nnz + 1, 2**32 - 1, rng.integers(2**32)])
    out = fenced_empty(n * itemsize).view(values.dtype)
    try:
        decoder.decode([(fenced_copy(bitmap).view("<u4"), fenced_copy(values).view(values.dtype),
                         fenced_copy(offs).view("<u4"), out)], where=["garbage"])
        c_ok = True
    except DecodeError:
        c_ok = False
    try:
        ref = decode_bitmap_reference(bitmap, values, offs, n)
    except DecodeError:
        event(f"reference refuses, C {'accepts' if c_ok else 'refuses'}")
        return
    event("both accept: outputs compared")
    assert c_ok and out.tobytes() == ref.tobytes()


def test_unmutated_files_read_identically(bases, decoder, workdir):
    for base in bases:
        r = _run(base, fuzzlib.Mutant("none", "", base.data, False), workdir, decoder)
        assert (r.outcome, r.escape) == ("ok: identical", None)
        assert fuzzcheck.spec_violations(base.data, base.manifest) == []


# ---------------------------------------------------------------------------------------------
# Regressions: each escape the fuzzer found in the validation, as a named case.


def _write(tmp_path, data: bytes) -> Path:
    p = tmp_path / "bad.endor"
    p.write_bytes(data)
    return p


def _with(base, edit):
    m = copy.deepcopy(base.manifest)
    edit(m)
    return fuzzlib.with_manifest(base, fuzzlib.dump(m))


def _bitmap_base(bases):
    return next(b for b in bases if b.files and any(t["encoding"] == "bitmap" for t in b.manifest["tensors"]))


def _first(m, encoding):
    return next(t for t in m["tensors"] if t["encoding"] == encoding)


REGRESSIONS = {
    # fields the header declares but nothing checked
    "header flags": (lambda b: fuzzlib.with_header(b.data, flags=2), "header flags 0x2 are not supported"),
    "header page padding": (lambda b: b.data[:100] + b"\x01" + b.data[101:], "header page is not zero"),
    "manifest padding": (lambda b: b.data[:-1] + b"\x01", "manifest padding is not zero"),
    "data after the manifest": (
        lambda b: fuzzlib.with_header(b.data + bytes(4096), flen=len(b.data) + 4096),
        "manifest range .* ending the file"),
    "file cut inside the manifest padding": (
        lambda b: fuzzlib.with_header(b.data[:-1], flen=len(b.data) - 1), "manifest range .* ending the file"),
    # manifest fields whose type was not checked
    "segment without kind": (
        lambda b: _with(b, lambda m: _first(m, "dense")["segments"][0].pop("kind")),
        r"segment 0 kind must be one of 'data', 'bitmap', 'values', 'tile_offsets', 'residuals', "
        r"'codes', 'escape_offsets', 'escape_positions', 'escape_values', 'bits', 'tile_bits', "
        r"'chunk_bits', got None"),
    "segment kind nested 900 deep": (
        lambda b: _with(b, lambda m: _first(m, "bitmap")["segments"][2].update(kind="\x00DEEP:900")),
        "segment 2 kind must be one of .*got a list of 1 items"),
    "dtype is a list": (
        lambda b: _with(b, lambda m: _first(m, "dense").update(dtype=["F16"])),
        "dtype must be one of 'F16'.*got a list of 1 items"),
    "encoding is a dict": (
        lambda b: _with(b, lambda m: _first(m, "dense").update(encoding={"a": 1})),
        "encoding must be one of 'dense', 'bitmap', got a dict of 1 items"),
    "prune is a list": (
        lambda b: _with(b, lambda m: m.update(prune=["magnitude"])), "prune must be an object, got list"),
    "format_version true": (
        lambda b: _with(b, lambda m: m.update(format_version=True)), "format_version must be an integer"),
    "tile_elems missing": (
        lambda b: _with(b, lambda m: m.pop("tile_elems")), r"tile_elems must be an integer in \[4096, 4096\]"),
    "tile_elems is the tensor list": (
        lambda b: _with(b, lambda m: m.update(tile_elems=m["tensors"])),
        r"tile_elems must be an integer in \[4096, 4096\], got a list of \d+ items$"),
    "checksum sha256": (
        lambda b: _with(b, lambda m: m.update(checksum="sha256")), "checksum must be one of 'crc32c'"),
    "duplicated embedded file": (
        lambda b: _with(b, lambda m: m["files"].append(copy.deepcopy(m["files"][0]))),
        "embedded file tokenizer.json appears twice"),
    "file segment of kind bitmap": (
        lambda b: _with(b, lambda m: m["files"][0].update(kind="bitmap")), "kind must be one of 'file'"),
    "extent kind and name disagree": (
        lambda b: _with(b, lambda m: next(e for e in m["extents"] if e["name"] == "files").update(kind="resident")),
        "extent files of kind resident must be named 'resident'"),
    "layer extent misnamed": (
        lambda b: _with(b, lambda m: next(e for e in m["extents"] if e.get("layer") == 1).update(name="layer.7")),
        "extent layer.7 of kind layer must be named 'layer.1'"),
    "bitmap tensor of 2^32 elements": (
        lambda b: _with(b, lambda m: _first(m, "bitmap").update(shape=[65536, 65536])),
        "bitmap-encoded tensor holds at most 4294967295 elements"),
    "long segment kind": (
        lambda b: _with(b, lambda m: _first(m, "dense")["segments"][0].update(kind="k" * 100_000)),
        r"kind must be one of .*got 'kkkk.*\.\.\. \(100000 characters\)"),
}


@pytest.mark.parametrize("case", sorted(REGRESSIONS))
def test_regression(bases, tmp_path, case):
    make, match = REGRESSIONS[case]
    path = _write(tmp_path, make(_bitmap_base(bases)))
    with pytest.raises(FormatError, match=match) as info:
        EndorFile(path)
    assert str(path) in str(info.value) and len(str(info.value)) < 600


def test_failed_open_does_not_close_a_reused_descriptor(bases, tmp_path):
    """A failed open used to close its descriptor, then close the same number again from
    __del__ once the exception was dropped, by which time it belonged to another file."""
    bad = _write(tmp_path, b"x" * 5000)
    try:
        EndorFile(bad)
    except FormatError as exc:
        kept = exc  # the traceback keeps the half-built EndorFile alive
    good = EndorFile(bases[0].path)  # very likely gets the descriptor number just freed
    del kept  # drops the half-built object: its __del__ runs now
    good.read_tensor(next(iter(good.tensors)))  # EBADF here if __del__ closed our descriptor
    good.close()


# ---------------------------------------------------------------------------------------------
# The oracle must be able to fail: each of its checks, triggered on purpose.


def _pristine(base):
    return fuzzlib.Mutant("none", "unchanged", base.data, False)


def test_oracle_flags_silent_corruption(bases, decoder, workdir, monkeypatch):
    real = EndorFile.read_tensor_bits

    def one_bit_off(self, name, **kw):
        bits = real(self, name, **kw).copy()
        bits.view(np.uint8)[0] ^= 1
        return bits

    monkeypatch.setattr(EndorFile, "read_tensor_bits", one_bit_off)
    base = bases[0]
    assert base.manifest["tensors"][0]["encoding"] == "dense"  # reached before any C comparison
    assert _run(base, _pristine(base), workdir, decoder).outcome == "ESCAPE silent corruption"


def test_oracle_flags_other_exception_types(bases, decoder, workdir, monkeypatch):
    monkeypatch.setattr(EndorFile, "summary", lambda self: {}["no such key"])
    r = _run(bases[0], _pristine(bases[0]), workdir, decoder)
    assert r.outcome == "ESCAPE KeyError" and "no such key" in r.escape


def test_oracle_flags_messages_that_do_not_name_the_file(bases, decoder, workdir, monkeypatch):
    def vague(self, name, **kw):
        raise ChecksumError("bad")

    monkeypatch.setattr(EndorFile, "read_tensor", vague)
    assert _run(bases[0], _pristine(bases[0]), workdir, decoder).outcome == "ESCAPE bad error message"


def test_oracle_flags_decoder_disagreement(bases, decoder, workdir, monkeypatch):
    base = _bitmap_base(bases)
    monkeypatch.setattr(fuzzcheck, "_c_decode", lambda f, entry, dec, path: b"\0")
    assert _run(base, _pristine(base), workdir, decoder).outcome == "ESCAPE decoders disagree"


def test_oracle_decodes_dense_exphuff_with_c(bases, decoder, workdir, monkeypatch):
    """A file without a single bitmap tensor still has tensors to C-decode: dense exphuff."""
    base = _exphuff_base(bases, "dense")
    assert all(t["encoding"] == "dense" for t in base.manifest["tensors"])
    monkeypatch.setattr(fuzzcheck, "_c_decode", lambda f, entry, dec, path: b"\0")
    assert _run(base, _pristine(base), workdir, decoder).outcome == "ESCAPE decoders disagree"


def test_oracle_flags_hangs(bases, decoder, workdir, monkeypatch):
    monkeypatch.setattr(EndorFile, "summary", lambda self: time.sleep(30))
    r = _run(bases[0], _pristine(bases[0]), workdir, decoder, time_limit=0.5)
    assert r.outcome == "ESCAPE hang" and r.seconds < 5


def test_oracle_flags_large_allocations(bases, decoder, workdir, monkeypatch):
    def greedy_verify(self):
        np.ones(80 << 20, np.uint8).all()  # 80 MiB for a file of a few hundred KB
        return iter(())

    monkeypatch.setattr(EndorFile, "verify", greedy_verify)
    r = _run(bases[0], _pristine(bases[0]), workdir, decoder)
    assert r.outcome == "ESCAPE allocation" and r.peak_bytes >= 80 << 20


def test_oracle_flags_undetected_changes(bases, decoder, workdir):
    """A valid edit (provenance changed, manifest CRC recomputed) mislabelled as plain damage:
    the bytes changed, nothing complains, so the oracle must call it undetected."""
    base = bases[0]
    data = _with(base, lambda m: m.update(created_by="someone else"))
    lie = fuzzlib.Mutant("json.valid_edit", "provenance", data, hostile=False)
    assert _run(base, lie, workdir, decoder).outcome == "ESCAPE undetected change"


def test_spec_check_names_broken_rules(bases):
    base = _bitmap_base(bases)
    assert fuzzcheck.spec_violations(fuzzlib.with_header(base.data, flags=1), base.manifest) == \
        ["version 1 / flags 1"]
    m = copy.deepcopy(base.manifest)
    m["tensors"][1]["segments"][0]["offset"] = m["tensors"][0]["segments"][0]["offset"]
    assert "segments overlap" in fuzzcheck.spec_violations(base.data, m)


def _exphuff_base(bases, encoding):
    """The first file holding an exphuff tensor of ``encoding``; for "dense", one without bitmaps."""
    return next(b for b in bases if any(t.get("codec") == "exphuff" and t["encoding"] == encoding
                                        for t in b.manifest["tensors"])
                and (encoding == "bitmap" or "dense" in b.name))


def _exphuff_tensor(m, encoding):
    return next(t for t in m["tensors"] if t.get("codec") == "exphuff" and t["encoding"] == encoding)


def _oversubscribe(t):
    lengths = t["exphuff"]["code_lengths"]
    lengths[lengths.index(0)] = min(x for x in lengths if x)  # the code was complete: Kraft > 1


def _swap_chunk_offsets(base, m):
    """``base``'s bytes with the first two chunk offsets of a bitmap exphuff tensor swapped (a
    chunk of negative span), the segment's CRC recomputed."""
    t = _exphuff_tensor(m, "bitmap")
    seg = next(r for r in base.segments if r.label == f"tensor {t['name']}:chunk_bits")
    buf = bytearray(base.data)
    buf[seg.offset:seg.offset + 4] = buf[seg.offset + 2:seg.offset + 4] + buf[seg.offset:seg.offset + 2]
    return fuzzlib.with_segment_crc(base, bytes(buf), seg)


# each case: (encoding of the tensor edited, manifest edit, rule of fuzzcheck, the reader's words)
EXPHUFF_RULES = {
    "Kraft sum above 1": ("bitmap", _oversubscribe, "exphuff parameters", "over-subscribe"),
    "code of 13 bits": ("dense", lambda t: t["exphuff"]["code_lengths"].__setitem__(
        t["exphuff"]["code_lengths"].index(max(t["exphuff"]["code_lengths"])), 13),
        "exphuff parameters", r"code length must be an integer in \[0, 12\]"),
    "dense exphuff with nnz below numel": ("dense", lambda t: t.update(nnz=t["nnz"] - 1),
                                           "dense exphuff with nnz", "stores all"),
    "exphuff object on codec raw": ("dense", lambda t: t.update(codec="raw"), "exphuff object on codec raw",
                                    "exphuff parameters given for codec 'raw'"),
    "bits one short": ("dense", lambda t: (t["exphuff"].update(bits=t["exphuff"]["bits"] - 8),
                                           fuzzlib.consistent_sizes(t)), "tile bits", "tile bits must run"),
}


@pytest.mark.parametrize("case", sorted(EXPHUFF_RULES))
def test_spec_check_exphuff_rules(bases, tmp_path, case):
    """Each exphuff rule of docs/format.md, broken on purpose: fuzzcheck's own reading of the spec
    names it, and the reader refuses the file at open."""
    encoding, edit, rule, words = EXPHUFF_RULES[case]
    base = _exphuff_base(bases, encoding)
    data = _with(base, lambda m: edit(_exphuff_tensor(m, encoding)))
    m = json.loads(data[base.moff:base.moff + fuzzlib.header_of(data)["mlen"]])
    assert any(rule in v for v in fuzzcheck.spec_violations(data, m)), fuzzcheck.spec_violations(data, m)
    with pytest.raises(EndorError, match=words):
        EndorFile(_write(tmp_path, data))


def test_spec_check_exphuff_tables(bases, tmp_path):
    """A chunk bit table whose chunk would span a negative number of bits, and an exphuff tensor
    in a version-2 file: both broken rules are named, and the reader refuses both files."""
    base = _exphuff_base(bases, "bitmap")
    data = _swap_chunk_offsets(base, base.manifest)
    m = json.loads(data[base.moff:base.moff + fuzzlib.header_of(data)["mlen"]])
    assert any("chunk 0 spans" in v or "chunk 1 spans" in v for v in fuzzcheck.spec_violations(data, m))
    with pytest.raises(DecodeError, match="chunk"):
        EndorFile(_write(tmp_path, data))
    v2 = _with(base, lambda m: m.update(format_version=2))
    v2 = fuzzlib.with_header(v2, version=2)
    m = json.loads(v2[base.moff:base.moff + fuzzlib.header_of(v2)["mlen"]])
    assert any("codec 'exphuff' (version 2" in v for v in fuzzcheck.spec_violations(v2, m))
    with pytest.raises(FormatError, match="codec must be one of 'raw', 'expdict', got 'exphuff'"):
        EndorFile(_write(tmp_path, v2))


def _expert(m, layer, expert):
    return next(e for e in m["extents"] if e["name"] == f"layer.{layer}.expert.{expert}")


def _move_expert(m, layer, expert, new_layer, new_expert):
    """Renumber one expert extent, its name and its tensors following."""
    e = _expert(m, layer, expert)
    old = e["name"]
    e.update(layer=new_layer, expert=new_expert, name=f"layer.{new_layer}.expert.{new_expert}")
    for t in m["tensors"]:
        if t["extent"] == old:
            t["extent"] = e["name"]


def _drop_expert(m, layer, expert):
    e = _expert(m, layer, expert)
    m["extents"].remove(e)
    m["tensors"] = [t for t in m["tensors"] if t["extent"] != e["name"]]


def _as_version(base, data, version):
    """``data`` (a mutant of ``base``) with its header and its manifest both saying ``version``."""
    m = json.loads(data[base.moff:base.moff + fuzzlib.header_of(data)["mlen"]])
    m["format_version"] = version
    return fuzzlib.with_header(fuzzlib.with_manifest(base, fuzzlib.dump(m)), version=version)


# each case: (manifest edit of the experts file, format version or None, fuzzcheck's rule or None
# for a valid file, the reader's words)
EXPERT_RULES = {
    "expert extents in a version 3 file": (lambda m: None, 3, "kind expert in a version 3",
                                           "kind must be one of 'resident', 'layer', 'files', got 'expert'"),
    "expert number and name disagree": (lambda m: _expert(m, 0, 1).update(expert=2), None,
                                        "layer/expert", "must be named 'layer.0.expert.2'"),
    "expert name with a leading zero": (lambda m: _expert(m, 1, 1).update(name="layer.1.expert.01"), None,
                                        "layer/expert", "must be named 'layer.1.expert.1'"),
    "expert number missing": (lambda m: _expert(m, 0, 0).pop("expert"), None, "layer/expert",
                              r"expert must be an integer"),
    "a gap in a layer's experts": (lambda m: _move_expert(m, 0, 1, 0, 7), None, "not numbered 0..E-1",
                                   "numbered 0..E-1 exactly once"),
    "experts of a layer the file lacks": (lambda m: _move_expert(m, 1, 3, 2, 0), None, "but 2 layers",
                                          "belongs to layer 2, but the file has 2 layer extents"),
    "last expert dropped with its tensors": (lambda m: _drop_expert(m, 1, 3), None, None, None),
    "expert moved to the other layer": (lambda m: _move_expert(m, 0, 3, 1, 4), None, None, None),
    "version 4 without experts": (lambda m: None, "v4 of another file", None, None),
}


@pytest.mark.parametrize("case", sorted(EXPERT_RULES))
def test_spec_check_expert_rules(bases, tmp_path, case):
    """Each rule of version 4's expert extents (docs/format.md, sections 2 and 3), broken on
    purpose: fuzzcheck's own reading of the spec names it, and the reader refuses the file at
    open; edits that keep the rules (valid) are accepted by both."""
    edit, version, rule, words = EXPERT_RULES[case]
    base = _experts_base(bases) if version != "v4 of another file" else _bitmap_base(bases)
    data = _with(base, edit)
    if version is not None:
        data = _as_version(base, data, 4 if version == "v4 of another file" else version)
    m = json.loads(data[base.moff:base.moff + fuzzlib.header_of(data)["mlen"]])
    broken = fuzzcheck.spec_violations(data, m)
    if rule is None:
        assert broken == []
        with EndorFile(_write(tmp_path, data)) as f:
            assert f.format_version == 4
        return
    assert any(rule in v for v in broken), broken
    with pytest.raises(FormatError, match=words):
        EndorFile(_write(tmp_path, data))


def _shard(m, layer, rank):
    return next(e for e in m["extents"] if e["name"] == f"layer.{layer}.rank.{rank}")


def _move_shard(m, layer, rank, new_layer, new_rank):
    """Renumber one shard extent, its name and its tensors (extent and rank prefix) following."""
    e = _shard(m, layer, rank)
    old = e["name"]
    e.update(layer=new_layer, rank=new_rank, name=f"layer.{new_layer}.rank.{new_rank}")
    for t in m["tensors"]:
        if t["extent"] == old:
            t.update(extent=e["name"], name=f"rank.{new_rank}.{t['name'].split('.', 2)[2]}")


def _drop_shards(m, gone):
    """Drop the shard extents for which ``gone(layer, rank)`` holds, and their tensors."""
    names = {e["name"] for e in m["extents"] if e["kind"] == "shard" and gone(e["layer"], e["rank"])}
    m["extents"] = [e for e in m["extents"] if e["name"] not in names]
    m["tensors"] = [t for t in m["tensors"] if t["extent"] not in names]


def _swap_ranks(m):
    """Ranks 0 and 1 of layer 0 trade extents, with their tensors."""
    _move_shard(m, 0, 0, 0, 9)
    _move_shard(m, 0, 1, 0, 0)
    _move_shard(m, 0, 9, 0, 1)


def _renumber_rank(m):
    """Rank 1 becomes rank 3 of a 4-rank pack, in every layer and in ranks."""
    _move_shard(m, 0, 1, 0, 3)
    _move_shard(m, 1, 1, 1, 3)
    m["tensor_parallel"].update(size=4, ranks=[0, 3])


def _move_last_tensor(m):
    """The last tensor of layer 0's rank-0 extent, with its pages, into the rank-1 extent that
    starts where it ends, under a rank-1 name of its own."""
    a, b = _shard(m, 0, 0), _shard(m, 0, 1)
    t = max((t for t in m["tensors"] if t["extent"] == a["name"]), key=lambda t: t["segments"][0]["offset"])
    cut = min(s["offset"] for s in t["segments"])
    assert b["offset"] == a["offset"] + a["length"]
    a["length"], b["offset"], b["length"] = cut - a["offset"], cut, b["length"] + b["offset"] - cut
    t.update(extent=b["name"], name=f"rank.1.moved.{t['name'].split('.', 2)[2]}")


def _as_layers_of_rank_0(m):
    """A file without shards turned into rank 0's file of a 1-rank pack."""
    m["tensor_parallel"] = {"size": 1, "ranks": [0], "pack_id": "0123456789abcdef", "plan": {}}
    for e in m["extents"]:
        if e["kind"] == "layer":
            old = e["name"]
            e.update(kind="shard", rank=0, name=f"{old}.rank.0")
            for t in m["tensors"]:
                if t["extent"] == old:
                    t.update(extent=e["name"], name=f"rank.0.{t['name']}")


def _add_extent(m, name, kind, **numbers):
    end = max(e["offset"] + e["length"] for e in m["extents"])
    m["extents"].append(dict(name=name, kind=kind, offset=end, length=0, **numbers))


def _rename_first(m, extent, new):
    t = next(t for t in m["tensors"] if t["extent"] == extent)
    t["name"] = new(t["name"])


def _plan(m, **entries):
    m["tensor_parallel"].update(**entries)


_IN_ORDER = "tensor_parallel ranks must be distinct ranks in increasing order"
_PREFIX = "the tensors of rank r's shard extents, and only they, are named rank.<r>.<name>"

# each case: (which corpus file: the tensor-parallel one, the one with experts or one with layer
# extents; manifest edit, format version or None, fuzzcheck's rule or None for a valid file, the
# reader's words)
SHARD_RULES = {
    "shard extents in a version 4 file": ("shards", lambda m: None, 4, "kind shard in a version 4",
                                          "kind must be one of 'resident', 'layer', 'files', 'expert', got 'shard'"),
    "tensor_parallel in a version 1 file": (
        "layers", lambda m: m.update(tensor_parallel={"size": 1, "ranks": [0], "pack_id": "a", "plan": {}}),
        None, "tensor_parallel in a version 1", "tensor_parallel needs format version 5, the file is version 1"),
    "rank number and name disagree": ("shards", lambda m: _shard(m, 0, 0).update(rank=1), None, "layer/rank",
                                      "must be named 'layer.0.rank.1'"),
    "rank name with a leading zero": ("shards", lambda m: _shard(m, 1, 1).update(name="layer.1.rank.01"), None,
                                      "layer/rank", "must be named 'layer.1.rank.1'"),
    "rank number missing": ("shards", lambda m: _shard(m, 0, 1).pop("rank"), None, "layer/rank",
                            r"rank must be an integer in \[0, 1023\], got None"),
    "rank 1024": ("shards", lambda m: _move_shard(m, 1, 1, 1, 1024), None, "layer 1 has shard extents of ranks",
                  r"rank must be an integer in \[0, 1023\], got 1024"),
    "a layer without one of the ranks": ("shards", lambda m: _drop_shards(m, lambda i, r: (i, r) == (1, 1)), None,
                                         "layer 1 has shard extents of ranks [0]",
                                         r"layer 1 has shard extents of ranks \[0\], the file holds ranks \[0, 1\]"),
    "shard layers with a gap": ("shards", lambda m: (_move_shard(m, 1, 0, 2, 0), _move_shard(m, 1, 1, 2, 1)), None,
                                "shard layers are not numbered", "layers must be numbered 0..L-1"),
    "shards without tensor_parallel": ("shards", lambda m: m.pop("tensor_parallel"), None,
                                       "shard extents without tensor_parallel",
                                       "is a shard, but the manifest has no tensor_parallel entry"),
    "tensor_parallel null": ("shards", lambda m: m.update(tensor_parallel=None), None,
                             "shard extents without tensor_parallel", "no tensor_parallel entry"),
    "tensor_parallel a list": ("shards", lambda m: m.update(tensor_parallel=[2]), None,
                               "tensor_parallel is not an object", "tensor_parallel must be an object, got list"),
    "ranks decreasing": ("shards", lambda m: _plan(m, ranks=[1, 0]), None, "tensor_parallel ranks", _IN_ORDER),
    "ranks empty": ("shards", lambda m: _drop_shards(m, lambda i, r: True) or _plan(m, ranks=[]), None,
                    "tensor_parallel ranks", _IN_ORDER),
    "a rank not below size": ("shards", lambda m: _plan(m, size=1), None, "tensor_parallel ranks",
                              r"ranks\[\] must be an integer in \[0, 0\], got 1"),
    "size above 1024": ("shards", lambda m: _plan(m, size=1025), None, "tensor_parallel size",
                        r"size must be an integer in \[1, 1024\], got 1025"),
    "size true": ("shards", lambda m: _plan(m, size=True), None, "tensor_parallel size",
                  r"size must be an integer in \[1, 1024\], got True"),
    "pack_id of 65 characters": ("shards", lambda m: _plan(m, pack_id="a" * 65), None, "tensor_parallel pack_id",
                                 "pack_id must be a non-empty string of at most 64 characters"),
    "plan style unknown": ("shards", lambda m: m["tensor_parallel"]["plan"].update({"self_attn.q_proj": "columnwise"}),
                           None, "tensor_parallel plan", "plan of self_attn.q_proj must be one of 'colwise', "
                                                         "'rowwise', 'replicated', got 'columnwise'"),
    "plan module with a control character": (
        "shards", lambda m: m["tensor_parallel"]["plan"].update({"mlp\x1b.up": "colwise"}), None,
        "tensor_parallel plan", r"plan module 'mlp\\x1b\.up' contains a control character"),
    "a layer extent in a tensor-parallel file": ("shards", lambda m: _add_extent(m, "layer.0", "layer", layer=0), None,
                                                 "layer or expert extents in a tensor-parallel file",
                                                 "holds its layers as shard extents only .found layer.0"),
    "an expert extent in a tensor-parallel file": (
        "shards", lambda m: _add_extent(m, "layer.0.expert.0", "expert", layer=0, expert=0), None,
        "layer or expert extents in a tensor-parallel file", "belongs to layer 0, but the file has 0 layer extents"),
    "shard tensor without its rank prefix": ("shards", lambda m: _rename_first(m, "layer.0.rank.0", lambda n: n[7:]),
                                             None, "rank prefix", _PREFIX),
    "shard tensor with another rank's prefix": (
        "shards", lambda m: _rename_first(m, "layer.0.rank.0", lambda n: "rank.1.other." + n[7:]), None,
        "rank prefix", _PREFIX),
    "resident tensor with a rank prefix": ("shards", lambda m: _rename_first(m, "resident", "rank.0.{}".format),
                                           None, "rank prefix", _PREFIX),
    # valid: a file that is not tensor-parallel may name a tensor anything
    "rank prefix in a file without shards": ("layers", lambda m: _rename_first(m, "layer.0", "rank.0.{}".format),
                                             None, None, None),
    # valid: what endor-gds split writes, ranks renumbered or swapped with their tensors, layers
    # dropped from the end, a tensor moved to another rank with its pages, a file of layer extents
    # turned into a 1-rank pack, and version 5 (experts included) without a tensor_parallel entry
    "one rank kept alone": ("shards", lambda m: (_drop_shards(m, lambda i, r: r != 1), _plan(m, ranks=[1])), None,
                            None, None),
    "two ranks swapped with their tensors": ("shards", _swap_ranks, None, None, None),
    "a rank renumbered below a larger size": ("shards", _renumber_rank, None, None, None),
    "last layer dropped with its tensors": ("shards", lambda m: _drop_shards(m, lambda i, r: i == 1), None,
                                            None, None),
    "a tensor moved to the next rank with its pages": ("shards", _move_last_tensor, None, None, None),
    "layers turned into rank 0's shards": ("layers", _as_layers_of_rank_0, 5, None, None),
    "version 5 without tensor_parallel": ("layers", lambda m: None, 5, None, None),
    "version 5 with experts": ("experts", lambda m: None, 5, None, None),
    "tensor_parallel null in a version 1 file": ("layers", lambda m: m.update(tensor_parallel=None), None,
                                                 None, None),
}


@pytest.mark.parametrize("case", sorted(SHARD_RULES))
def test_spec_check_shard_rules(bases, tmp_path, case):
    """Each rule of version 5's tensor-parallel files (docs/format.md, sections 2 and 3), broken
    on purpose: fuzzcheck's own reading of the spec names it, and the reader refuses the file at
    open; edits that keep the rules (valid) are accepted by both."""
    which, edit, version, rule, words = SHARD_RULES[case]
    base = {"shards": _shards_base, "experts": _experts_base, "layers": _bitmap_base}[which](bases)
    data = _with(base, edit)
    if version is not None:
        data = _as_version(base, data, version)
    m = json.loads(data[base.moff:base.moff + fuzzlib.header_of(data)["mlen"]])
    broken = fuzzcheck.spec_violations(data, m)
    if rule is None:
        assert broken == []
        with EndorFile(_write(tmp_path, data)) as f:
            assert f.format_version == m["format_version"]
        return
    assert any(rule in v for v in broken), broken
    with pytest.raises(FormatError, match=words):
        EndorFile(_write(tmp_path, data))


def test_fenced_buffers_turn_overreads_into_crashes():
    code = ("import ctypes, numpy; from endor_gds.fuzz import fence; "
            "a = fence.fenced_copy(numpy.arange(10, dtype='u1')); "
            "print(ctypes.c_ubyte.from_address(a.ctypes.data + 9).value, flush=True); "
            "ctypes.c_ubyte.from_address(a.ctypes.data + {}).value")
    ok = subprocess.run([sys.executable, "-c", code.format(0)], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "9", ok.stderr
    for past in (10, -4097):  # one byte past the end, one page before the start
        r = subprocess.run([sys.executable, "-c", code.format(past)], cwd=REPO, capture_output=True)
        assert r.returncode == -11, (past, r.returncode, r.stderr[-500:])


def test_bench_smoke(corpus_dir, tmp_path):
    """bench/fuzz_format.py end to end: workers, histogram, exit status, JSON summary."""
    out = tmp_path / "summary.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "fuzz_format.py"), "--cases", "8",
                        "--seed", "3", "--workers", "1", "--corpus", str(corpus_dir), "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "8 cases in" in r.stdout and "0 escapes" in r.stdout and "# fuzz_format: endor_gds" in r.stdout
    summary = json.loads(out.read_text())
    assert summary["cases"] == 8 and sum(summary["outcomes"].values()) == 8 and summary["escapes"] == []
