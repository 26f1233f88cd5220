"""The streamed model's reference: the same pruned weights decoded by the numpy reference decoder
and held in memory, and the comparisons every streaming test makes against it."""

from __future__ import annotations

import torch
import transformers

import endor_gds

PROMPT = torch.tensor([[1, 5, 9, 22, 7, 101, 3]])
BATCH = torch.tensor([[0, 0, 4, 8, 15, 16], [1, 23, 42, 7, 9, 11]])
BATCH_MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])


def reference_model(path) -> torch.nn.Module:
    """The same pruned model, every weight decoded by the reference decoder and held in memory."""
    with endor_gds.open(path) as f:
        cfg = transformers.AutoConfig.for_model(**f.config)
        dtype = f.read_tensor(next(n for n in f.tensors if "layers.0." in n and n.endswith("proj.weight")
                                    or "fc1.weight" in n)).dtype
        # eager experts, as the streamed model runs them (it indexes only the routed experts)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, experts_implementation="eager")
        sd = {k: _read(f, k, v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    return model.eval()


def _read(f, name: str, shape) -> torch.Tensor:
    """Tensor ``name`` of the file; a fused experts parameter ``[E, ...]`` from its per-expert
    slices (``<owner>.<e>.<leaf>``)."""
    owner, _, leaf = name.rpartition(".")
    if f"{owner}.0.{leaf}" in f.tensors:
        return torch.stack([f.read_tensor(f"{owner}.{e}.{leaf}") for e in range(shape[0])])
    return f.read_tensor(name)


def generate(model, ids, **kw):
    torch.manual_seed(1234)
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=6, pad_token_id=0, **kw)


def assert_same(model, ref, device="cpu"):
    """Logits, greedy, sampled and batched generations of ``model`` equal ``ref``'s, bit for bit."""
    prompt, batch, mask = PROMPT.to(device), BATCH.to(device), BATCH_MASK.to(device)
    with torch.no_grad():
        got, want = model(prompt).logits, ref(prompt).logits
    assert torch.equal(got, want), f"max |diff| {(got.float() - want.float()).abs().max().item()}"
    assert torch.equal(generate(model, prompt), generate(ref, prompt))
    sample = dict(do_sample=True, temperature=0.9, top_k=50)
    assert torch.equal(generate(model, prompt, **sample), generate(ref, prompt, **sample))
    assert torch.equal(generate(model, batch, attention_mask=mask),
                       generate(ref, batch, attention_mask=mask))
