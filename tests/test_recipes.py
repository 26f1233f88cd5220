"""Recipes of mixture-of-experts families: renamings, experts' slices and the checkpoint tensors
each is made of, in both directions."""

import pytest

from endor_gds.errors import UnsupportedModelError
from endor_gds.recipes import recipes

MIXTRAL_LAYER = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
                 "block_sparse_moe.gate.weight"]


def _mixtral_names(layers=2, experts=3, drop=()):
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(layers):
        names += [f"model.layers.{i}.{n}" for n in MIXTRAL_LAYER]
        names += [f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
                  for e in range(experts) for w in ("w1", "w2", "w3")]
    return [n for n in names if n not in drop]


def test_mixtral_plan_renames_and_slices_experts():
    r = recipes()["mixtral"]
    plan = r.plan(_mixtral_names(), {"num_hidden_layers": 2})
    assert "model.layers.1.mlp.gate.weight" in plan.layers[1]  # block_sparse_moe. -> mlp.
    assert plan.sources["model.layers.1.mlp.gate.weight"] == ["model.layers.1.block_sparse_moe.gate.weight"]
    assert plan.experts[0][2] == ["model.layers.0.mlp.experts.2.gate_up_proj", "model.layers.0.mlp.experts.2.down_proj"]
    # gate rows (w1) before up rows (w3), as transformers' conversion concatenates them
    assert plan.sources_of("model.layers.0.mlp.experts.2.gate_up_proj") == [
        "model.layers.0.block_sparse_moe.experts.2.w1.weight", "model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    assert plan.layer_tensors(0)[-2:] == plan.experts[0][2]
    assert r.expert_slice("model.layers.0.mlp.experts.2.down_proj") == ("model.layers.0.mlp.experts.down_proj", 2)
    assert r.expert_slice("model.layers.0.mlp.gate.weight") is None
    assert r.is_linear_weight("model.layers.0.mlp.experts.2.gate_up_proj")
    assert not r.is_linear_weight("model.layers.0.mlp.gate.weight")  # the router is never pruned


def test_checkpoint_rows_undo_the_renames():
    r = recipes()["mixtral"]
    assert r.is_fused_experts("model.layers.4.mlp.experts.gate_up_proj")
    assert not r.is_fused_experts("model.layers.4.mlp.gate.weight")
    assert r.checkpoint_rows("model.layers.4.mlp.experts.gate_up_proj", 7) == [
        "model.layers.4.block_sparse_moe.experts.7.w1.weight", "model.layers.4.block_sparse_moe.experts.7.w3.weight"]
    q = recipes()["qwen3_moe"]
    assert q.checkpoint_rows("model.layers.0.mlp.experts.down_proj", 0) == [
        "model.layers.0.mlp.experts.0.down_proj.weight"]


@pytest.mark.parametrize("drop,match", [
    (["model.layers.1.block_sparse_moe.experts.1.w1.weight", "model.layers.1.block_sparse_moe.experts.1.w2.weight",
      "model.layers.1.block_sparse_moe.experts.1.w3.weight"],
     r"layer 1 has tensors of experts up to 2 but none of expert\(s\) \[1\]"),
    (["model.layers.0.block_sparse_moe.experts.0.w3.weight"], "expert 0 of layer 0: .* lacks w3.weight"),
])
def test_incomplete_experts_are_named(drop, match):
    with pytest.raises(UnsupportedModelError, match=match):
        recipes()["mixtral"].plan(_mixtral_names(drop=drop), {"num_hidden_layers": 2})


def test_an_unknown_expert_tensor_is_named():
    names = _mixtral_names() + ["model.layers.0.block_sparse_moe.experts.0.w4.weight"]
    with pytest.raises(UnsupportedModelError, match="it has w4.weight, which the recipe does not place"):
        recipes()["mixtral"].plan(names, {"num_hidden_layers": 2})


def test_optional_linear_weights_are_linear_where_present():
    q = recipes()["qwen2_moe"]
    assert q.is_linear_weight("model.layers.3.mlp.shared_expert.up_proj.weight")
    assert q.is_linear_weight("model.layers.1.mlp.down_proj.weight")  # a dense-MLP layer (mlp_only_layers)
    assert not q.is_linear_weight("model.layers.3.mlp.shared_expert_gate.weight")


def test_a_huge_expert_index_is_named_without_counting_up_to_it():
    """A checkpoint naming expert 10^12 (hostile or broken) is refused at once: the message lists
    the first missing experts, found below the number of experts present (no range up to 10^12)."""
    names = _mixtral_names(experts=2) + [f"model.layers.0.block_sparse_moe.experts.{10**12}.{w}.weight"
                                         for w in ("w1", "w2", "w3")]
    gaps = r"\[2, 3, 4, 5, 6, 7, 8, 9\]"  # the first eight missing
    with pytest.raises(UnsupportedModelError, match=r"up to 1000000000000 but none of expert\(s\) " + gaps):
        recipes()["mixtral"].plan(names, {"num_hidden_layers": 2})
