import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import endor_gds
import endor_gds.packing.packer as pack_mod
from endor_gds.benchmarks.models import FAMILIES, build_model, state_dict_of
from endor_gds.cli.main import main as cli_main
from endor_gds.errors import FormatError, PackError, UnsupportedModelError
from endor_gds.recipes import recipe_for

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_round_trip_unpruned_bit_exact(model_dir, packed, family, dtype, sharded):
    src = model_dir(family, dtype, sharded)
    if sharded:
        assert (src / "model.safetensors.index.json").exists()
    path = packed(family, dtype, prune="none", sharded=sharded)
    sd = state_dict_of(src)
    with endor_gds.open(path) as f:
        assert f.architecture == recipe_for(f.config).family
        assert len(f.layers) == f.config["num_hidden_layers"]
        for name, t in sd.items():
            got = f.read_tensor(name, verify=True)
            assert got.dtype == t.dtype and got.shape == t.shape, name
            assert _bits(got) == _bits(t), name


@pytest.mark.parametrize("family", FAMILIES)
def test_magnitude_pruning_exact_per_row(model_dir, packed, family):
    src = model_dir(family, torch.float16)
    path = packed(family, torch.float16, prune="magnitude", sparsity=0.5)
    sd = state_dict_of(src)
    with endor_gds.open(path) as f:
        recipe = recipe_for(f.config)
        assert f.manifest["prune"] == {"method": "magnitude", "sparsity": 0.5}
        n_sparse = 0
        for name, t in sd.items():
            got = f.read_tensor(name)
            if recipe.is_linear_weight(name):
                zeros_per_row = (got == 0).sum(dim=1)
                assert (zeros_per_row == t.shape[1] // 2).all(), name
                kept = got != 0
                assert torch.equal(got[kept], t[kept]), name  # survivors untouched
                # every dropped entry is no larger than every kept one in its row
                a = t.float().abs()
                assert (a.masked_fill(kept, float("inf")).amin(1) >= 0).all()
                assert (a.masked_fill(kept, -1).amax(1) <= a.masked_fill(~kept, float("inf")).amin(1)).all()
                n_sparse += f.tensors[name].encoding == "bitmap"
            else:
                assert _bits(got) == _bits(t), f"{name} must not be pruned"
        assert n_sparse > 0


def test_tied_embeddings_stored_once(model_dir, packed):
    path = packed("opt", torch.float16, prune="none")
    with endor_gds.open(path) as f:
        assert f.tied == {"lm_head.weight": "model.decoder.embed_tokens.weight"}
        assert "lm_head.weight" not in f.tensors
        assert torch.equal(f.read_tensor("lm_head.weight"), f.read_tensor("model.decoder.embed_tokens.weight"))
    path = packed("llama", torch.float16, prune="none", tie_word_embeddings=True)
    with endor_gds.open(path) as f:
        assert f.tied == {"lm_head.weight": "model.embed_tokens.weight"}


def test_layout_pages_and_extents_via_inspect_json(packed, capsys):
    path = packed("qwen2", torch.bfloat16, prune="magnitude")
    assert cli_main(["inspect", str(path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    for key in ("format_version", "architecture", "layers", "tensors", "totals"):
        assert key in s
    for key in ("dense_bytes", "stored_bytes", "ratio", "encoded_ratio"):
        assert key in s["totals"]
    layers = {f"layer.{layer['index']}": layer for layer in s["layers"]}
    assert len(layers) == 3
    for layer in s["layers"]:
        assert layer["offset"] % 4096 == 0 and layer["length"] % 4096 == 0
    spans = []
    for t in s["tensors"]:
        for k in ("name", "shape", "dtype", "encoding", "nnz", "segments"):
            assert k in t
        for seg in t["segments"]:
            assert seg["offset"] % 4096 == 0 and seg["length"] % 4096 == 0, (t["name"], seg)
            spans.append((seg["offset"], seg["offset"] + seg["length"]))
            if t["extent"].startswith("layer."):
                ext = layers[t["extent"]]
                assert ext["offset"] <= seg["offset"] and seg["offset"] + seg["length"] <= ext["offset"] + ext["length"]
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    # each layer's segments fill its extent exactly: one contiguous read, no gaps
    for name, ext in layers.items():
        total = sum(seg["length"] for t in s["tensors"] if t["extent"] == name for seg in t["segments"])
        assert total == ext["length"]


def test_verify_catches_any_flipped_byte(packed, tmp_path, rng):
    src = packed("llama", torch.float16, prune="magnitude")
    with endor_gds.open(src) as f:
        segs = [(e.name, s) for e in f.tensors.values() for s in e.segments.values()]
    assert cli_main(["verify", str(src)]) == 0
    data = src.read_bytes()
    for trial in range(12):
        name, seg = segs[int(rng.integers(len(segs)))]
        pos = seg.offset + int(rng.integers(seg.length))
        bad = bytearray(data)
        bad[pos] ^= 1 << int(rng.integers(8))
        p = tmp_path / f"bad{trial}.endor"
        p.write_bytes(bad)
        with endor_gds.open(p, check_tiles=False) as f:
            errors = list(f.verify())
        assert len(errors) == 1 and name in str(errors[0]), (name, pos)
        assert cli_main(["verify", str(p)]) == 1


class _Boom(Exception):
    pass


def test_interrupted_pack_leaves_nothing(model_dir, tmp_path, monkeypatch):
    src = model_dir("llama", torch.float16)
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    dst = tmp_path / "out.endor"

    calls = {"n": 0}
    real = pack_mod._write_tensor

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise _Boom("injected")
        return real(*a, **k)

    monkeypatch.setattr(pack_mod, "_write_tensor", failing)
    with pytest.raises(_Boom):
        endor_gds.pack(src, dst, prune="magnitude", progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(pack_mod, "_write_tensor", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        endor_gds.pack(src, dst, progress=False)
    assert list(tmp_path.iterdir()) == []
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before


def test_interrupted_pack_keeps_previous_destination(packed, model_dir, tmp_path, monkeypatch):
    dst = tmp_path / "keep.endor"
    dst.write_bytes(packed("llama", torch.float16).read_bytes())
    before = dst.read_bytes()

    def enospc(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pack_mod, "_write_tensor", enospc)
    with pytest.raises(PackError, match="No space left.*Nothing was written"):
        endor_gds.pack(model_dir("llama", torch.float16), dst, progress=False)
    assert dst.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.endor"]


def test_unknown_architecture_lists_families(tmp_path):
    src = build_model(tmp_path / "gpt2", "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (src / "config.json").write_text(json.dumps(cfg))
    families = "deepseek_v3, llama, mistral, mixtral, olmoe, opt, qwen2, qwen2_moe"
    with pytest.raises(UnsupportedModelError, match=f"supported families: {families}.*layouts/"):
        endor_gds.pack(src, tmp_path / "x.endor", progress=False)
    assert not (tmp_path / "x.endor").exists()


def test_stray_tensor_is_named(tmp_path):

    src = build_model(tmp_path / "m", "llama")
    sd = load_file(src / "model.safetensors")
    sd["model.extra_thing.weight"] = torch.zeros(4)
    save_file(sd, src / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="model.extra_thing.weight.*resident"):
        endor_gds.pack(src, tmp_path / "x.endor", progress=False)


def test_generation_config_checked_before_packing(tmp_path):
    """A checkpoint's generation_config.json is checked as the reader will check the file's copy,
    before anything is written: no pack may produce a file that then refuses to open. Values real
    folders carry (pad_token_id -1) pack, open and reach the model."""
    src = build_model(tmp_path / "m", "llama")
    gen_path = src / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    gen_path.write_text(json.dumps({**gen, "max_length": "4096"}))
    with pytest.raises(FormatError, match=r"generation_config.json: generation_config.max_length "
                                          r"must be an integer in \[0, 2147483647\], got '4096'"):
        endor_gds.pack(src, tmp_path / "x.endor", progress=False)
    assert list(tmp_path.glob("*.endor")) == [] and list(tmp_path.glob(".*.tmp")) == []

    gen_path.write_text(json.dumps({**gen, "pad_token_id": -1, "eos_token_id": [2, 3]}))
    endor_gds.pack(src, tmp_path / "x.endor", progress=False)
    model = endor_gds.from_pretrained(tmp_path / "x.endor", device="cpu")
    try:
        assert (model.generation_config.pad_token_id, model.generation_config.eos_token_id) == (-1, [2, 3])
    finally:
        model.endor.close()


@pytest.mark.parametrize("name, text, match", [
    ("config.json", '{"model_type": "llama",', r"config.json: not valid JSON \(Expecting"),
    ("config.json", "[1, 2]", "config.json: expected a JSON object, got list"),
    ("generation_config.json", "\xff\xfe", "generation_config.json: not valid JSON"),
    ("generation_config.json", '"greedy"', "generation_config.json: expected a JSON object, got str"),
    ("model.safetensors.index.json", '{"weight_map": [1]}', "weight_map must map tensor names to shard"),
])
def test_checkpoint_json_errors_are_named(tmp_path, name, text, match):
    """A checkpoint folder's JSON files that do not parse, or are not objects, are a FormatError
    naming the file, before anything is written."""
    src = build_model(tmp_path / "m", "llama")
    (src / name).write_bytes(text.encode("latin-1"))
    with pytest.raises(FormatError, match=match):
        endor_gds.pack(src, tmp_path / "x.endor", progress=False)
    assert list(tmp_path.glob("*.endor")) == []


def _edit_safetensors(src: Path, edit) -> None:
    """Rewrite model.safetensors' JSON header with ``edit(header)`` (its data left as it is)."""
    p = src / "model.safetensors"
    blob = p.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = edit(json.loads(blob[8:8 + n]))
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    p.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + n:])


def _entry(key: str, value):
    """An edit setting field ``key`` of lm_head.weight's header entry to ``value``."""
    def edit(h):
        h["lm_head.weight"][key] = value(h["lm_head.weight"][key]) if callable(value) else value
        return h
    return edit


LM_HEAD = "lm_head.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"


def _set_dtype(h):
    """q_proj of layer 0 relabelled BF16: the same bytes, another dtype than every other weight."""
    h[Q0]["dtype"] = "BF16"
    return h


@pytest.mark.parametrize("edit, config, error, match", [
    # the safetensors header, typed as the format defines it
    (lambda h: [1, 2], None, FormatError,
     r"model.safetensors: safetensors header must be an object, got list"),
    (lambda h: b"[" * 100_000 + b"]" * 100_000, None, FormatError,
     r"safetensors header is not JSON \(maximum recursion"),
    (lambda h: {**h, LM_HEAD: "F16"}, None, FormatError,
     r"safetensors entry 'lm_head.weight' must be an object"),
    (lambda h: {**h, "bad\x1bname": h[LM_HEAD]}, None, FormatError,
     r"safetensors tensor name .* contains a control character"),
    (_entry("dtype", ["F16"]), None, FormatError,
     r"tensor lm_head.weight dtype must be one of 'F16', .* got a list of 1 items"),
    (_entry("shape", lambda s: [-x for x in s]), None, FormatError,
     r"tensor lm_head.weight shape must be an integer in \[0, \d+\], got -512"),
    (_entry("shape", lambda s: [x + 0.5 for x in s]), None, FormatError,
     r"shape must be an integer .*, got 512.5"),
    # (2^16 * 65537) * (2^32 - 2^16 + 1) = 2^64 + 2^16: in int64 it wrapped to lm_head's 65536 elements
    (_entry("shape", [65536 * 65537, (1 << 32) - (1 << 16) + 1]), None, FormatError,
     r"tensor lm_head.weight data_offsets \[0, 131072\] hold 131072 bytes, but F16 of shape "
     r"\[4295032832, 4294901761\] needs 36893488147419234304"),
    (_entry("data_offsets", lambda o: [*o, 0]), None, FormatError,
     r"data_offsets must be a list \[begin, end\], got a list of 3"),
    (_entry("data_offsets", lambda o: [str(x) for x in o]), None, FormatError,
     r"data_offsets must be an integer .*, got '0'"),
    # the tensors against the model their config builds, as from_pretrained checks them
    (_entry("shape", lambda s: s[::-1]), None, FormatError,
     r"tensor lm_head.weight is \[128, 512\] in the checkpoint but \[512, 128\] in the "
     r"LlamaForCausalLM its config builds"),
    (None, {"hidden_size": 256}, FormatError, r"is \[\d+, 128\] in the checkpoint but \[\d+, 256\]"),
    (_set_dtype, None, FormatError,
     rf"tensor {Q0} is bfloat16 in the checkpoint, but the model runs in float16"),
    # as the safetensors library checks a shard: back to back, covering the file exactly
    (_entry("data_offsets", lambda o: [o[0] + 2, o[1] + 2]), None, FormatError,
     r"tensor lm_head.weight data begins at byte \d+, but the tensors before it end at byte \d+"),
    (lambda h: {**h, "__metadata__": {"format": 1}}, None, FormatError,
     r"__metadata__ must map names to strings"),
    (None, {"hidden_act": "nosuch"}, FormatError, r"its config does not build a llama model \(KeyError"),
    (None, {"num_attention_heads": "four"}, FormatError,
     r"config num_attention_heads must be an integer in \[1, 2147483647\], got 'four'"),
    # transformers types sizes but does not bound them (an OPT config with -1 heads built and loaded)
    (None, {"num_attention_heads": -1}, FormatError,
     r"m: config num_attention_heads must be an integer in \[1, 2147483647\], got -1"),
    # 10^9 layers allocated a list per layer before any check (MemoryError after 27 s at 10^8)
    (None, {"num_hidden_layers": 10**9}, UnsupportedModelError,
     r"num_hidden_layers=1000000000 but the checkpoint has no tensors of layer 3"),
])
def test_source_checkpoint_errors_are_named(tmp_path, edit, config, error, match):
    """A damaged or inconsistent source checkpoint is refused with a named error before anything is
    written, and no pack makes a file that from_pretrained then refuses (each case used to raise
    AttributeError, TypeError or RuntimeError from the packer, to pack a shard the safetensors
    library refuses, or to pack a file that failed at load or inside a matmul)."""
    src = build_model(tmp_path / "m", "llama", tokenizer=False)
    if edit is not None:
        _edit_safetensors(src, edit)
    if config is not None:
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, **config}))
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(error, match=match):
        endor_gds.pack(src, tmp_path / "x.endor", progress=False)
    assert list(tmp_path.glob("*.endor")) == [] and list(tmp_path.glob(".*.tmp")) == []
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_checkpoint_lacking_a_parameter(tmp_path):
    """A well-formed checkpoint without a tensor its model needs packed, and from_pretrained then
    refused the file: now the pack refuses it, naming the tensor."""
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    src = build_model(tmp_path / "m", "llama", tokenizer=False)
    sd = load_file(src / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match=r"the LlamaForCausalLM its config builds needs "
                                                    r"tensors the checkpoint lacks: model.norm.weight"):
        endor_gds.pack(src, tmp_path / "x.endor", progress=False)
    assert list(tmp_path.glob("*.endor")) == []


def test_truncated_shard(tmp_path):
    """An incomplete download: the shard ends inside its last tensor."""
    src = build_model(tmp_path / "m", "llama", tokenizer=False)
    p = src / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(FormatError, match=r"model.safetensors: tensor \S+ ends at byte \d+, past the end "
                                          r"of the file \(\d+ bytes\): a truncated shard \(incomplete "
                                          r"download\?\)"):
        endor_gds.pack(src, tmp_path / "x.endor", progress=False)


def test_index_naming_a_missing_shard(tmp_path):
    src = build_model(tmp_path / "m", "llama", sharded=True, tokenizer=False)
    shard = sorted(src.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FormatError, match=rf"index.json: its weight_map names 1 shard\(s\) the folder "
                                          rf"lacks \({shard.name}; incomplete download\?\)"):
        endor_gds.pack(src, tmp_path / "x.endor", progress=False)


def test_tokenizer_and_config_embedded(packed, model_dir):
    path = packed("mistral", torch.float16)
    src = model_dir("mistral", torch.float16)
    with endor_gds.open(path) as f:
        assert "tokenizer.json" in f.files
        assert f.read_file("tokenizer.json") == (src / "tokenizer.json").read_bytes()
        assert f.config == json.loads((src / "config.json").read_text())


def test_cli_pack_inspect_verify(model_dir, tmp_path, capsys):
    src = model_dir("llama", torch.float16)
    dst = tmp_path / "cli.endor"
    # the real entry point once, in a fresh interpreter
    r = subprocess.run([sys.executable, "-m", "endor_gds", "pack", str(src), str(dst),
                        "--prune", "magnitude", "--sparsity", "0.5", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    assert cli_main(["inspect", str(dst), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "layer" in out and "q_proj" in out and "pruned: magnitude" in out
    assert cli_main(["verify", str(dst)]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli_main(["inspect", str(tmp_path / "missing.endor")]) == 2
    assert "No such file" in capsys.readouterr().err
    (tmp_path / "junk.endor").write_bytes(b"x" * 5000)
    assert cli_main(["inspect", str(tmp_path / "junk.endor")]) == 2
    err = capsys.readouterr().err
    assert "FormatError" in err and "bad magic" in err


def test_sparse_ratio_realistic_shapes(tmp_path):
    """TinyLlama-1.1B layer shapes (hidden 2048, MLP 5632, 4 KV heads), 50 % magnitude, fp16,
    format v1 values (codec raw; format v2 is tests/codec/test_expdict.py)."""
    src = build_model(tmp_path / "tl", "llama", hidden_size=2048, intermediate_size=5632,
                      num_attention_heads=32, num_key_value_heads=4, num_hidden_layers=1,
                      vocab_size=1024, tokenizer=False)
    dst = tmp_path / "tl.endor"
    endor_gds.pack(src, dst, prune="magnitude", sparsity=0.5, progress=False, codec="raw")
    with endor_gds.open(dst) as f:
        totals = f.summary()["totals"]
    assert totals["encoded_ratio"] >= 1.76, totals
    assert totals["encoded_ratio"] <= 16 / 9


def test_moe_needs_transformers_5(model_dir, packed, tmp_path, monkeypatch):
    """transformers 4.x holds experts as per-expert modules, not the fused 3-D parameters the MoE
    recipes name: packing or opening a MoE model there is a named error before anything is
    written or read; dense families are not concerned."""
    import endor_gds.recipes as recipes  # noqa: PLC0415

    moe_file = packed("qwen3_moe", torch.float16, prune="none")
    monkeypatch.setattr(recipes, "transformers_major", lambda: 4)
    with pytest.raises(UnsupportedModelError, match=r"qwen3_moe is a mixture-of-experts model: it needs "
                                                     r"transformers >= 5.*pip install"):
        endor_gds.pack(model_dir("qwen3_moe", torch.float16), tmp_path / "x.endor", progress=False)
    assert not (tmp_path / "x.endor").exists()
    with pytest.raises(UnsupportedModelError, match="needs transformers >= 5"):
        endor_gds.from_pretrained(moe_file, device="cpu")
    endor_gds.pack(model_dir("llama", torch.float16), tmp_path / "dense.endor", prune="none", progress=False)
    assert recipes.transformers_major() == 4 and (tmp_path / "dense.endor").exists()
