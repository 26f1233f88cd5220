"""Wanda pruning of mixture-of-experts models (issue 19): per-expert input norms from the tokens
routed to each expert, checked against a whole-model reference written here; the magnitude
fallback for experts no calibration token reaches; the packed file streams like the same pruned
model in memory."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers
from reference import assert_same, reference_model
from transformers.activations import ACT2FN

import endor_gds
import endor_gds.packing.wanda as wanda_mod
from endor_gds.benchmarks.models import MOE_FAMILIES, state_dict_of
from endor_gds.cli.main import main as cli_main
from endor_gds.errors import UnsupportedModelError
from endor_gds.packing.checkpoint import Checkpoint
from endor_gds.packing.prune import kept_per_row, magnitude_prune, wanda_prune
from endor_gds.packing.wanda import WandaPruner, load_calibration, make_pruner
from endor_gds.recipes import recipe_for

SAMPLES, SEQLEN, VOCAB = 8, 32, 512
E = 8  # experts per MoE layer of the test models (benchmarks.models)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """A .ids file of exactly SAMPLES x SEQLEN ids (the windows are consecutive) + the ids."""
    ids = np.random.default_rng(11).integers(3, VOCAB, SAMPLES * SEQLEN)
    path = tmp_path_factory.mktemp("calib") / "calib.ids"
    path.write_text(" ".join(map(str, ids)))
    return path, torch.from_numpy(ids).reshape(SAMPLES, SEQLEN)


class _Norms(wanda_mod._ExpertNorms):
    """The pruner's own per-expert statistics, kept for the test (one per MoE layer, in order)."""

    seen: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _Norms.seen.append(self)


def _pack(src, dst, calib_path, monkeypatch, samples=SAMPLES, seqlen=SEQLEN) -> dict[int, _Norms]:
    """Wanda-pack ``src``; returns the pruner's statistics per MoE layer."""
    _Norms.seen = []
    monkeypatch.setattr(wanda_mod, "_ExpertNorms", _Norms)
    endor_gds.pack(src, dst, prune="wanda", sparsity=0.5, calib=calib_path, calib_samples=samples,
                   calib_seqlen=seqlen, progress=False)
    return {n.layer: n for n in _Norms.seen}


@dataclasses.dataclass
class _Reference:
    weights: dict[str, torch.Tensor]  # file name -> pruned weight (linears and expert slices)
    sq_in: dict[int, torch.Tensor]  # MoE layer -> [E, H] sum of x^2 over the tokens routed to e
    sq_mid: dict[int, torch.Tensor]  # MoE layer -> [E, I] sum of (act(gate) * up)^2
    tokens: dict[int, torch.Tensor]  # MoE layer -> [E] tokens routed to e
    model: torch.nn.Module


def _reference_wanda_moe(src, ids: torch.Tensor, sparsity: float) -> _Reference:
    """Wanda on the whole model loaded by transformers, layer by layer, experts by hand.

    For layer i: hooks on its linear modules add x^2, a pre-hook on its experts module records
    (hidden_states, top_k_index) of every call, and the *full* model runs on every calibration
    sequence (layers 0..i-1 already pruned in place). Expert e's norms are then computed here
    from the recorded routing: the rows of the tokens whose top-k holds e, in the eager forward's
    order (by rank, then token), gate_up_proj[e] applied, the config's activation on the gate half
    times the up half, squares summed in float64 per call. Nothing here uses endor_gds.packing.wanda.
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float16, experts_implementation="eager").eval()
    recipe = recipe_for(json.loads((src / "config.json").read_text()))
    act = ACT2FN[model.config.hidden_act]
    ref = _Reference({}, {}, {}, {}, model)
    with torch.no_grad():
        for i, layer in enumerate(model.get_submodule(recipe.layers)):
            prefix = f"{recipe.layers}.{i}."
            linears = []
            for lin in (*recipe.linear, *recipe.linear_optional):
                try:
                    linears.append((lin, layer.get_submodule(lin)))
                except AttributeError:
                    pass
            try:
                experts = layer.get_submodule(recipe.experts.module)
            except AttributeError:
                experts = None
            sq, calls, handles = {}, [], []

            def add(name):
                def fn(module, args, output):
                    x = args[0].reshape(-1, args[0].shape[-1]).double()
                    sq[name] = sq.get(name, 0) + (x * x).sum(0)
                return fn

            for lin, module in linears:
                handles.append(module.register_forward_hook(add(lin)))
            if experts is not None:
                handles.append(experts.register_forward_pre_hook(
                    lambda mod, args: calls.append((args[0].clone(), args[1].clone()))))
            for j in range(len(ids)):
                model(input_ids=ids[j:j + 1], use_cache=False)
            for h in handles:
                h.remove()
            for lin, module in linears:
                w = module.weight.data
                w.copy_(wanda_prune(w, sq[lin].sqrt(), sparsity))
                ref.weights[f"{prefix}{lin}.weight"] = w.clone()
            if experts is None:
                continue
            gate_up, down = experts.gate_up_proj.data, experts.down_proj.data
            sq_in = torch.zeros(E, gate_up.shape[2], dtype=torch.float64)
            sq_mid = torch.zeros(E, down.shape[2], dtype=torch.float64)
            tokens = torch.zeros(E, dtype=torch.int64)
            for hidden, top_k in calls:
                for e in range(E):
                    _, rows = (top_k == e).T.nonzero(as_tuple=True)
                    if rows.numel() == 0:
                        continue
                    x = hidden[rows]
                    g, u = torch.nn.functional.linear(x, gate_up[e]).chunk(2, dim=-1)
                    sq_in[e] += x.double().pow(2).sum(0)
                    sq_mid[e] += (act(g) * u).double().pow(2).sum(0)
                    tokens[e] += rows.numel()
            for e in range(E):
                for param, w, s in (("gate_up_proj", gate_up[e], sq_in[e]), ("down_proj", down[e], sq_mid[e])):
                    pruned = wanda_prune(w, s.sqrt(), sparsity) if tokens[e] else magnitude_prune(w, sparsity)
                    w.copy_(pruned)
                    ref.weights[f"{prefix}{recipe.experts.module}.{e}.{param}"] = pruned
            ref.sq_in[i], ref.sq_mid[i], ref.tokens[i] = sq_in, sq_mid, tokens
    return ref


def _check_against_reference(path, ref: _Reference, norms: dict[int, _Norms]) -> None:
    assert norms.keys() == ref.tokens.keys()
    for i, n in norms.items():  # (a) the pruner's hooks = the norms computed by hand, bit for bit
        assert torch.equal(n.tokens, ref.tokens[i]), i
        assert torch.equal(n.sq["gate_up_proj"], ref.sq_in[i]), f"layer {i}: gate_up_proj input norms"
        assert torch.equal(n.sq["down_proj"], ref.sq_mid[i]), f"layer {i}: down_proj input norms"
    params = ref.model.state_dict()
    with endor_gds.open(path) as f:
        recipe = recipe_for(f.config)
        assert set(ref.weights) == {n for n in f.tensors if recipe.is_linear_weight(n)}
        for name in f.tensors:
            got = f.read_tensor(name)
            if name in ref.weights:  # (b) every pruned weight, experts included, bit for bit
                assert _bits(got) == _bits(ref.weights[name]), name
                drop = got.shape[1] - kept_per_row(got.shape[1], 0.5)
                assert ((got == 0).sum(dim=1) == drop).all(), name
            else:  # routers, norms, embeddings: the checkpoint's (the reference never pruned them)
                assert _bits(got) == _bits(params[name]), f"{name} must not be pruned"


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_norms_and_weights_match_a_whole_model_reference(model_dir, calib, monkeypatch, tmp_path, family):
    """(a) the per-expert norms the pruner collects equal those computed by hand from the routing
    recorded in a whole-model run; (b) every pruned weight of the file (attention, shared experts,
    dense MLP layers, each expert's slices) equals wanda_prune with the reference's norms."""
    src = model_dir(family, torch.float16)
    norms = _pack(src, tmp_path / "w.endor", calib[0], monkeypatch)
    ref = _reference_wanda_moe(src, calib[1], 0.5)
    assert all(int(t.sum()) == SAMPLES * SEQLEN * 2 for t in ref.tokens.values())  # top-2 of 8
    _check_against_reference(tmp_path / "w.endor", ref, norms)
    with endor_gds.open(tmp_path / "w.endor") as f:
        assert f.format_version >= 4 and f.manifest["prune"]["method"] == "wanda"
        want = [f"layer.{i}.expert.{e}" for i, t in ref.tokens.items() for e in range(E) if t[e] == 0]
        assert f.manifest["prune"]["unrouted_experts"] == want


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_an_expert_without_tokens_is_magnitude_pruned(model_dir, calib, monkeypatch, tmp_path, capsys, family):
    """(c) One calibration sequence of 2 tokens, top-2 of 8: at most 4 experts per layer see a
    token. The others are magnitude-pruned, named in a RuntimeWarning and in the manifest; the
    routed ones still take Wanda with their own norms."""
    src = model_dir(family, torch.float16)
    dst = tmp_path / "few.endor"
    with pytest.warns(RuntimeWarning, match=r"no calibration token was routed to expert\(s\) \[.*\] of "
                                            r"layer \d .* magnitude-pruned"):
        norms = _pack(src, dst, calib[0], monkeypatch, samples=1, seqlen=2)
    ids = calib[1].reshape(-1)[:2].reshape(1, 2)  # one window of 2: the stream's first 2 ids
    ref = _reference_wanda_moe(src, ids, 0.5)
    _check_against_reference(dst, ref, norms)
    unrouted = [(i, e) for i, t in ref.tokens.items() for e in range(E) if t[e] == 0]
    assert len(unrouted) >= 4 * len(ref.tokens)
    sd = {recipe_for(json.loads((src / "config.json").read_text())).renamed(k): v
          for k, v in state_dict_of(src).items()}
    assert cli_main(["inspect", str(dst)]) == 0  # inspect names them
    shown = capsys.readouterr().out
    assert f"  {len(unrouted)} expert(s) no calibration token was routed to, pruned by magnitude: " \
        f"layer.{unrouted[0][0]}.expert.{unrouted[0][1]}, " in shown
    assert len(unrouted) <= 8 or f"({len(unrouted) - 8} more)" in shown
    with endor_gds.open(dst) as f:
        assert f.manifest["prune"]["unrouted_experts"] == [f"layer.{i}.expert.{e}" for i, e in unrouted]
        up = "w3" if family == "mixtral" else "up_proj"
        gate, down = ("w1", "w2") if family == "mixtral" else ("gate_proj", "down_proj")
        for i, e in unrouted:  # the checkpoint's own slices, magnitude-pruned
            at = f"model.layers.{i}.mlp.experts.{e}."
            gate_up = torch.cat([sd[f"{at}{gate}.weight"], sd[f"{at}{up}.weight"]])
            assert _bits(f.read_tensor(f"{at}gate_up_proj")) == _bits(magnitude_prune(gate_up, 0.5))
            assert _bits(f.read_tensor(f"{at}down_proj")) == _bits(magnitude_prune(sd[f"{at}{down}.weight"], 0.5))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_wanda_moe_file_streams_like_the_model_in_memory(model_dir, calib, monkeypatch, tmp_path, family):
    """(d) The Wanda-pruned MoE file through the streaming runtime (routed experts read on
    demand) = the same pruned weights in memory: logits, greedy, sampled and batched tokens."""
    path = tmp_path / "s.endor"
    _pack(model_dir(family, torch.float16), path, calib[0], monkeypatch)
    ref = reference_model(path)
    model = endor_gds.from_pretrained(path, device="cpu", expert_cache=3)
    try:
        assert_same(model, ref)
        assert sum(s.experts_read for s in model.endor.steps) > 0
    finally:
        model.endor.close()


@pytest.mark.gpu
def test_wanda_moe_on_cuda_prunes_like_the_cpu(model_dir, calib, monkeypatch, tmp_path):
    """The layer, its fused experts, the norms and the activations on the GPU (the slices as read
    stay on the host and come back pruned). fp16 kernels differ from the CPU's, so a few boundary
    entries (and a token's routing at the margin) may differ; per-row counts are exact either way
    and everything not pruned is bit-identical."""
    src = model_dir("qwen3_moe", torch.float16)
    _pack(src, tmp_path / "cpu.endor", calib[0], monkeypatch)
    endor_gds.pack(src, tmp_path / "cuda.endor", prune="wanda", sparsity=0.5, calib=calib[0],
                   calib_samples=SAMPLES, calib_seqlen=SEQLEN, calib_device="cuda", progress=False)
    with endor_gds.open(tmp_path / "cpu.endor") as a, endor_gds.open(tmp_path / "cuda.endor") as b:
        recipe = recipe_for(a.config)
        assert b.manifest["prune"]["calibration"]["device"] == "cuda"
        agree = []
        for name in a.tensors:
            cpu, gpu = a.read_tensor(name), b.read_tensor(name)
            if recipe.is_linear_weight(name):
                assert ((gpu == 0).sum(1) == gpu.shape[1] // 2).all(), name
                agree.append(float(((gpu == 0) == (cpu == 0)).float().mean()))
            else:
                assert _bits(gpu) == _bits(cpu), name
        assert min(agree) > 0.7 and sum(agree) / len(agree) > 0.9


def test_one_moe_layer_in_memory_at_a_time(model_dir, calib, monkeypatch, tmp_path):
    """While layer i runs, only layer i's parameters (its fused experts included) are real."""
    real_run = wanda_mod.WandaPruner._run
    seen = []

    def run(self, layer, index, j):
        seen.append((index, {n for n, p in self.model.named_parameters() if not p.is_meta}))
        return real_run(self, layer, index, j)

    monkeypatch.setattr(wanda_mod.WandaPruner, "_run", run)
    _pack(model_dir("mixtral", torch.float16), tmp_path / "m.endor", calib[0], monkeypatch)
    assert len(seen) == 3 * 2 * SAMPLES
    for index, names in seen:
        assert f"model.layers.{index}.mlp.experts.gate_up_proj" in names
        assert all(n.startswith(f"model.layers.{index}.") for n in names), (index, names)


def test_expert_norms_skip_the_padding_index_and_unrouted_experts():
    """The hook on an experts module built from a real config: index E (the forward's padding)
    routes nowhere, an expert no row names gets nothing; the rest equal a hand computation."""
    cfg = transformers.MixtralConfig(hidden_size=16, intermediate_size=8, num_local_experts=4,
                                     num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    experts = transformers.models.mixtral.modeling_mixtral.MixtralExperts(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(4, 16, 16, generator=g))
        experts.down_proj.copy_(torch.randn(4, 16, 8, generator=g))
    hidden = torch.randn(5, 16, generator=g)
    top_k = torch.tensor([[0, 2], [2, 4], [4, 0], [2, 0], [0, 4]])  # 4: padding; experts 1, 3 unrouted
    norms = wanda_mod._ExpertNorms(0, experts, torch.device("cpu"))
    experts.register_forward_pre_hook(norms, with_kwargs=True)
    experts(hidden, top_k, torch.full((5, 2), 0.5))
    assert norms.tokens.tolist() == [4, 0, 3, 0]
    assert repr(norms) == "_ExpertNorms(layer=0, experts=4, routed=2, tokens=7)"
    for e, rows in ((0, [0, 2, 3, 4]), (2, [0, 1, 3])):
        x = hidden[rows].double()
        assert torch.allclose(norms.sq["gate_up_proj"][e], (x * x).sum(0), rtol=1e-12, atol=0)
        gate, up = (hidden[rows] @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
        mid = (torch.nn.functional.silu(gate) * up).double()
        assert torch.allclose(norms.sq["down_proj"][e], (mid * mid).sum(0), rtol=1e-5, atol=0)
    assert not norms.sq["gate_up_proj"][[1, 3]].any() and not norms.sq["down_proj"][[1, 3]].any()
    with pytest.raises(UnsupportedModelError, match="called without top_k_index; Wanda needs the routing"):
        norms(experts, (hidden,), {})


# -- what Wanda still refuses, by name --------------------------------------------------------------


def _pruner_parts(src, calib_path):
    ckpt = Checkpoint(src)
    recipe = recipe_for(ckpt.config)
    plan = recipe.plan(ckpt.names(), ckpt.config)
    return ckpt, recipe, plan, load_calibration(calib_path, src, samples=SAMPLES, seqlen=SEQLEN, vocab_size=VOCAB)


def test_a_recipe_with_other_expert_parameters_is_refused(model_dir, calib):
    ckpt, recipe, plan, calibration = _pruner_parts(model_dir("qwen3_moe", torch.float16), calib[0])
    other = dataclasses.replace(recipe, experts=dataclasses.replace(
        recipe.experts, params={"up_proj": ("up_proj.weight",), "down_proj": ("down_proj.weight",)}))
    with pytest.raises(UnsupportedModelError, match=r"computes expert inputs for fused experts parameters "
                                                    r"gate_up_proj, down_proj; the qwen3_moe recipe has up_proj"):
        WandaPruner(ckpt, other, plan, calibration, 0.5, progress=False)


def test_a_layer_missing_an_experts_slice_is_refused(model_dir, calib):
    src = model_dir("qwen3_moe", torch.float16)
    ckpt, recipe, plan, _ = _pruner_parts(src, calib[0])
    pruner = make_pruner(ckpt, recipe, plan, calib=calib[0], samples=SAMPLES, seqlen=SEQLEN,
                         sparsity=0.5, progress=False)
    tensors = {n: torch.cat([ckpt.read(s) for s in plan.sources_of(n)]) for n in plan.layer_tensors(0)}
    del tensors["model.layers.0.mlp.experts.3.down_proj"]
    with pytest.raises(UnsupportedModelError, match=r"layer 0: model\.layers\.0\.mlp\.experts\.down_proj has 8 "
                                                    r"experts; the slices given lack experts \[3\]"):
        pruner(0, tensors)
