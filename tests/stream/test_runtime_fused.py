"""The CPU fused product in the streaming runtime: steps of at most ``fused_max_rows`` rows multiply
the streamed linear weights straight from bitmap + values. Its promise: the same greedy tokens as
the in-memory model, logits as close to float64 as the in-memory model's own (within 2x), and with
``fused=False`` the decode path's bit-identity back."""

import copy

import pytest
import torch
from reference import BATCH, BATCH_MASK, PROMPT, generate, reference_model

import endor_gds
from endor_gds import defaults
from endor_gds.benchmarks.models import FAMILIES

pytestmark = pytest.mark.fused


@pytest.fixture(autouse=True)
def eight_rows():
    """8 rows for every dtype here (the batch-of-4 and 7-row steps below are fused); the 'auto'
    limits per dtype have their own test."""
    with defaults.set(fused_max_rows=8):
        yield

LONG = torch.arange(3, 23).reshape(1, 20)  # a prefill of 20 rows: above fused_max_rows
FOUR = torch.tensor([[5, 9, 22], [7, 101, 3], [1, 2, 3], [40, 41, 42]])  # decode steps of 4 rows


@pytest.fixture(scope="module")
def refs():
    cache = {}

    def get(path):
        if path not in cache:
            ref = reference_model(path)
            cache[path] = (ref, copy.deepcopy(ref).double())
        return cache[path]

    return get


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits.double()


def assert_close(model, refs_pair, ids, **kw):
    """Logits' largest error against the float64 model at most twice the in-memory model's own
    (plus one unit of the dtype's rounding of the largest logit, for errors that happen to be 0)."""
    ref, ref64 = refs_pair
    exact = _logits(ref64, ids, **kw)
    got, torch_err = _logits(model, ids, **kw), (_logits(ref, ids, **kw) - exact).abs().max().item()
    ulp = torch.finfo(ref.dtype).eps * exact.abs().max().item()
    err = (got - exact).abs().max().item()
    assert err <= 2 * torch_err + ulp, f"fused {err:.3g}, in-memory model {torch_err:.3g}"


def _fused_counts(model):
    return [s.fused for s in model.endor.steps]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("codec", ["raw", "expdict", "exphuff"])
def test_same_tokens_close_logits(packed, refs, family, codec):
    path = packed(family, torch.float16, prune="magnitude", codec=codec)
    model = endor_gds.from_pretrained(path, device="cpu")
    try:
        layers = len(model.endor.pipeline.plans)
        assert_close(model, refs(path), PROMPT)  # 7 rows: fused
        assert _fused_counts(model) == [layers]
        model.endor.reset_stats()
        assert torch.equal(generate(model, PROMPT), generate(refs(path)[0], PROMPT))
        assert _fused_counts(model) == [layers] * 6  # the prefill and every decode step
    finally:
        model.endor.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("prune, codec", [("magnitude", "expdict"), ("magnitude", "exphuff"), ("none", "exphuff")])
def test_other_dtypes(packed, refs, dtype, prune, codec):
    """prune="none" with exphuff: dense tensors (no bitmap) multiplied from their streams."""
    path = packed("llama", dtype, prune=prune, codec=codec)
    model = endor_gds.from_pretrained(path, device="cpu")
    try:
        assert_close(model, refs(path), PROMPT)
        assert torch.equal(generate(model, PROMPT), generate(refs(path)[0], PROMPT))
        assert all(_fused_counts(model))
    finally:
        model.endor.close()


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("tier", ["ssd", "ram"])
def test_tiers_depths_and_the_switch_between_paths(packed, refs, depth, tier):
    """A long prompt's prefill decodes to dense, its decode steps are fused, a batch of 4 is fused,
    a prefill after decode steps is dense again: the prefetched layers decoded for the wrong path
    are completed on the forward thread, and every step's tokens stay the in-memory model's."""
    path = packed("qwen2", torch.bfloat16, prune="magnitude", codec="expdict")
    ref = refs(path)[0]
    model = endor_gds.from_pretrained(path, device="cpu", prefetch_depth=depth, tier=tier)
    try:
        layers = len(model.endor.pipeline.plans)
        for ids in (LONG, PROMPT, LONG):
            model.endor.reset_stats()
            assert torch.equal(generate(model, ids), generate(ref, ids))
            counts = _fused_counts(model)
            assert counts == [0 if ids.numel() > 8 else layers] + [layers] * 5, counts
        assert_close(model, refs(path), LONG)  # dense: within the same bound, trivially
        mask = torch.ones_like(FOUR)
        model.endor.reset_stats()
        assert torch.equal(generate(model, FOUR, attention_mask=mask), generate(ref, FOUR, attention_mask=mask))
        assert _fused_counts(model) == [0] + [layers] * 5  # 12-row prefill, then 4 rows per step
        assert torch.equal(generate(model, BATCH, attention_mask=BATCH_MASK),
                           generate(ref, BATCH, attention_mask=BATCH_MASK))
    finally:
        model.endor.close()


def test_options_give_back_bit_identity(packed, refs):
    path = packed("mistral", torch.float16, prune="magnitude", codec="expdict")
    ref = refs(path)[0]
    model = endor_gds.from_pretrained(path, device="cpu")
    try:
        assert model.endor.fused_product().startswith("on for steps of at most 8 rows (batch x sequence):")
        assert model.endor.summary()["fused_product"] == model.endor.fused_product()
        with defaults.set(fused=False):
            assert model.endor.fused_product().startswith("off (fused=False)")
            model.endor.reset_stats()
            assert torch.equal(_logits(model, PROMPT), _logits(ref, PROMPT))
            assert torch.equal(generate(model, PROMPT), generate(ref, PROMPT))
            assert _fused_counts(model) == [0] * 7
        with defaults.set(fused_max_rows=1):  # only single-row steps: the decode steps of batch 1
            model.endor.reset_stats()
            assert torch.equal(generate(model, PROMPT), generate(ref, PROMPT))
            assert _fused_counts(model) == [0] + [3] * 5
        for bad in (17, 0, "many"):
            with pytest.raises(endor_gds.errors.ArgumentError, match="'auto' or an integer from 1 to 16"):
                defaults.set(fused_max_rows=bad)
    finally:
        model.endor.close()


@pytest.mark.parametrize("dtype, rows", [(torch.float16, 16), (torch.float32, 8), (torch.bfloat16, 1)])
def test_auto_limit_per_dtype(packed, dtype, rows):
    """fused_max_rows='auto' (the default): as many rows as the product beat decode + torch's own
    product in bench_decode for that dtype; a step of one more row decodes."""
    model = endor_gds.from_pretrained(packed("llama", dtype, prune="magnitude", codec="expdict"), device="cpu")
    try:
        with defaults.set(fused_max_rows="auto"):
            assert model.endor.fused_product().startswith(
                f"on for steps of at most {rows} rows (batch x sequence) ({rows} for {dtype}: fused_max_rows='auto')")
            for n, fused in ((rows, True), (rows + 1, False)):
                model.endor.reset_stats()
                _logits(model, torch.arange(3, 3 + n).reshape(1, n))
                assert _fused_counts(model) == [3 if fused else 0], (n, _fused_counts(model))
    finally:
        model.endor.close()


def test_a_weight_used_outside_the_product_fails_loudly(packed):
    """In a fused step a fused weight keeps its meta placeholder: code reaching for the dense
    weight fails instead of reading another layer's (or no) values."""
    path = packed("llama", torch.float16, prune="magnitude", codec="expdict")
    model = endor_gds.from_pretrained(path, device="cpu")
    seen = {}

    def peek(module, args):
        seen["q"] = module.self_attn.q_proj.weight.device.type
        seen["norm"] = module.input_layernorm.weight.device.type

    handle = model.model.layers[1].register_forward_pre_hook(peek)
    try:
        _logits(model, PROMPT)
        assert seen == {"q": "meta", "norm": "cpu"}
    finally:
        handle.remove()
        model.endor.close()


def test_a_cpu_without_the_vector_path_decodes(packed, monkeypatch):
    """The portable product adds in the same order but runs ~30x slower than decoding: a CPU
    without AVX2 + FMA + F16C decodes every step (bit-identical) instead."""
    monkeypatch.setattr("endor_gds.decode.cpu.cpu_features", lambda: ("ssse3", "avx2"))
    model = endor_gds.from_pretrained(packed("llama", torch.float16, prune="magnitude", codec="expdict"), device="cpu")
    try:
        assert model.endor.fused_product().startswith("off: this CPU lacks AVX2 + FMA + F16C")
        _logits(model, PROMPT)
        assert _fused_counts(model) == [0]
    finally:
        model.endor.close()


def test_dense_files_and_resident_layers_are_not_fused(packed):
    unpruned = endor_gds.from_pretrained(packed("opt", torch.float16, prune="none", codec="raw"), device="cpu")
    resident = endor_gds.from_pretrained(packed("llama", torch.float16), device="cpu", max_memory="1GiB")
    try:
        assert unpruned.endor.fused_product() == ("off: no streamed linear weight is encoded with a codec it "
                                                  "reads (raw, expdict, exphuff): the file stores them dense")
        _logits(unpruned, PROMPT)
        assert _fused_counts(unpruned) == [0]
        assert resident.endor.pipeline is None
        assert resident.endor.fused_product().startswith("off: no streamed linear weight")
    finally:
        for model in (unpruned, resident):
            model.endor.close()
