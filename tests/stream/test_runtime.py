"""Streaming runtime: bit-identical to the same pruned model held in memory, overlap, memory, faults."""

import gc
import threading

import pytest
import torch
from reference import PROMPT, assert_same, generate, reference_model

import endor_gds
from endor_gds.benchmarks.models import FAMILIES
from endor_gds.errors import BudgetError, PlacementError


@pytest.fixture(scope="module")
def refs():
    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = reference_model(path)
        return cache[path]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_bit_identical_to_in_memory_model(packed, refs, family):
    path = packed(family, torch.float16, prune="magnitude")
    model = endor_gds.from_pretrained(path, device="cpu")
    try:
        assert type(model).__name__ == type(refs(path)).__name__
        assert model.endor.mode in ("posix-direct", "posix-buffered")
        assert_same(model, refs(path))
    finally:
        model.endor.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("codec", ["raw", "expdict", "exphuff"])
def test_format_versions_stream_bit_identically(packed, refs, dtype, codec):
    """Format v1 (codec raw), v2 (codec expdict on every linear weight) and v3 (codec exphuff)
    files stream bit-identically to the in-memory model decoded by the numpy reference."""
    path = packed("llama", dtype, prune="magnitude", codec=codec)
    with endor_gds.open(path) as f:
        assert f.format_version == {"raw": 1, "expdict": 2, "exphuff": 3}[codec]
        assert {e.codec for e in f.tensors.values() if e.needs_decode} == {codec}
    model = endor_gds.from_pretrained(path, device="cpu")
    try:
        assert_same(model, refs(path))
    finally:
        model.endor.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tier", ["ssd", "ram"])
def test_unpruned_exphuff_streams_bit_identically(packed, refs, dtype, tier):
    """An unpruned model packed with codec exphuff: every linear weight is entropy-coded without a
    bitmap (encoding dense, codec exphuff) and streams bit for bit as the in-memory model."""
    path = packed("llama", dtype, prune="none", codec="exphuff")
    with endor_gds.open(path) as f:
        linear = [e for e in f.tensors.values() if e.codec == "exphuff"]
        assert linear and {e.encoding for e in linear} == {"dense"}
        assert all(e.nnz == e.numel and "bitmap" not in e.segments for e in linear)
    model = endor_gds.from_pretrained(path, device="cpu", tier=tier)
    try:
        assert_same(model, refs(path))
    finally:
        model.endor.close()


GENERATE_VARIANTS = {
    "beam_search": dict(num_beams=3),
    "beam_sample": dict(num_beams=2, do_sample=True),
    "no_cache": dict(use_cache=False),
    "static_cache": dict(cache_implementation="static"),
    "return_sequences": dict(do_sample=True, num_return_sequences=3),
    "repetition_penalty": dict(repetition_penalty=1.3),
    "prompt_lookup": dict(prompt_lookup_num_tokens=2),
}


@pytest.mark.parametrize("variant", sorted(GENERATE_VARIANTS))
def test_generate_variants_bit_identical(packed, refs, variant):
    """generate()'s other decoding strategies and cache kinds reorder, copy or drop the KV cache
    between the streamed layers' calls: still bit for bit the in-memory model's tokens."""
    path = packed("qwen2", torch.float16, prune="magnitude")
    model = endor_gds.from_pretrained(path, device="cpu")
    try:
        kw = GENERATE_VARIANTS[variant]
        assert torch.equal(generate(model, PROMPT, **kw), generate(refs(path), PROMPT, **kw))
    finally:
        model.endor.close()


def test_forward_variants_bit_identical(packed, refs):
    """Loss with labels, inputs_embeds and every hidden state, as the in-memory model gives them."""
    path = packed("qwen2", torch.float16, prune="magnitude")
    model, ref = endor_gds.from_pretrained(path, device="cpu"), refs(path)
    try:
        with torch.no_grad():
            got, want = model(PROMPT, labels=PROMPT), ref(PROMPT, labels=PROMPT)
            assert torch.equal(got.loss, want.loss) and torch.equal(got.logits, want.logits)
            emb = ref.get_input_embeddings()(PROMPT)
            assert torch.equal(model(inputs_embeds=emb).logits, ref(inputs_embeds=emb).logits)
            got = model(PROMPT, output_hidden_states=True).hidden_states
            want = ref(PROMPT, output_hidden_states=True).hidden_states
            assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    finally:
        model.endor.close()


def _in_thread(fn, timeout=120):
    """``fn()`` in another thread; its result, or its exception re-raised; a hang fails."""
    box = {}

    def run():
        try:
            box["out"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["exc"] = exc
    t = threading.Thread(target=run)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the thread did not finish: a step lock left held?"
    if "exc" in box:
        raise box["exc"]
    return box["out"]


def test_generate_from_several_threads_is_bit_identical(packed, refs):
    """Four threads generating at once on one streaming model: each gets the in-memory model's
    tokens. The steps are serialised; before, interleaved steps swapped each other's streamed
    layers (some threads failed with "Tensor on device meta ...", others got other tokens)."""
    path = packed("qwen2", torch.float16, prune="magnitude")
    model, ref = endor_gds.from_pretrained(path, device="cpu"), refs(path)
    prompts = [PROMPT, PROMPT[:, :4], PROMPT[:, 2:], torch.tensor([[40, 41]])]
    try:
        want = [generate(ref, p) for p in prompts]
        for _ in range(2):
            outs, errors = {}, []

            def work(i):
                try:
                    with torch.no_grad():
                        outs[i] = model.generate(prompts[i], max_new_tokens=6, pad_token_id=0)
                except Exception as exc:  # noqa: BLE001 - collected and reported below
                    errors.append(f"thread {i}: {type(exc).__name__}: {exc}")
            threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not any(t.is_alive() for t in threads) and errors == []
            assert all(torch.equal(outs[i], want[i]) for i in range(len(prompts)))
    finally:
        model.endor.close()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_step_cut_short_does_not_block_the_next(packed, refs, error):
    """A forward that raises inside a streamed layer leaves the model usable from any thread. An
    Exception releases the step lock in an always-called hook; after a KeyboardInterrupt (torch
    calls no hook then) the same thread's next step takes the lock over."""
    path = packed("qwen2", torch.float16, prune="magnitude")
    model, ref = endor_gds.from_pretrained(path, device="cpu"), refs(path)
    mlp = model.model.layers[1].mlp
    real = mlp.forward

    def fail_once(*args, **kwargs):
        mlp.forward = real
        raise error("cut short")
    mlp.forward = fail_once
    try:
        with torch.no_grad():
            want = ref(PROMPT).logits
            with pytest.raises(error, match="cut short"):
                model(PROMPT)
            if error is KeyboardInterrupt:
                assert torch.equal(model(PROMPT).logits, want)
            assert torch.equal(_in_thread(lambda: model(PROMPT).logits), want)
    finally:
        model.endor.close()


def test_moves_are_no_ops_or_refused(packed, refs):
    """``model.to(device)`` where the model already is returns it; any other move or dtype change
    is a PlacementError that changes nothing. Left to torch, ``model.to("cpu")`` failed on the meta
    placeholders ("Cannot copy out of meta tensor") and ``model.float()`` converted the resident
    tensors only, so the next forward failed in a matmul (float against half)."""
    path = packed("llama", torch.float16, prune="magnitude")
    model = endor_gds.from_pretrained(path, device="cpu")
    try:
        for same in (lambda m: m.to("cpu"), lambda m: m.to(torch.float16), lambda m: m.cpu(),
                     lambda m: m.half(), lambda m: m.to("cpu", torch.float16), lambda m: m.to()):
            assert same(model) is model
        for move, target in ((lambda m: m.float(), "to cpu in torch.float32"),
                             (lambda m: m.to(dtype=torch.bfloat16), "to cpu in torch.bfloat16"),
                             (lambda m: m.to("meta"), "to meta in torch.float16")):
            with pytest.raises(PlacementError, match=rf"\.endor: a streaming model stays where "
                                                      rf"from_pretrained placed it, on cpu in "
                                                      rf"torch.float16 \(the file's dtype\); it "
                                                      rf"cannot be moved {target}\. For another"):
                move(model)
        if not torch.cuda.is_available():
            with pytest.raises(PlacementError, match=r"cannot be moved \(AssertionError: Torch not "
                                                     r"compiled with CUDA"):
                model.cuda()
        assert_same(model, refs(path))  # the refused moves changed nothing
    finally:
        model.endor.close()


def test_dropping_the_model_closes_its_runtime(packed):
    """No reference cycle holds a streaming model (the placement guard refers to it weakly): the
    last reference dropped closes the file and stops the pipeline's threads at once, without
    waiting for the cycle collector."""
    model = endor_gds.from_pretrained(packed("llama", torch.float16), device="cpu")
    runtime = model.endor
    gc.disable()
    try:
        del model
        assert runtime._closed
    finally:
        gc.enable()


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("tier", ["ssd", "ram"])
def test_depths_and_tiers(packed, refs, depth, tier):
    path = packed("qwen2", torch.bfloat16, prune="magnitude")
    model = endor_gds.from_pretrained(path, device="cpu", prefetch_depth=depth, tier=tier)
    try:
        assert_same(model, refs(path))
        s = model.endor.summary()
        assert s["prefetch_depth"] == depth and s["tier"] == tier
    finally:
        model.endor.close()


def test_unpruned_and_fp32_files(packed, refs):
    for path in (packed("opt", torch.float32, prune="none"), packed("llama", torch.float32)):
        model = endor_gds.from_pretrained(path, device="cpu")
        try:
            assert_same(model, refs(path))
        finally:
            model.endor.close()


def test_budget_keeps_some_layers_resident(packed, refs):
    path = packed("mistral", torch.float16, prune="magnitude")
    probe = endor_gds.from_pretrained(path, device="cpu")
    rt = probe.endor
    per_layer = max(p.length + p.arena_bytes for p in rt.pipeline.plans.values())
    floor = rt.placement.resident_bytes + rt.placement.buffer_bytes
    rt.close()
    budget = floor + per_layer + per_layer // 2  # room for exactly one resident layer
    model = endor_gds.from_pretrained(path, device="cpu", max_memory={"cpu": budget})
    try:
        p = model.endor.placement
        assert p.resident_layers == [0] and p.streamed_layers == [1, 2]
        assert p.resident_bytes + p.buffer_bytes <= budget
        assert_same(model, refs(path))
    finally:
        model.endor.close()
    with pytest.raises(BudgetError, match="cannot hold the resident tensors"):
        endor_gds.from_pretrained(path, device="cpu", max_memory=str(floor - 1))
    everything = endor_gds.from_pretrained(path, device="cpu", max_memory="1GiB")
    try:
        assert everything.endor.placement.streamed_layers == [] and everything.endor.pipeline is None
        assert_same(everything, refs(path))
    finally:
        everything.endor.close()


def test_stats_per_token(packed):
    path = packed("llama", torch.float16, prune="magnitude")
    model = endor_gds.from_pretrained(path, device="cpu")
    try:
        generate(model, PROMPT)
        s = model.endor.summary()
        extent_bytes = sum(p.length for p in model.endor.pipeline.plans.values())
        assert s["steps"] == 6  # prefill + 5 decode steps produce 6 new tokens
        for step in s["step_stats"]:
            assert step["layers"] == 3 and step["bytes_read"] == extent_bytes
            assert step["wall_s"] > 0 and 0.0 <= step["overlap"] <= 1.0
        pt = s["per_token"]
        for key in ("s", "bytes_read", "read_s", "decode_s", "compute_s", "stall_s", "overlap", "gbps",
                    "tokens_per_s"):
            assert key in pt
        assert pt["bytes_read"] == extent_bytes and s["reader_mode"] == model.endor.mode
    finally:
        model.endor.close()


def test_verify_reads_catches_corruption(packed, tmp_path):
    src = packed("llama", torch.float16, prune="magnitude")
    with endor_gds.open(src) as f:
        seg = f.tensors["model.layers.1.mlp.up_proj.weight"].segments["values"]
    data = bytearray(src.read_bytes())
    data[seg.offset + 10] ^= 0x40  # a flipped bit in a value: decodes fine, but is wrong
    bad = tmp_path / "bad.endor"
    bad.write_bytes(bytes(data))
    model = endor_gds.from_pretrained(bad, device="cpu")  # checked by default
    try:
        with pytest.raises(endor_gds.ChecksumError, match="up_proj.weight:values"):
            with torch.no_grad():
                model(PROMPT)
    finally:
        model.endor.close()


def test_auto_device_is_cpu_without_gpu(packed):
    if torch.cuda.is_available():
        pytest.skip("GPU present")
    model = endor_gds.from_pretrained(packed("llama", torch.float16), device="auto")
    try:
        assert model.endor.device.type == "cpu"
        assert "StreamingRuntime" in repr(model.endor)
    finally:
        model.endor.close()
