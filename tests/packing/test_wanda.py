"""Wanda pruning layer by layer (issue 8): exactness, an independent reference, quality, errors."""

import json

import numpy as np
import pytest
import torch
import transformers
from conftest import HAS_GPU
from reference import PROMPT, reference_model
from safetensors.torch import load_file, save_file

import endor_gds
import endor_gds.packing.wanda as wanda_mod
from endor_gds.benchmarks.models import FAMILIES, build_model, state_dict_of
from endor_gds.cli.main import main as cli_main
from endor_gds.errors import EndorError, FormatError, UnsupportedModelError
from endor_gds.packing.checkpoint import Checkpoint
from endor_gds.packing.prune import kept_per_row, magnitude_prune, wanda_prune
from endor_gds.packing.wanda import CalibrationError, WandaPruner, load_calibration, make_pruner
from endor_gds.recipes import recipe_for

SAMPLES, SEQLEN, VOCAB = 8, 32, 512  # endor_gds/benchmarks/models.py builds vocab_size=512, max positions 256


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _calib_ids(n: int, seed: int = 7) -> np.ndarray:
    # ids >= 3 so that the same stream can be written as text for the word-level tokenizer
    return np.random.default_rng(seed).integers(3, VOCAB, n)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """A .ids file of exactly SAMPLES x SEQLEN ids (so the windows are consecutive) + the ids."""
    ids = _calib_ids(SAMPLES * SEQLEN)
    path = tmp_path_factory.mktemp("calib") / "calib.ids"
    path.write_text(" ".join(map(str, ids)))
    return path, torch.from_numpy(ids).reshape(SAMPLES, SEQLEN)


@pytest.fixture(scope="module")
def wanda_packed(model_dir, calib, tmp_path_factory):
    """``wanda_packed(family)`` → a cached .endor file, Wanda 50 % with the module's calibration."""
    cache = {}
    root = tmp_path_factory.mktemp("wanda")

    def get(family):
        if family not in cache:
            cache[family] = root / f"{family}.endor"
            endor_gds.pack(model_dir(family, torch.float16), cache[family], prune="wanda",
                           sparsity=0.5, calib=calib[0], calib_samples=SAMPLES, calib_seqlen=SEQLEN,
                           progress=False)
        return cache[family]

    return get


def _tensors(path) -> dict[str, torch.Tensor]:
    with endor_gds.open(path) as f:
        return {name: f.read_tensor(name) for name in f.tensors}


# -- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_per_row_sparsity_rest_untouched(model_dir, wanda_packed, family):
    sd = state_dict_of(model_dir(family, torch.float16))
    path = wanda_packed(family)
    with endor_gds.open(path) as f:
        recipe = recipe_for(f.config)
        prune = f.manifest["prune"]
        assert prune["method"] == "wanda" and prune["sparsity"] == 0.5
        cal = prune["calibration"]
        assert (cal["source"], cal["kind"], cal["samples"], cal["seqlen"], cal["tokens"]) == \
            ("calib.ids", "ids", SAMPLES, SEQLEN, SAMPLES * SEQLEN)
        assert cal["tokens_available"] == SAMPLES * SEQLEN and cal["seconds"] > 0
        untouched = pruned = 0
        for name, t in sd.items():
            got = f.read_tensor(name)
            if recipe.is_linear_weight(name):
                drop = t.shape[1] - kept_per_row(t.shape[1], 0.5)
                assert ((got == 0).sum(dim=1) == drop).all(), name
                assert f.tensors[name].nnz == t.numel() - t.shape[0] * drop, name  # all +0.0
                kept = got != 0
                assert torch.equal(got[kept], t[kept]), f"{name}: survivors must be unchanged"
                pruned += 1
            else:  # embeddings, norms, biases, lm_head: bit for bit the checkpoint's
                assert _bits(got) == _bits(t), f"{name} must not be pruned"
                untouched += 1
    assert pruned == len(recipe.linear) * 3 and untouched >= 3 * 2 + 2


def _reference_wanda(src, ids: torch.Tensor, sparsity: float) -> dict[str, torch.Tensor]:
    """Wanda as its authors' code does it, on the whole model loaded normally by transformers.

    For layer i: hooks on layer i's linears, the *full* model run on every calibration sequence
    (so layer i sees what the already pruned layers 0..i-1 produce, through the model's own mask
    and position handling), then each weight pruned in place by a stable sort of |W| * ||X_j||.
    Nothing here is shared with endor_gds.packing.wanda.
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16).eval()
    recipe = recipe_for(json.loads((src / "config.json").read_text()))
    layers = model.get_submodule(recipe.layers)
    out = {}
    with torch.no_grad():
        for i, layer in enumerate(layers):
            sq = {}

            def hook(name):
                def fn(module, args, output):
                    x = args[0].reshape(-1, args[0].shape[-1]).double()
                    sq[name] = sq.get(name, 0) + (x * x).sum(0)
                return fn

            handles = [layer.get_submodule(lin).register_forward_hook(hook(lin)) for lin in recipe.linear]
            for j in range(len(ids)):
                model(input_ids=ids[j:j + 1], use_cache=False)
            for h in handles:
                h.remove()
            for lin in recipe.linear:
                w = layer.get_submodule(lin).weight.data
                metric = w.abs().float() * torch.sqrt(sq[lin]).float().reshape(1, -1)
                idx = torch.sort(metric, dim=-1, stable=True)[1][:, :int(w.shape[1] * sparsity)]
                w[torch.zeros_like(w, dtype=torch.bool).scatter_(1, idx, True)] = 0
                out[f"{recipe.layers}.{i}.{lin}.weight"] = w.clone()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_independent_in_memory_wanda(model_dir, wanda_packed, calib, family):
    """Bit-exact: same activations (same kernels, batch 1, same layer arguments), norms summed in
    float64 in the same order, and the score formed in float32 as in the reference code."""
    ref = _reference_wanda(model_dir(family, torch.float16), calib[1], 0.5)
    got = _tensors(wanda_packed(family))
    for name, w in ref.items():
        same = (got[name] == 0) == (w == 0)
        assert same.all(), f"{name}: {int((~same).sum())} of {w.numel()} mask entries differ"
        assert _bits(got[name]) == _bits(w), name


def test_one_layer_in_memory_at_a_time(model_dir, calib, monkeypatch, tmp_path):
    """During capture only resident tensors used before layer 0 are real and no layer has been
    read yet; while layer i runs, only layer i's parameters are."""

    real_run, real_record = wanda_mod.WandaPruner._run, wanda_mod.WandaPruner._record
    real_read = Checkpoint.read
    seen = {"capture": set(), "layers": [], "read": [], "read_at_capture": set()}

    def read(self, name):
        seen["read"].append(name)
        return real_read(self, name)

    def live(pruner):
        return {n for n, p in pruner.model.named_parameters() if not p.is_meta}

    def run(self, layer, index, j):
        seen["layers"].append((index, live(self)))
        return real_run(self, layer, index, j)

    def record(self, index, *args, **kwargs):
        seen["capture"] |= live(self)
        seen["read_at_capture"] |= set(seen["read"])
        return real_record(self, index, *args, **kwargs)

    monkeypatch.setattr(wanda_mod.WandaPruner, "_run", run)
    monkeypatch.setattr(wanda_mod.WandaPruner, "_record", record)
    monkeypatch.setattr(Checkpoint, "read", read)
    src = model_dir("llama", torch.float16)
    endor_gds.pack(src, tmp_path / "one-layer.endor", prune="wanda", calib=calib[0],
                   calib_samples=SAMPLES, calib_seqlen=SEQLEN, progress=False)
    assert seen["capture"] == {"model.embed_tokens.weight"}  # not model.norm, not lm_head
    assert seen["read_at_capture"] == {"model.embed_tokens.weight"}  # before the packer's reads
    assert len(seen["layers"]) == 3 * 2 * SAMPLES  # two passes over the samples per layer
    sd = state_dict_of(src)
    for index, names in seen["layers"]:
        assert names == {n for n in sd if n.startswith(f"model.layers.{index}.")}, index


def test_deterministic(model_dir, wanda_packed, calib, tmp_path):
    first = wanda_packed("qwen2")
    again = tmp_path / "again.endor"
    endor_gds.pack(model_dir("qwen2", torch.float16), again, prune="wanda", calib=calib[0],
                   calib_samples=SAMPLES, calib_seqlen=SEQLEN, progress=False)
    with endor_gds.open(first) as a, endor_gds.open(again) as b:
        # same segments at the same offsets with the same CRC-32C: the same bytes
        assert a.manifest["tensors"] == b.manifest["tensors"]


# -- calibration inputs -------------------------------------------------------------------------


def test_text_and_ids_calibration_agree(model_dir, wanda_packed, calib, tmp_path):
    """The word-level test tokenizer maps "w<i>" to id i, so this text is the .ids stream."""
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i}" for i in calib[1].reshape(-1).tolist()) + "\n")
    dst = tmp_path / "text.endor"
    endor_gds.pack(model_dir("llama", torch.float16), dst, prune="wanda", calib=text,
                   calib_samples=SAMPLES, calib_seqlen=SEQLEN, progress=False)
    with endor_gds.open(dst) as f:
        cal = f.manifest["prune"]["calibration"]
        assert (cal["source"], cal["kind"], cal["tokens"]) == ("calib.txt", "text", SAMPLES * SEQLEN)
    a, b = _tensors(dst), _tensors(wanda_packed("llama"))
    assert a.keys() == b.keys() and all(_bits(a[n]) == _bits(b[n]) for n in a)


def test_longer_calibration_windows_spread_and_disjoint(model_dir, tmp_path):
    stream = _calib_ids(1000)
    path = tmp_path / "long.ids"
    path.write_text("\n".join(map(str, stream)))
    c = load_calibration(path, model_dir("llama"), samples=4, seqlen=100, vocab_size=VOCAB)
    starts = [0, 300, 600, 900]  # k * (1000 - 100) // 3
    assert torch.equal(c.ids, torch.from_numpy(np.stack([stream[s:s + 100] for s in starts])))
    assert c.tokens_available == 1000 and c.kind == "ids" and c.source == "long.ids"


CALIB_TEXT = " ".join(map(str, _calib_ids(SAMPLES * SEQLEN)))
BAD = [
    # (file name, content, pack kwargs, message)
    ("nope.txt", None, {}, r"calibration file .*nope.txt does not exist"),
    ("a.ids", "3 4 x5 6", {}, r"token 2 is 'x5', not an integer token id"),
    ("a.ids", "3 4.5", {}, r"token 1 is '4.5'"),
    ("a.ids", "3 ٣", {}, r"non-ASCII byte at offset 2"),
    ("a.ids", "3 4 512 7", {}, r"token id 512 at position 2 is outside the model's vocabulary \(vocab_size 512\)"),
    ("a.ids", "-1 4", {}, r"token id -1 at position 0 is outside"),
    ("a.ids", "3 4 5", {}, r"holds 3 tokens, too short for 8 samples x 32 tokens = 256"),
    ("a.txt", "w3 w4", {}, r"holds 2 tokens, too short"),
    ("a.txt", "", {}, r"holds 0 tokens, too short"),
    ("a.txt", b"w3 \xff w4", {}, r"must be UTF-8 \(bad byte at offset 3\)"),
    ("a.ids", "3", {"calib_samples": 0}, r"calib_samples must be a positive integer, got 0"),
    ("a.ids", "3", {"calib_seqlen": True}, r"calib_seqlen must be a positive integer, got True"),
    ("a.ids", "3", {"calib_seqlen": 257}, r"calib_seqlen 257 exceeds the model's max_position_embeddings 256"),
    ("a.ids", "3", {"prune": "magnitude"}, r"calib='.*a.ids' is only used by prune='wanda', not 'magnitude'"),
    ("c.ids", CALIB_TEXT, {"calib_device": "gpu"}, r"calib_device 'gpu' is not a torch device"),
]
if not HAS_GPU:
    BAD.append(("c.ids", CALIB_TEXT, {"calib_device": "cuda"}, r"calib_device 'cuda': .* sees no CUDA GPU"))


@pytest.mark.parametrize("fname,content,kwargs,match", BAD)
def test_bad_calibration_is_a_clear_error(model_dir, tmp_path, fname, content, kwargs, match):
    path = tmp_path / fname
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    kw = dict(prune="wanda", calib=path, calib_samples=SAMPLES, calib_seqlen=SEQLEN, progress=False)
    kw.update(kwargs)
    dst = tmp_path / "x.endor"
    with pytest.raises(CalibrationError, match=match) as info:
        endor_gds.pack(model_dir("llama", torch.float16), dst, **kw)
    assert isinstance(info.value, EndorError) and isinstance(info.value, ValueError)
    assert not dst.exists()


def test_wanda_without_calibration(model_dir, tmp_path):
    with pytest.raises(CalibrationError, match=r"prune='wanda' needs calibration data.*--calib FILE"):
        endor_gds.pack(model_dir("llama"), tmp_path / "x.endor", prune="wanda", progress=False)
    with pytest.raises(ValueError, match="pruner= is a per-tensor hook"):
        endor_gds.pack(model_dir("llama"), tmp_path / "x.endor", prune="wanda", calib="c.ids",
                       pruner=lambda name, t: t, progress=False)


def test_text_needs_a_tokenizer(tmp_path, calib):
    src = build_model(tmp_path / "notok", "llama", tokenizer=False)
    text = tmp_path / "c.txt"
    text.write_text("w3 " * 300)
    with pytest.raises(CalibrationError, match=r"has no tokenizer files .* pass the ids as a \.ids file"):
        endor_gds.pack(src, tmp_path / "x.endor", prune="wanda", calib=text, calib_samples=SAMPLES,
                       calib_seqlen=SEQLEN, progress=False)
    (src / "tokenizer.json").write_text("{not json")
    with pytest.raises(CalibrationError, match=r"loading the tokenizer in .* failed"):
        endor_gds.pack(src, tmp_path / "x.endor", prune="wanda", calib=text, calib_samples=SAMPLES,
                       calib_seqlen=SEQLEN, progress=False)
    # the same checkpoint packs from token ids
    endor_gds.pack(src, tmp_path / "x.endor", prune="wanda", calib=calib[0], calib_samples=SAMPLES,
                   calib_seqlen=SEQLEN, progress=False)


# -- model errors -------------------------------------------------------------------------------


def _edit_checkpoint(src, edit_sd=None, edit_config=None):
    if edit_sd:
        sd = load_file(src / "model.safetensors")
        edit_sd(sd)
        save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((src / "config.json").read_text())
        edit_config(cfg)
        (src / "config.json").write_text(json.dumps(cfg))
    return src


@pytest.mark.parametrize("case,error,match", [
    # Checked against the model the config builds before calibration starts (as for any pack).
    ("no_norm", UnsupportedModelError,
     r"needs tensors the checkpoint lacks: model\.layers\.1\.input_layernorm\.weight"),
    ("no_embed", UnsupportedModelError, r"needs tensors the checkpoint lacks: model\.embed_tokens\.weight"),
    ("int8", FormatError, r"tensor model\.layers\.0\.self_attn\.q_proj\.weight is int8 in the "
                          r"checkpoint, but the model runs in float16"),
    ("all_int8", UnsupportedModelError, r"its linear weights are int8; endor_gds runs models whose "
                                        r"weights are floating point"),
    # transformers' default vocab_size fits the embeddings: Wanda's own check names the gap.
    ("no_vocab", UnsupportedModelError, r"config\.json has no valid vocab_size \(got None\)"),
])
def test_model_problems_are_named(tmp_path, calib, case, error, match):
    src = build_model(tmp_path / "m", "llama", tokenizer=False, vocab_size=32000 if case == "no_vocab" else 512)
    if case == "no_norm":
        _edit_checkpoint(src, lambda sd: sd.pop("model.layers.1.input_layernorm.weight"))
    elif case == "no_embed":
        _edit_checkpoint(src, lambda sd: sd.pop("model.embed_tokens.weight"))
    elif case in ("int8", "all_int8"):
        def to_int8(sd):
            first = "model.layers.0.self_attn.q_proj.weight"
            for name in [n for n in sd if n.endswith("proj.weight") and (case == "all_int8" or n == first)]:
                sd[name] = sd[name].to(torch.int8)
        _edit_checkpoint(src, to_int8)
    else:
        _edit_checkpoint(src, edit_config=lambda cfg: cfg.pop("vocab_size"))
    dst = tmp_path / "x.endor"
    with pytest.raises(error, match=match):
        endor_gds.pack(src, dst, prune="wanda", calib=calib[0], calib_samples=SAMPLES,
                       calib_seqlen=SEQLEN, progress=False)
    assert not dst.exists()


def test_layers_must_come_in_order(model_dir, calib):
    ckpt = Checkpoint(model_dir("llama"))
    recipe = recipe_for(ckpt.config)
    plan = recipe.plan(ckpt.names(), ckpt.config)
    pruner = make_pruner(ckpt, recipe, plan, calib=calib[0], samples=SAMPLES, seqlen=SEQLEN,
                         sparsity=0.5, progress=False)
    with pytest.raises(ValueError, match="expected layer 0, got 1"):
        pruner(1, {})


def test_forward_skipping_layers_is_caught(model_dir, calib):
    src = model_dir("llama")
    ckpt = Checkpoint(src)
    recipe = recipe_for(ckpt.config)
    plan = recipe.plan(ckpt.names(), ckpt.config)
    calibration = load_calibration(calib[0], src, samples=SAMPLES, seqlen=SEQLEN, vocab_size=VOCAB)
    pruner = WandaPruner(ckpt, recipe, plan, calibration, 0.5, progress=False)
    # a model whose forward runs only its first layer: layer 2's arguments are never seen
    pruner.model.forward = lambda input_ids, use_cache: pruner.layers[0](
        torch.zeros(1, SEQLEN, 128, dtype=torch.float16))
    with pytest.raises(UnsupportedModelError, match=r"called 1 of the 3 layers of model\.layers"):
        pruner.capture()


# -- quality: Wanda vs magnitude on outlier features ----------------------------------------------


def test_wanda_beats_magnitude_single_linear():
    """A linear layer fed inputs whose 2 % outlier channels are 50x larger than the rest (real LLMs
    have such features). Relative output error on held-out inputs, 50 % sparsity per row."""
    g = torch.Generator().manual_seed(0)
    n_in, n_out, tokens = 512, 256, 2048
    scale = torch.ones(n_in)
    scale[torch.randperm(n_in, generator=g)[:10]] = 50.0

    def inputs(seed):
        return torch.randn(tokens, n_in, generator=torch.Generator().manual_seed(seed)) * scale

    w = (torch.randn(n_out, n_in, generator=g) * 0.02).half()
    calib_x, held_out = inputs(1), inputs(2)
    norm = calib_x.double().square().sum(0).sqrt()
    dense = held_out @ w.float().T

    def err(pruned):
        return float((held_out @ pruned.float().T - dense).norm() / dense.norm())

    e_wanda, e_mag = err(wanda_prune(w, norm, 0.5)), err(magnitude_prune(w, 0.5))
    print(f"\nsingle linear 512->256, 10 channels x50: wanda {e_wanda:.4f} magnitude {e_mag:.4f} "
          f"ratio {e_mag / e_wanda:.2f}")
    assert e_wanda < e_mag / 1.5


def test_wanda_beats_magnitude_decoder_layer(tmp_path):
    """A tiny Llama whose RMSNorm weights amplify 4 of 128 hidden channels 20x, packed with Wanda
    and with magnitude at 50 %: error of decoder layer 0's output (relative to the dense layer's
    update out - in) and of the logits, on held-out token sequences, in float32."""
    src = build_model(tmp_path / "outlier", "llama", tokenizer=False)
    channels = torch.randperm(128, generator=torch.Generator().manual_seed(0))[:4]

    def amplify(sd):
        for k in sd:
            if k.endswith("layernorm.weight"):
                sd[k] = sd[k].clone()
                sd[k][channels] *= 20

    _edit_checkpoint(src, amplify)
    ids = tmp_path / "c.ids"
    ids.write_text(" ".join(map(str, np.random.default_rng(0).integers(0, VOCAB, 32 * 64))))
    paths = {"wanda": tmp_path / "w.endor", "magnitude": tmp_path / "m.endor"}
    endor_gds.pack(src, paths["wanda"], prune="wanda", calib=ids, calib_samples=32,
                   calib_seqlen=64, progress=False)
    endor_gds.pack(src, paths["magnitude"], prune="magnitude", progress=False)
    held_out = torch.from_numpy(np.random.default_rng(99).integers(0, VOCAB, (8, 64)))

    def run(path=None, only_layer=None):
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        if path is not None:
            with endor_gds.open(path) as f:
                for name, p in model.named_parameters():
                    if name in f.tensors and (only_layer is None or f".layers.{only_layer}." in name):
                        p.data.copy_(f.read_tensor(name).float())
        with torch.no_grad():
            return model(held_out, output_hidden_states=True)

    dense = run()
    h_in, h_out = dense.hidden_states[0], dense.hidden_states[1]
    errors = {}
    for method, path in paths.items():
        layer0 = run(path, only_layer=0).hidden_states[1]
        logits = run(path).logits
        errors[method] = (float((layer0 - h_out).norm() / (h_out - h_in).norm()),
                          float((logits - dense.logits).norm() / dense.logits.norm()))
    (wl, wo), (ml, mo) = errors["wanda"], errors["magnitude"]
    print(f"\ntiny llama, 4/128 channels x20: layer-0 output error wanda {wl:.4f} magnitude {ml:.4f} "
          f"ratio {ml / wl:.2f}; logits error wanda {wo:.4f} magnitude {mo:.4f} ratio {mo / wo:.2f}")
    assert wl < ml / 1.5 and wo < mo


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_pack_wanda(model_dir, wanda_packed, calib, tmp_path, capsys):
    src = model_dir("llama", torch.float16)
    dst = tmp_path / "cli.endor"
    assert cli_main(["pack", str(src), str(dst), "--prune", "wanda", "--sparsity", "0.5",
                     "--calib", str(calib[0]), "--calib-samples", str(SAMPLES),
                     "--calib-seqlen", str(SEQLEN), "-q"]) == 0
    assert "wrote" in capsys.readouterr().out
    a, b = _tensors(dst), _tensors(wanda_packed("llama"))
    assert all(_bits(a[n]) == _bits(b[n]) for n in a)
    assert cli_main(["inspect", str(dst)]) == 0
    assert "pruned: wanda at sparsity 0.5" in capsys.readouterr().out
    assert cli_main(["pack", str(src), str(tmp_path / "y.endor"), "--prune", "wanda", "-q"]) == 2
    assert "CalibrationError: prune='wanda' needs calibration data" in capsys.readouterr().err
    assert cli_main(["pack", str(src), str(tmp_path / "y.endor"), "--calib", str(calib[0]), "-q"]) == 2
    assert "is only used by prune='wanda', not 'none'" in capsys.readouterr().err
    assert cli_main(["pack", str(src), str(tmp_path / "y.endor"), "--prune", "wanda", "--calib",
                     str(calib[0]), "--calib-samples", "1000", "--calib-seqlen", "32", "-q"]) == 2
    assert "too short for 1000 samples x 32 tokens" in capsys.readouterr().err
    assert not (tmp_path / "y.endor").exists()


# -- already-pruned checkpoints -----------------------------------------------------------------


def test_already_pruned_checkpoint_detected(tmp_path, capsys):
    src = build_model(tmp_path / "pre", "llama", tokenizer=False)
    recipe = recipe_for(json.loads((src / "config.json").read_text()))
    neg_name = "model.layers.0.mlp.down_proj.weight"
    negatives = 0

    def prune_half(sd):
        nonlocal negatives
        for k, w in sd.items():
            if not recipe.is_linear_weight(k):
                continue
            mask = magnitude_prune(w, 0.5) != 0
            if k == neg_name:  # pruned by multiplying with a mask, as some tools do: -0.0 appears
                sd[k] = w * mask
                negatives = int(((w < 0) & ~mask).sum())
            else:
                sd[k] = w.masked_fill(~mask, 0.0)

    _edit_checkpoint(src, prune_half)
    assert negatives > 0
    dst = tmp_path / "pre.endor"
    endor_gds.pack(src, dst, progress=False)
    with endor_gds.open(dst) as f:
        assert f.manifest["prune"] == {"method": "none", "sparsity": None, "detected_sparsity": 0.5,
                                       "detected_sparsity_range": [0.5, 0.5],
                                       "negative_zeros": negatives}
    assert cli_main(["inspect", str(dst), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    sd = state_dict_of(src)
    by_name = {t["name"]: t for t in summary["tensors"]}
    for name, t in sd.items():  # density = stored non-zero bit patterns / elements, per tensor
        nonzero_bits = int((t.contiguous().view(torch.int16) != 0).sum())
        assert by_name[name]["density"] == pytest.approx(nonzero_bits / t.numel(), abs=0), name
    assert by_name["model.layers.0.self_attn.q_proj.weight"]["density"] == 0.5
    assert by_name[neg_name]["density"] == pytest.approx(0.5 + negatives / sd[neg_name].numel())
    assert cli_main(["inspect", str(dst), "--tensors"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines()
                if ln.startswith("model.layers.1.mlp.up_proj.weight"))
    assert "bitmap" in line and " 0.500 " in line
    assert cli_main(["inspect", str(dst)]) == 0
    assert "already pruned checkpoint: measured sparsity 0.500" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_wanda_file_streams_bit_identically(wanda_packed, family):
    """The Wanda-pruned file through the streaming runtime = the same pruned model in memory."""

    path = wanda_packed(family)
    model = endor_gds.from_pretrained(path, device="cpu")
    try:
        ref = reference_model(path)
        with torch.no_grad():
            assert torch.equal(model(PROMPT).logits, ref(PROMPT).logits)
            assert torch.equal(model.generate(PROMPT, max_new_tokens=6, do_sample=False, pad_token_id=0),
                               ref.generate(PROMPT, max_new_tokens=6, do_sample=False, pad_token_id=0))
    finally:
        model.endor.close()


def test_unpruned_checkpoint_reports_no_sparsity(packed):
    with endor_gds.open(packed("llama", torch.float16, prune="none")) as f:
        prune = f.manifest["prune"]
    assert prune["method"] == "none" and prune["detected_sparsity"] < 1e-3
    assert prune["negative_zeros"] == 0


# -- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_wanda_on_cuda_matches_cpu_masks(model_dir, wanda_packed, calib, tmp_path):
    """One layer + activations on the GPU. fp16 kernels differ from the CPU's, so the norms and
    hence a few boundary entries may differ; the per-row count is exact either way."""
    dst = tmp_path / "cuda.endor"
    endor_gds.pack(model_dir("llama", torch.float16), dst, prune="wanda", calib=calib[0],
                   calib_samples=SAMPLES, calib_seqlen=SEQLEN, calib_device="cuda", progress=False)
    gpu, cpu = _tensors(dst), _tensors(wanda_packed("llama"))
    with endor_gds.open(dst) as f:
        recipe = recipe_for(f.config)
        assert f.manifest["prune"]["calibration"]["device"] == "cuda"
    for name, t in gpu.items():
        if recipe.is_linear_weight(name):
            assert ((t == 0).sum(1) == t.shape[1] // 2).all(), name
            assert float(((t == 0) == (cpu[name] == 0)).float().mean()) > 0.9, name
        else:
            assert _bits(t) == _bits(cpu[name]), name


def test_tensor_parallel_wanda_cuts_the_same_pruned_layers(model_dir, wanda_packed, calib, tmp_path):
    """Wanda prunes whole layers; with tp=2 each rank's shard is the block of the layer Wanda
    pruned as for the file packed whole."""
    from endor_gds.recipes import recipes  # noqa: PLC0415
    from endor_gds.shards import shard_plan  # noqa: PLC0415

    dst = tmp_path / "tp.endor"
    endor_gds.pack(model_dir("llama", torch.float16), dst, prune="wanda", sparsity=0.5, calib=calib[0],
                   calib_samples=SAMPLES, calib_seqlen=SEQLEN, progress=False, tp=2)
    whole = _tensors(wanda_packed("llama"))
    with endor_gds.open(dst) as f:
        plan = shard_plan(f.config, recipes()["llama"], 2)
        for r in range(2):
            for name, entry in f.model_tensors(r).items():
                want = whole[name] if entry.extent == "resident" else plan.take(name.split(".", 3)[3], whole[name], r)
                assert _bits(f.read_tensor(entry.name)) == _bits(want), name
