"""Streaming runtime on a GPU: bit-identical to the same pruned model held in GPU memory, for every
reader mode (KvikIO straight into device memory, POSIX into pinned host memory + async copy), both
tiers and several prefetch depths; ``max_memory`` respected by torch's allocator; a corrupted
extent stops the forward with a named error. Skipped without a GPU (see conftest.py).
"""

import pytest
import torch
from reference import PROMPT, assert_same, generate, reference_model

import endor_gds
from endor_gds.benchmarks.models import FAMILIES
from endor_gds.errors import DecodeError, PlacementError

pytestmark = pytest.mark.gpu

DEV = "cuda"


@pytest.fixture(scope="module")
def gpu_refs():
    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = reference_model(path).to(DEV)
        return cache[path]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_bit_identical_to_in_memory_model(packed, gpu_refs, family):
    path = packed(family, torch.float16, prune="magnitude")
    model = endor_gds.from_pretrained(path, device=DEV)
    try:
        assert model.endor.device.type == "cuda"
        assert model.endor.mode in ("gds", "posix-direct"), model.endor.mode  # AUTO: no compat mode
        assert_same(model, gpu_refs(path), DEV)
    finally:
        model.endor.close()


def test_cuda_moves_are_no_ops_or_refused(packed, gpu_refs):
    """The habitual ``model.to("cuda")`` / ``.cuda()`` after loading returns the model; ``.cpu()``
    is a PlacementError that changes nothing (see test_runtime.test_moves_are_no_ops_or_refused)."""
    path = packed("llama", torch.float16, prune="magnitude")
    model = endor_gds.from_pretrained(path, device=DEV)
    try:
        assert model.to(DEV) is model and model.cuda() is model and model.to("cuda:0") is model
        with pytest.raises(PlacementError, match=r"on cuda:0 in torch.float16 \(the file's dtype\); "
                                                 r"it cannot be moved to cpu in torch.float16"):
            model.cpu()
        assert_same(model, gpu_refs(path), DEV)
    finally:
        model.endor.close()


@pytest.mark.parametrize("io", ["kvikio", "posix-direct"])
@pytest.mark.parametrize("tier", ["ssd", "ram"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_cuda_readers_tiers_depths(packed, gpu_refs, io, tier, depth):
    path = packed("qwen2", torch.bfloat16, prune="magnitude")
    model = endor_gds.from_pretrained(path, device=DEV, io=io, tier=tier, prefetch_depth=depth)
    try:
        rt = model.endor
        direct = rt.mode in ("gds", "kvikio-compat")
        assert direct == (io == "kvikio")
        assert rt.backend.direct_to_device == (direct and tier == "ssd")
        assert_same(model, gpu_refs(path), DEV)
        s = rt.summary()
        assert s["prefetch_depth"] == depth and s["tier"] == tier and s["reader_mode"] == rt.mode
        assert s["per_token"]["bytes_read"] == sum(p.length for p in rt.pipeline.plans.values())
    finally:
        model.endor.close()


def test_cuda_fp32_and_unpruned_files(packed, gpu_refs):
    for path in (packed("opt", torch.float32, prune="none"), packed("llama", torch.float32)):
        model = endor_gds.from_pretrained(path, device=DEV)
        try:
            assert_same(model, gpu_refs(path), DEV)
        finally:
            model.endor.close()


def _peak_over(baseline: int) -> int:
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def test_cuda_budget_is_never_exceeded(packed, gpu_refs):
    """Torch's allocator peak while building and generating stays within ``max_memory`` plus the
    activations the same generation needs on the in-memory model (measured here, not assumed)."""
    path = packed("mistral", torch.float16, prune="magnitude")
    ref = gpu_refs(path)
    weights = sum(t.numel() * t.element_size() for t in ref.state_dict().values())
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    generate(ref, PROMPT.to(DEV))
    activations = _peak_over(base)  # the reference's weights are already in `base`
    assert activations < weights  # a sanity bound on the measurement itself

    probe = endor_gds.from_pretrained(path, device=DEV)
    rt = probe.endor
    per_layer = max(p.length + p.arena_bytes for p in rt.pipeline.plans.values())
    floor = rt.placement.resident_bytes + rt.placement.buffer_bytes
    rt.close()
    del probe, rt
    torch.cuda.empty_cache()

    budget = floor + per_layer + per_layer // 2  # room for exactly one resident layer
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = endor_gds.from_pretrained(path, device=DEV, max_memory={"cuda": budget})
    try:
        built = _peak_over(base)
        assert built <= budget, (built, budget)
        p = model.endor.placement
        assert p.resident_layers == [0] and p.streamed_layers == [1, 2]
        generate(model, PROMPT.to(DEV))
        ran = _peak_over(base)
        assert ran <= budget + activations, (ran, budget, activations)
        assert_same(model, ref, DEV)
    finally:
        model.endor.close()


def test_cuda_no_allocation_per_token(packed):
    """The same buffers every token: torch's allocated bytes after two equal generations match."""
    path = packed("llama", torch.float16, prune="magnitude")
    model = endor_gds.from_pretrained(path, device=DEV)
    try:
        prompt = PROMPT.to(DEV)
        generate(model, prompt)
        torch.cuda.synchronize()
        after_first = torch.cuda.memory_allocated()
        for _ in range(3):
            generate(model, prompt)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == after_first
    finally:
        model.endor.close()


@pytest.mark.parametrize("io,layer", [("kvikio", 1), ("posix-direct", 1), ("kvikio", 2)])
def test_cuda_corrupted_bitmap_is_a_decode_error(packed, tmp_path, io, layer):
    """A set bit the tile offsets do not count: the kernel reports it and the same forward call
    raises a DecodeError naming tensor and tile (also when the bad layer is the step's last), so
    no output computed from it is returned; no streamed layer keeps half-swapped weights."""
    src = packed("llama", torch.float16, prune="magnitude")
    name = f"model.layers.{layer}.self_attn.q_proj.weight"
    with endor_gds.open(src) as f:
        seg = f.tensors[name].segments["bitmap"]
    data = bytearray(src.read_bytes())
    word = int.from_bytes(data[seg.offset:seg.offset + 4], "little")
    zero_bit = next(b for b in range(32) if not word >> b & 1)
    data[seg.offset + zero_bit // 8] |= 1 << (zero_bit % 8)
    bad = tmp_path / "bad.endor"
    bad.write_bytes(bytes(data))
    model = endor_gds.from_pretrained(bad, device=DEV, io=io)
    try:
        with pytest.raises(DecodeError, match=r"q_proj\.weight: tile 0"):
            with torch.no_grad():
                model(PROMPT.to(DEV))
        for module in model.model.layers:
            assert all(p.device.type == "meta" for p in module.parameters())
        with pytest.raises(DecodeError):  # every later step fails the same way, none returns
            generate(model, PROMPT.to(DEV))
    finally:
        model.endor.close()
