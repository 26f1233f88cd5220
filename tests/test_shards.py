"""Tensor-parallel shard plans: each rank's block of each layer tensor, whole attention heads per
rank, key/value heads divided or replicated, and the model's own base_model_tp_plan as the plan."""

from __future__ import annotations

import pytest
import torch

from endor_gds.errors import UnsupportedModelError
from endor_gds.recipes import recipes
from endor_gds.shards import config_styles, shard_plan

LLAMA = dict(model_type="llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=100, num_hidden_layers=2)


def _whole(plan, rel, t):
    """The tensor rebuilt from every rank's block (a block held by several ranks counted once)."""
    blocks = {}
    for r in range(plan.size):
        cut = plan.block(rel, tuple(t.shape), r)
        if cut is None:
            assert torch.equal(plan.take(rel, t, r), t)
            continue
        blocks[cut] = plan.take(rel, t, r)
    dims = {dim for dim, _, _ in blocks}
    if not blocks:
        return t
    (dim,) = dims
    return torch.cat([blocks[k] for k in sorted(blocks)], dim=dim)


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_every_rank_block_rebuilds_the_tensor(size):
    """Query heads and the MLP's rows split in N blocks (the intermediate size 100 unevenly over 8),
    key/value heads divided over 2 ranks and replicated over 4 and 8; concatenated, the blocks are
    the tensor; rowwise biases and norms are whole on every rank."""
    plan = shard_plan(LLAMA, recipes()["llama"], size)
    g = torch.Generator().manual_seed(size)
    shapes = {"self_attn.q_proj.weight": (64, 64), "self_attn.k_proj.weight": (16, 64),
              "self_attn.v_proj.bias": (16,), "self_attn.o_proj.weight": (64, 64),
              "self_attn.o_proj.bias": (64,), "mlp.gate_proj.weight": (100, 64),
              "mlp.down_proj.weight": (64, 100), "input_layernorm.weight": (64,)}
    for rel, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        assert torch.equal(_whole(plan, rel, t), t), rel
    assert plan.block("self_attn.o_proj.bias", (64,), 0) is None  # added once, after the all-reduce
    assert plan.block("input_layernorm.weight", (64,), 0) is None
    rows = [plan.local_shape("mlp.gate_proj.weight", (100, 64), r)[0] for r in range(size)]
    assert sum(rows) == 100 and max(rows) - min(rows) <= 1


@pytest.mark.parametrize("size, groups, kv_rows", [(1, 4, [(0, 16)]), (2, 4, [(0, 8), (8, 16)]),
                                                    (4, 2, [(0, 8), (0, 8), (8, 16), (8, 16)]),
                                                    (8, 1, [(0, 8)] * 4 + [(8, 16)] * 4)])
def test_kv_heads_follow_their_query_heads(size, groups, kv_rows):
    """8 query heads, 2 key/value heads of 8 features: a rank's key/value rows are those of the
    heads its query heads attend to (query head q uses key/value head q // 4), and its attention's
    num_key_value_groups is its query heads per key/value head."""
    plan = shard_plan(LLAMA, recipes()["llama"], size)
    assert plan.kv_groups() == groups
    assert [plan.block("self_attn.k_proj.weight", (16, 64), r)[1:] for r in range(size)] == kv_rows
    for r in range(size):
        q0, q1 = plan.block("self_attn.q_proj.weight", (64, 64), r)[1:]
        k0, k1 = plan.block("self_attn.v_proj.weight", (16, 64), r)[1:]
        heads = range(q0 // 8, q1 // 8)
        assert {q // 4 for q in heads} == set(range(k0 // 8, k1 // 8))


@pytest.mark.parametrize("config, size, match", [
    (LLAMA, 3, "num_attention_heads=8 does not divide among 3 ranks"),
    (dict(LLAMA, hidden_size=96, num_attention_heads=12, num_key_value_heads=3), 4,
     "num_key_value_heads=3 and 4 ranks"),
    (LLAMA, 0, "whole number in 1..1024"),
    (LLAMA, True, "whole number in 1..1024"),
    (dict(LLAMA, num_attention_heads=None), 2, "lacks positive num_attention_heads"),
])
def test_splits_that_cannot_be_made_are_named(config, size, match):
    with pytest.raises(UnsupportedModelError, match=match):
        shard_plan(config, recipes()["llama"], size)


def test_a_tensor_of_the_wrong_width_is_named():
    plan = shard_plan(LLAMA, recipes()["llama"], 2)
    with pytest.raises(UnsupportedModelError, match="k_proj has 24 rows, not num_key_value_heads x head_dim"):
        plan.block("self_attn.k_proj.weight", (24, 64), 0)
    with pytest.raises(UnsupportedModelError, match="q_proj splits 60 query features"):
        plan.block("self_attn.q_proj.weight", (60, 64), 0)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_the_plan_is_transformers_own(family):
    """The styles come from the config class's base_model_tp_plan (Qwen3's per-head norms:
    replicated)."""
    import transformers  # noqa: PLC0415

    config = dict(LLAMA, model_type=family)
    styles = config_styles(config, recipes()[family])
    raw = transformers.AutoConfig.for_model(**config).base_model_tp_plan
    assert styles == {k.removeprefix("layers.*."): {"replicated_with_grad_allreduce": "replicated"}.get(v, v)
                      for k, v in raw.items()}
    assert styles["self_attn.o_proj"] == "rowwise" and styles["mlp.gate_proj"] == "colwise"


def test_families_without_a_plan_or_with_other_styles_are_refused():
    with pytest.raises(UnsupportedModelError, match="opt recipe has no \\[tensor_parallel\\]"):
        shard_plan(dict(model_type="opt", hidden_size=64, num_attention_heads=4), recipes()["opt"], 2)
    with pytest.raises(UnsupportedModelError, match="no base_model_tp_plan"):
        config_styles(dict(model_type="opt"), recipes()["opt"])
    # OLMoE's attention gathers its outputs ("colwise_gather_output"): not a style this splits
    with pytest.raises(UnsupportedModelError, match="colwise_gather_output"):
        config_styles(dict(model_type="olmoe"), recipes()["olmoe"])
