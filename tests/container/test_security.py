"""Security (issue 7): nothing untrusted is unpickled or evaluated; every size a manifest
declares is bounded (and checked without overflow) before it is used; embedded tokenizer files
can never be written outside the folder they are extracted into."""

from __future__ import annotations

import ast
import copy
import os
import re
import tracemalloc
from pathlib import Path

import pytest
import torch

import endor_gds
from endor_gds import container as layout
from endor_gds.container import EndorFile
from endor_gds.errors import ChecksumError, FormatError, UnsupportedModelError
from endor_gds.fuzz import fuzzlib

PACKAGE = Path(endor_gds.__file__).resolve().parent

# -- no pickle, no eval -----------------------------------------------------------------------

_MODULES = {"pickle", "_pickle", "cPickle", "marshal", "dill", "cloudpickle", "joblib", "shelve"}


def unsafe_uses(source: str, filename: str = "<src>") -> list[str]:
    """Every place in ``source`` that could run code from data: pickle-like modules (imported
    or named in a string, as for importlib), torch.load, allow_pickle=True, eval/exec."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in _MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _MODULES:
            found.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Constant) and node.value in _MODULES:
            found.append(f"{where} string {node.value!r}")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("eval", "exec"):
                found.append(f"{where} {f.id}()")
            if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) \
                    and f.value.id == "torch":
                found.append(f"{where} torch.load()")
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{where} allow_pickle={ast.unparse(kw.value)}")
    return found


def test_the_scanner_catches_each_pattern():
    samples = {
        "import pickle": "import pickle",
        "import cloudpickle as cp": "import cloudpickle",
        "from marshal import loads": "from marshal import",
        "importlib.import_module('dill')": "string 'dill'",
        "torch.load(path)": "torch.load()",
        "np.load(p, allow_pickle=True)": "allow_pickle=True",
        "np.load(p, allow_pickle=flag)": "allow_pickle=flag",
        "eval(text)": "eval()",
        "exec(code)": "exec()",
    }
    for code, expected in samples.items():
        found = unsafe_uses(code)
        assert len(found) == 1 and expected in found[0], (code, found)
    assert unsafe_uses("model.eval(); np.load(p); np.load(p, allow_pickle=False); x = 'unpickled'") == []


def test_no_pickle_or_eval_in_the_package():
    files = sorted(PACKAGE.rglob("*.py"))
    assert {"container.py", "bitmap.py", "packer.py", "cpu.py"} <= {f.name for f in files}
    found = [hit for f in files for hit in unsafe_uses(f.read_text(), str(f.relative_to(PACKAGE)))]
    assert found == []


# -- bounds -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(packed):
    return fuzzlib.load_base(packed("qwen2", torch.float16, prune="magnitude"))


def _write_edited(base, tmp_path, edit=None, data=None) -> Path:
    """``base`` with its manifest edited by ``edit(manifest)`` (CRCs fixed), or ``data`` as is."""
    if data is None:
        m = copy.deepcopy(base.manifest)
        edit(m)
        data = fuzzlib.with_manifest(base, fuzzlib.dump(m))
    path = tmp_path / "x.endor"
    path.write_bytes(data)
    return path


def _open_edited(base, tmp_path, edit=None, data=None):
    return EndorFile(_write_edited(base, tmp_path, edit, data))


def _first(m, encoding="bitmap"):
    """The first tensor of ``encoding``; for "dense", one stored as plain data (codec raw)."""
    return next(t for t in m["tensors"] if t["encoding"] == encoding
                and (encoding != "dense" or t.get("codec", "raw") == "raw"))


def test_manifest_size_is_bounded_before_reading(base, tmp_path):
    """A header claiming a huge manifest is refused before anything that size is allocated."""
    for mlen in (layout.MAX_MANIFEST_BYTES + 1, 1 << 40, (1 << 64) - 1):
        data = fuzzlib.with_header(base.data, mlen=mlen)
        tracemalloc.start()
        with pytest.raises(FormatError, match=rf"manifest range offset=\d+ length={mlen} is invalid "
                                              rf".*at most {layout.MAX_MANIFEST_BYTES} bytes"):
            _open_edited(base, tmp_path, data=data)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1 << 20


def test_writer_refuses_a_manifest_over_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "MAX_MANIFEST_BYTES", 1000)
    with open(tmp_path / "w.endor", "wb") as f:
        w = layout.Writer(f)
        with pytest.raises(FormatError, match="manifest is 2\\d\\d\\d bytes, above the 1000 limit"):
            w.finish({"pad": "x" * 2000})


@pytest.mark.parametrize("key, limit", [("tensors", layout.MAX_TENSORS), ("extents", layout.MAX_TENSORS),
                                        ("files", layout.MAX_FILES)])
def test_list_lengths_are_bounded(base, tmp_path, key, limit):
    with pytest.raises(FormatError, match=rf"{key} must be a list of at most {limit} items, "
                                          rf"got a list of {limit + 1} items"):
        _open_edited(base, tmp_path, lambda m: m.update({key: [0] * (limit + 1)}))


def _swap_prune_fields(m):
    """The fuzz case (seed 20261127, case 1638) that reached `inspect` as a TypeError."""
    p = m["prune"]
    p["detected_sparsity"], p["detected_sparsity_range"] = [0.4, 0.6], 0.5


@pytest.mark.parametrize("edit, match", [
    (_swap_prune_fields, r"prune.detected_sparsity must be a number in \[0, 1\], got a list of 2 items"),
    (lambda m: m["prune"].update(sparsity="half"), r"prune.sparsity must be a number in \[0, 1\]"),
    (lambda m: m["prune"].update(sparsity=float("nan")), r"prune.sparsity must be a number in \[0, 1\]"),
    (lambda m: m["prune"].update(detected_sparsity=True), r"prune.detected_sparsity must be a number"),
    (lambda m: m["prune"].update(detected_sparsity_range=[0.1]), r"detected_sparsity_range must be \[low, high\]"),
    (lambda m: m["prune"].update(detected_sparsity_range=[0.1, 2]), r"range item must be a number in \[0, 1\]"),
    (lambda m: m["prune"].update(method="\x1b[2Jmagnitude"), "prune.method .* contains a control character"),
    (lambda m: m["prune"].update(method=7), "prune.method must be a non-empty string"),
    (lambda m: m["prune"].update(unrouted_experts="layer.1.expert.2"), "prune.unrouted_experts must be a list"),
    (lambda m: m["prune"].update(unrouted_experts=["layer.1.expert.2", 3]),
     "prune.unrouted_experts item must be a non-empty string"),
    (lambda m: m["prune"].update(unrouted_experts=["\x1b[2J"]),
     "unrouted_experts item .* contains a control character"),
])
def test_malformed_prune_block_is_a_format_error(base, tmp_path, edit, match):
    """The prune block is informational, but `inspect` formats its numbers and prints its method:
    wrong types are refused at open with the field's name, like the rest of the manifest."""
    with pytest.raises(FormatError, match=match):
        _open_edited(base, tmp_path, edit)


def _set_generation_config(**fields):
    def edit(m):
        m["generation_config"] = {**(m.get("generation_config") or {}), **fields}
    return edit


@pytest.mark.parametrize("fields, match", [
    ({"max_length": "abc"}, r"generation_config.max_length must be an integer in \[0, 2147483647\], got 'abc'"),
    ({"max_new_tokens": -1}, "generation_config.max_new_tokens must be an integer"),
    ({"num_beams": 2.0}, "generation_config.num_beams must be an integer"),
    ({"temperature": "hot", "do_sample": True}, "generation_config.temperature must be a number, got 'hot'"),
    ({"top_p": float("nan")}, "generation_config.top_p must be a number, got nan"),
    ({"top_p": True}, "generation_config.top_p must be a number, got True"),
    ({"do_sample": "yes"}, "generation_config.do_sample must be true or false, got 'yes'"),
    ({"eos_token_id": [1.5]}, "generation_config.eos_token_id must be an integer"),
    ({"eos_token_id": [2, 1 << 31]}, r"generation_config.eos_token_id must be an integer in \[-2147483648, "),
    ({"eos_token_id": list(range(65))}, "generation_config.eos_token_id must be a list of at most 64 items"),
    ({"pad_token_id": {"a": 1}}, "generation_config.pad_token_id must be an integer .* got a dict of 1 items"),
    ({"bos_token_id": 1 << 40}, "generation_config.bos_token_id must be an integer"),
    ({"temperature": 0.7, "max_length": None, "pad_token_id": 0, "top_k": 50.5}, "generation_config.top_k must"),
])
def test_malformed_generation_config_is_a_format_error(base, tmp_path, fields, match):
    """transformers' GenerationConfig.from_dict keeps {"max_length": "abc"} as it is and
    generate() then fails with a TypeError deep inside; the file is refused at open instead."""
    with pytest.raises(FormatError, match=match):
        _open_edited(base, tmp_path, _set_generation_config(**fields))


def test_generation_config_of_the_file_is_applied_or_refused_by_name(base, tmp_path):
    good = _set_generation_config(eos_token_id=[1, 2], temperature=0.5, do_sample=True,
                                  max_new_tokens=7, top_k=None)
    model = endor_gds.from_pretrained(_write_edited(base, tmp_path, good), device="cpu")
    try:
        g = model.generation_config
        assert (g.eos_token_id, g.temperature, g.do_sample, g.max_new_tokens) == ([1, 2], 0.5, True, 7)
    finally:
        model.endor.close()
    # well typed, but transformers refuses the value: a FormatError naming the file and the block
    path = _write_edited(base, tmp_path, _set_generation_config(max_new_tokens=0))
    EndorFile(path).close()
    with pytest.raises(FormatError, match=r"x.endor: its generation_config is refused by transformers "
                                          r"\(ValueError: `max_new_tokens` must be greater than 0"):
        endor_gds.from_pretrained(path, device="cpu")


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(hidden_size=2 * c["hidden_size"]),
     r"is \[\d+, \d+\] in the file but \[\d+, \d+\] in the Qwen2ForCausalLM its config builds"),
    (lambda c: c.update(intermediate_size=c["intermediate_size"] + 8), "down_proj.weight is .* in the file but"),
    (lambda c: c.update(vocab_size=c["vocab_size"] + 1), "in the file but"),
    (lambda c: c.update(num_hidden_layers=10**9), "its config asks for 1000000000 layers"),  # was a hang
    (lambda c: c.update(num_attention_heads="eight"), r"config num_attention_heads must be an integer in "
                                                      r"\[1, 2147483647\], got 'eight'"),
    (lambda c: c.update(model_type="nosuch"), r"its config does not build a qwen2 model \(ValueError"),
    (lambda c: c.update(num_key_value_heads=0), r"config num_key_value_heads must be an integer in \[1, "),
])
def test_config_that_disagrees_with_the_tensors_is_a_format_error(base, tmp_path, edit, match):
    """The manifest CRC covers the config and the tensor table alike: a writer that gets the config
    wrong must not produce a model that runs with wrong shapes (a doubled hidden size used to run
    and give other tokens) or takes hours to build, but a FormatError naming the disagreement."""
    path = _write_edited(base, tmp_path, lambda m: edit(m["config"]))
    EndorFile(path).close()  # the file itself is well formed
    with pytest.raises(FormatError, match=match):
        endor_gds.from_pretrained(path, device="cpu")


def test_tensor_of_another_dtype_is_a_format_error(base, tmp_path):
    """A dense weight relabelled BF16 in an F16 file (the same bytes; CRC fixed) opens, and used to
    fail inside a matmul mid-forward (RuntimeError: expected m1 and m2 to have the same dtype):
    now it is refused before any read, like a shape the config disagrees with."""
    def edit(m):
        _first(m, "dense")["dtype"] = "BF16"
    path = _write_edited(base, tmp_path, edit)
    EndorFile(path).close()
    name = _first(base.manifest, "dense")["name"]
    with pytest.raises(FormatError, match=rf"x.endor: tensor {re.escape(name)} is bfloat16 in the file, "
                                          rf"but the model runs in float16"):
        endor_gds.from_pretrained(path, device="cpu")


def test_file_lacking_a_parameter_is_refused_before_any_read(base, tmp_path):
    """A manifest without the final norm (a writer that dropped it) opens, and is refused by
    from_pretrained before anything is read, naming the tensor."""
    def edit(m):
        m["tensors"] = [t for t in m["tensors"] if t["name"] != "model.norm.weight"]
    path = _write_edited(base, tmp_path, edit)
    EndorFile(path).close()
    with pytest.raises(UnsupportedModelError, match=r"x.endor: the Qwen2ForCausalLM its config builds "
                                                    r"needs tensors the file lacks: model.norm.weight"):
        endor_gds.from_pretrained(path, device="cpu")


def test_inspect_without_a_per_tensor_range(base, tmp_path, capsys):
    """An already-pruned checkpoint whose manifest has no per-tensor range still inspects."""
    from endor_gds.cli.main import main  # noqa: PLC0415

    def edit(m):
        m["prune"] = {"method": "none", "sparsity": None, "detected_sparsity": 0.5}
    _open_edited(base, tmp_path, edit).close()
    assert main(["inspect", str(tmp_path / "x.endor")]) == 0
    assert "measured sparsity 0.500 of the linear weights; --tensors" in capsys.readouterr().out


@pytest.mark.parametrize("shape, match", [
    ([1] * 9, "shape must be a list of at most 8 items, got a list of 9 items"),
    ([1 << 40, 1 << 40], r"has 1208925819614629174706176 elements, above 1099511627776"),
    # 2^32 * 2^32 wraps to 0 in 64-bit arithmetic: the product is checked in Python integers
    ([1 << 32, 1 << 32], r"has 18446744073709551616 elements, above 1099511627776"),
    ([2, 3, 5, 7, 11, 13, 1 << 20, 1 << 20], r"elements, above 1099511627776"),
    ([(1 << 40) + 1], r"shape must be an integer in \[0, 1099511627776\], got 1099511627777"),
    ([1 << 64], r"shape must be an integer in \[0, 1099511627776\], got an integer of 65 bits"),
    ([-1, -4096], r"shape must be an integer in \[0, 1099511627776\], got -1"),
    ([64.0, 64], r"shape must be an integer .* got 64\.0"),
    ([True, 64], r"shape must be an integer .* got True"),
    ("64x64", r"shape must be a list of at most 8 items, got '64x64'"),
    ([65536, 65537], r"bitmap-encoded tensor holds at most 4294967295 elements"),
])
def test_shapes_are_bounded_and_overflow_checked(base, tmp_path, shape, match):
    def edit(m):
        t = _first(m)
        t["shape"] = shape
        fuzzlib.consistent_sizes(t)  # so that only the shape rule can refuse it

    with pytest.raises(FormatError, match=match):
        _open_edited(base, tmp_path, edit)


@pytest.mark.parametrize("field, value, match", [
    ("nnz", -1, r"nnz must be an integer in \[0, \d+\], got -1"),
    ("nnz", "numel+1", None),
    ("offset", (1 << 64) - 4096, r"segment 0 offset must be an integer in \[4096, \d+\], got 18446744073709547520"),
    ("length", 1 << 62, r"segment 0 length must be an integer in \[0, \d+\], got 4611686018427387904"),
    ("nbytes", 1 << 62, r"segment 0 nbytes must be an integer in \[0, \d+\]"),
    ("crc32c", 1 << 32, r"segment 0 crc32c must be an integer in \[0, 4294967295\]"),
])
def test_counts_and_offsets_are_bounded(base, tmp_path, field, value, match):
    shape = _first(base.manifest)["shape"]
    numel = shape[0] * shape[1]
    if match is None:
        match = rf"nnz must be an integer in \[0, {numel}\], got {numel + 1}$"

    def edit(m):
        t = _first(m)
        if field == "nnz":
            t["nnz"] = numel + 1 if value == "numel+1" else value
        else:
            t["segments"][0][field] = value

    with pytest.raises(FormatError, match=match):
        _open_edited(base, tmp_path, edit)


def test_header_fields_near_2_to_the_64(base, tmp_path):
    u64 = (1 << 64) - 1
    for fields, match in (({"flen": u64}, "file is \\d+ bytes but its header says 18446744073709551615"),
                          ({"moff": u64 - 4095}, "manifest range offset=18446744073709547520"),
                          ({"moff": 4096, "mlen": u64}, "manifest range offset=4096 length=18446744073709551615")):
        with pytest.raises(FormatError, match=match):
            _open_edited(base, tmp_path, data=fuzzlib.with_header(base.data, **fields))


@pytest.mark.parametrize("where", ["tensor", "extent", "tied", "architecture"])
def test_names_with_control_characters_are_refused(base, tmp_path, where):
    """Names are printed in error messages and by `endor-gds inspect`: an ANSI escape sequence
    in one could rewrite the user's terminal."""
    evil = "model.layers.0\x1b[2J\x1b[1;1Hall good"

    def edit(m):
        if where == "tensor":
            _first(m, "dense")["name"] = evil
        elif where == "extent":
            m["extents"][0]["name"] = evil
        elif where == "tied":
            m["tied"] = {evil: m["tensors"][0]["name"]}
        else:
            m["architecture"] = "llama\x07"

    with pytest.raises(FormatError, match="contains a control character") as info:
        _open_edited(base, tmp_path, edit)
    assert "\x1b" not in str(info.value) and "\x07" not in str(info.value)


# -- embedded files ---------------------------------------------------------------------------

HOSTILE = ["../evil", "../../etc/passwd", "/etc/passwd", "a/b", "a\\b", "nul\x00x", ".", "..",
           ".hidden", "tökenizer.json", " ", "a\nb", "tokenizer.json/", "~", "$HOME", "*"]


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
def test_hostile_embedded_file_names_are_refused_at_open(base, tmp_path, name):
    with pytest.raises(FormatError, match=r"embedded file name .* is not a plain file name|"
                                          r"files\[0\]\.name .* contains a control character"):
        _open_edited(base, tmp_path, lambda m: m["files"][0].update(name=name))


@pytest.mark.parametrize("name", ["", "x" * 129, None, 7, ["a"]], ids=repr)
def test_empty_long_or_non_string_names_are_refused(base, tmp_path, name):
    with pytest.raises(FormatError, match=r"files\[0\]\.name must be a non-empty string of at most 128"):
        _open_edited(base, tmp_path, lambda m: m["files"][0].update(name=name))


def test_extract_files(base, tmp_path):
    dest = tmp_path / "tok" / "nested"
    with endor_gds.open(base.path) as f:
        paths = f.extract_files(dest)
    assert sorted(paths) == sorted(base.files) and "tokenizer.json" in paths
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == base.files
    assert all(paths[n] == dest / n for n in paths)


def test_extract_files_refuses_a_name_that_escapes(base, tmp_path):
    """Even when the validator is bypassed (the entry injected after open)."""
    dest = tmp_path / "dest"
    dest.mkdir()
    with endor_gds.open(base.path) as f:
        for name in ("../escaped.json", str(tmp_path / "abs.json"), "a/../../b"):
            f.files[name] = f.files["tokenizer.json"]
            with pytest.raises(FormatError, match="is not a plain file name"):
                f.extract_files(dest)
            del f.files[name]
    assert list(dest.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["dest"]
    assert not (tmp_path.parent / "escaped.json").exists()


def test_extract_files_replaces_a_planted_symlink_instead_of_following_it(base, tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "tokenizer.json").symlink_to(outside)
    with endor_gds.open(base.path) as f:
        f.extract_files(dest)
    assert outside.read_text() == "keep me"
    assert not (dest / "tokenizer.json").is_symlink()
    assert (dest / "tokenizer.json").read_bytes() == base.files["tokenizer.json"]


def test_extract_files_writes_nothing_from_a_damaged_file(base, tmp_path):
    seg = next(s for s in base.segments if s.label == "file tokenizer.json")
    data = bytearray(base.data)
    data[seg.offset] ^= 1
    path = tmp_path / "bad.endor"
    path.write_bytes(data)
    dest = tmp_path / "dest"
    with endor_gds.open(path) as f:
        with pytest.raises(ChecksumError, match="segment file tokenizer.json .* fails its CRC-32C"):
            f.extract_files(dest)
    assert not dest.exists() or list(dest.iterdir()) == []


def test_extract_files_leaves_no_temporary_file_when_a_rename_fails(base, tmp_path, monkeypatch):
    dest = tmp_path / "dest"
    real = os.replace
    calls = []

    def second_fails(*a, **k):
        calls.append(a)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(os, "replace", second_fails)
    with endor_gds.open(base.path) as f, pytest.raises(OSError, match="No space left"):
        f.extract_files(dest)
    monkeypatch.undo()
    assert len(calls) == 2 and [p.name for p in dest.iterdir()] == [calls[0][1]]  # first file only
