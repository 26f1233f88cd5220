"""Mixture-of-experts models stream only the experts each step is routed to: bit-identical to the
same model held in memory, with the bytes read per step those of the routed experts the cache
lacked, and bad files refused by name before any expert is read."""

from __future__ import annotations

import re
import shutil
import threading
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.manifest_edit import manifest_edit
from support.reference import assert_same, reference_model

import endor_gds
from endor_gds.benchmarks.models import MOE_FAMILIES
from endor_gds.errors import ArgumentError, ChecksumError, EndorError, FormatError, UnsupportedModelError
from endor_gds.stream import integrity
from endor_gds.stream.experts import ExpertCache, routed_experts
from endor_gds.stream.plan import plan_layer

E = 8  # experts per MoE layer of the test models (benchmarks.models)


def _routing(model) -> list[dict[int, set[int]]]:
    """Per forward step, per layer, the experts the router picked (recorded by forward hooks on
    the experts modules, independently of the runtime's own hook)."""
    steps: list[dict[int, set[int]]] = []
    layers = model.model.layers

    def record(i):
        def hook(mod, args, kwargs):
            top_k = args[1] if len(args) > 1 else kwargs["top_k_index"]
            steps[-1].setdefault(i, set()).update(int(e) for e in top_k.reshape(-1))
        return hook

    for i, layer in enumerate(layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            experts.register_forward_pre_hook(record(i), with_kwargs=True)
    model.register_forward_pre_hook(lambda *_: steps.append({}))
    return steps


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("tier", ["ssd", "ram"])
def test_streamed_experts_equal_the_model_in_memory(packed, family, tier):
    path = packed(family, torch.float32)
    ref = reference_model(path)
    model = endor_gds.from_pretrained(path, device="cpu", tier=tier, expert_prefetch=True)
    try:
        assert endor_gds.open(path).format_version == 4
        assert_same(model, ref)
        steps = list(model.endor.steps)
        # every routed expert was a hit (cached, or read ahead on a guess) or read for its forward
        assert all(s.experts_read - s.experts_prefetched + s.expert_hits == s.experts_routed for s in steps)
        assert any(s.expert_hits for s in steps)
        assert sum(s.experts_prefetched for s in steps) > 0
        assert all(0 <= s.prefetch_hits <= s.experts_routed for s in steps)
    finally:
        model.endor.close()


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("depth,cache,prefetch", [(1, 1, True), (2, 3, False), (1, 5, True)])
def test_a_cache_smaller_than_a_layer_evicts_and_stays_exact(packed, family, depth, cache, prefetch):
    """Fewer cached experts than one layer routes a batch of 4 to: experts are evicted during a
    forward and read again, and the output is still the in-memory model's."""
    path = packed(family, torch.float32)
    ref = reference_model(path)
    model = endor_gds.from_pretrained(path, device="cpu", prefetch_depth=depth, expert_cache=cache,
                                      expert_prefetch=prefetch)
    try:
        ids = torch.randint(3, 500, (4, 9), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
        step = list(model.endor.steps)[-1]
        assert step.experts_routed > cache  # the batch needs more experts than the cache holds
        assert step.experts_read >= step.experts_routed - cache
        assert_same(model, ref)
    finally:
        model.endor.close()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_bytes_read_are_the_routed_experts_minus_hits(packed, family):
    """With a cache that holds every expert, a step reads the dense extents plus the extents of
    the routed experts no earlier step was routed to: computed from the routing recorded by
    forward hooks and the extents in the file, against the runtime's statistics."""
    path = packed(family, torch.float32)
    f = endor_gds.open(path)
    dense = sum(ext.length for ext in f.layers)
    size = {(i, ext.expert): ext.length for i, exts in f.experts.items() for ext in exts}
    model = endor_gds.from_pretrained(path, device="cpu", expert_cache=len(size))
    routing = _routing(model)
    try:
        ids = torch.randint(3, 500, (2, 5), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        seen: set = set()
        for stats, routed in zip(model.endor.steps, routing, strict=True):
            keys = {(i, e) for i, es in routed.items() for e in es}
            new = keys - seen
            seen |= keys
            assert stats.experts_routed == len(keys)
            assert stats.experts_read == len(new)
            assert stats.expert_hits == len(keys) - len(new)
            assert stats.bytes_read == dense + sum(size[k] for k in new)
        assert len(seen) < len(size) or len(routing) > 1  # hits happened, or every expert was used
    finally:
        model.endor.close()


def test_all_experts_mode_reads_every_expert_each_step(packed):
    path = packed("qwen3_moe", torch.float32)
    f = endor_gds.open(path)
    every = sum(ext.length for exts in f.experts.values() for ext in exts)
    dense = sum(ext.length for ext in f.layers)
    ref = reference_model(path)
    model = endor_gds.from_pretrained(path, device="cpu", experts="all")
    try:
        assert_same(model, ref)
        for s in model.endor.steps:
            assert s.bytes_read == dense + every and s.expert_hits == 0
    finally:
        model.endor.close()


def test_routed_experts_are_the_distinct_valid_ids():
    top_k = torch.tensor([[3, 1], [1, 8], [0, 3]])
    assert routed_experts(top_k, 8) == [0, 1, 3]  # 8: a padding index, not an expert


def test_expert_options_are_checked_before_the_file_is_opened(tmp_path):
    with pytest.raises(ArgumentError, match="experts must be one of"):
        endor_gds.from_pretrained(tmp_path / "none.endor", experts="some")
    with pytest.raises(ArgumentError, match="expert_cache"):
        endor_gds.from_pretrained(tmp_path / "none.endor", expert_cache=0)


def test_a_missing_expert_extent_is_named_before_any_read(packed, tmp_path):
    """The manifest loses expert 5 of layer 0 (its extent and tensors): refused at open or load,
    by name, not when a token is first routed to it."""
    path = packed("mixtral", torch.float32)

    def drop(m):
        m["extents"] = [e for e in m["extents"] if e["name"] != "layer.0.expert.5"]
        m["tensors"] = [t for t in m["tensors"] if ".layers.0.mlp.experts.5." not in t["name"]]

    with pytest.raises(FormatError, match="expert extents of layer 0 must be numbered"):
        endor_gds.from_pretrained(manifest_edit(path, drop, tmp_path), device="cpu")


def test_an_expert_slice_in_another_experts_extent_is_refused(packed, tmp_path):
    """Expert 2's extent holds a slice named for expert 9: named before any read (a slice must
    lie in its own expert's extent, one routed expert being one read)."""
    path = packed("qwen3_moe", torch.float32)

    def rename(m):
        for t in m["tensors"]:
            if t["name"] == "model.layers.1.mlp.experts.2.down_proj":
                t["name"] = "model.layers.1.mlp.experts.9.down_proj"

    with pytest.raises(EndorError, match="in extent layer.1.expert.2 is not under"):
        endor_gds.from_pretrained(manifest_edit(path, rename, tmp_path), device="cpu")


def test_a_config_whose_expert_count_disagrees_is_named(packed, tmp_path):
    path = packed("qwen2_moe", torch.float32)

    def more(m):
        m["config"]["num_experts"] = 16

    with pytest.raises(FormatError, match="config's expert count disagrees"):
        endor_gds.from_pretrained(manifest_edit(path, more, tmp_path), device="cpu")


def test_packing_refuses_a_checkpoint_missing_an_expert_tensor(model_dir, tmp_path):
    src = model_dir("qwen3_moe", torch.float32)
    bad = tmp_path / "ckpt"
    shutil.copytree(src, bad)
    sd = load_file(bad / "model.safetensors")
    del sd["model.layers.2.mlp.experts.4.up_proj.weight"]
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="expert 4 of layer 2.*lacks up_proj.weight"):
        endor_gds.pack(bad, tmp_path / "out.endor", progress=False)
    assert not (tmp_path / "out.endor").exists()


def test_wanda_refuses_an_experts_layout_it_cannot_follow_by_name(model_dir, tmp_path, monkeypatch):
    """Wanda prunes mixture-of-experts models (tests/packing/test_wanda_moe.py) by recomputing each
    expert's inputs as the eager experts forward does; an experts module of another layout (here
    one with biases) is refused by name before anything is written."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts  # noqa: PLC0415

    init = MixtralExperts.__init__

    def with_bias(self, config):
        init(self, config)
        self.has_bias = True

    src = model_dir("mixtral", torch.float32)
    monkeypatch.setattr(MixtralExperts, "__init__", with_bias)
    calib = tmp_path / "calib.txt"
    calib.write_text("w5 w6 w7 " * 50)
    with pytest.raises(UnsupportedModelError, match=r"layer 0's experts module MixtralExperts \(mlp\.experts\) "
                                                    r"is not the layout .*: has_bias=True; use prune='magnitude'"):
        endor_gds.pack(src, tmp_path / "o.endor", prune="wanda", calib=calib, calib_samples=2,
                       calib_seqlen=16, progress=False)
    assert not (tmp_path / "o.endor").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_streamed_experts_on_cuda_equal_the_model_in_memory(packed, family):
    """The same on the GPU: experts read, checked and decoded by the CUDA backend and kernel, a
    cache of 3 experts (evictions within each forward)."""
    path = packed(family, torch.float32)
    ref = reference_model(path).to("cuda")
    model = endor_gds.from_pretrained(path, device="cuda", expert_cache=3)
    try:
        assert_same(model, ref, device="cuda")
    finally:
        model.endor.close()


def test_expert_rows_that_do_not_stack_are_refused_before_writing(model_dir, tmp_path):
    """An expert's gate and up projections of other widths cannot make one gate_up_proj slice."""
    bad = tmp_path / "ckpt"
    shutil.copytree(model_dir("qwen3_moe", torch.float32), bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.0.mlp.experts.1.up_proj.weight"] = torch.zeros(96, 64)
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(endor_gds.PackError, match="experts.1.gate_up_proj is made of .* do not stack by rows"):
        endor_gds.pack(bad, tmp_path / "out.endor", progress=False)
    assert not (tmp_path / "out.endor").exists()


def test_the_expert_cache_counts_in_max_memory(packed):
    """The budget must hold the expert cache too: a budget that holds everything else but not
    the default cache is a BudgetError naming it; a smaller cache fits and streams exactly."""
    path = packed("qwen3_moe", torch.float32)
    small = endor_gds.from_pretrained(path, device="cpu", expert_cache=1)
    try:
        per_expert = small.endor.experts.backend.buffer_bytes  # one slot: staging + dense arena
        fits = small.endor.placement.resident_bytes + small.endor.placement.buffer_bytes
    finally:
        small.endor.close()
    with pytest.raises(endor_gds.BudgetError, match=r"plus the expert cache \(\d+ bytes; expert_cache="):
        endor_gds.from_pretrained(path, device="cpu", max_memory=fits + per_expert)  # default: 8 experts
    ref = reference_model(path)
    model = endor_gds.from_pretrained(path, device="cpu", max_memory=fits + per_expert, expert_cache=2)
    try:
        assert model.endor.experts.capacity == 2
        assert_same(model, ref)
    finally:
        model.endor.close()


class _SlowBackend:
    """A backend whose reads wait for ``release``: loads stay in flight while the test acts."""

    def __init__(self):
        self.release = threading.Event()
        self.forgotten = []

    def read(self, plan, s, on_chunk=None):
        self.release.wait(10)

    def read_checked(self, plan, s, check):
        self.read(plan, s)

    def decode(self, plan, s, dense=True):
        return True

    def wait_ready(self, plan, s):
        pass

    def mark_free(self, plan, s):
        pass

    def forget(self, plan, s):
        self.forgotten.append((plan, s))

    def tensors(self, plan, s):
        return {"w": torch.full((1,), float(plan.expert))}


def test_a_forward_needing_a_slot_held_by_guesses_takes_one_back():
    """Every slot is held by guesses still loading when the forward needs its expert: the latest
    guess, not started yet, is cancelled (not counted as read) and its slot serves the forward."""
    plans = {(1, e): SimpleNamespace(length=4096, expert=e) for e in range(4)}  # plans' stand-ins
    backend = _SlowBackend()
    cache = ExpertCache(plans, backend, capacity=2, check=None)
    try:
        cache.prefetch(1, [0, 1])  # both slots: (1, 0) loading (blocked), (1, 1) queued behind it
        assert cache.stats.prefetched == 2 and cache.stats.read == 2
        cache.route(1, [2])  # no slot for expert 2
        backend.release.set()
        assert cache.weight(1, 2, "w").item() == 2.0
        assert cache.stats.prefetched == 1 and cache.stats.read == 2  # (1, 1) cancelled, (1, 2) read
        assert cache.stats.nbytes == 2 * 4096
        cache.done()
    finally:
        cache.close()


def test_a_damaged_expert_extent_is_named_and_never_computed_with(packed, tmp_path, monkeypatch):
    """An expert's extent is checked as a layer's: its pieces as they arrive, on the CRC threads
    (the loader goes on reading); one flipped bit in an expert the step is routed to is read again
    once, then a ChecksumError names the expert's extent and segment, and no logits come back. The
    intact file passes, its experts' checks on the CRC threads."""
    src = packed("qwen3_moe", torch.float16, prune="magnitude")
    prompt = torch.tensor([[1, 5, 9, 22]])
    where = set()
    crc = integrity._crc32c.crc32c
    monkeypatch.setattr(integrity._crc32c, "crc32c",
                        lambda b, *a, **k: where.add(threading.current_thread().name.split("_")[0]) or crc(b, *a, **k))
    model = endor_gds.from_pretrained(src, device="cpu")
    try:
        routing = _routing(model)
        where.clear()  # the resident extent's check at load
        assert model(prompt).logits.shape[-1] > 0
        assert "endor-crc" in where and "endor-experts" not in where, where
    finally:
        model.endor.close()
    layer = max(routing[0])
    expert = min(routing[0][layer])  # routed at the first step: read by it
    dst = tmp_path / "damaged.endor"
    shutil.copy(src, dst)
    with endor_gds.open(dst) as f:
        ext = next(x for x in f.experts[layer] if x.expert == expert)
        plan = plan_layer(f, ext, f"model.layers.{layer}.mlp.experts.{expert}.")
    tensor, kind, off, length, _ = max(plan.segment_crcs, key=lambda seg: seg[3])
    with open(dst, "r+b") as fh:
        fh.seek(ext.offset + off + length // 2)
        byte = fh.read(1)[0]
        fh.seek(-1, 1)
        fh.write(bytes([byte ^ 0x08]))
    model = endor_gds.from_pretrained(dst, device="cpu")
    try:
        with pytest.raises(ChecksumError, match=rf"extent {re.escape(ext.name)}, segment "
                                                rf"{re.escape(f'{tensor}:{kind}')} \(file offset "
                                                rf"{ext.offset + off}, .* also when read again from storage"):
            model(prompt)
        assert model.endor.check.rereads == 1
    finally:
        model.endor.close()
