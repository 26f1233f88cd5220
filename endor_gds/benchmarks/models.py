"""Tiny random models built from real transformers configs, saved with save_pretrained.

No weights can be downloaded here, so every test model is ``AutoModelForCausalLM.from_config``
with transformers' own random init, saved as safetensors (single file or sharded), plus a small
word-level tokenizer so the CLI's text path has something real to use.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "opt")
# mixtures of experts: 8 experts, 2 per token
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")

_COMMON = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=512,
               max_position_embeddings=256)


def make_config(family: str, **overrides) -> transformers.PretrainedConfig:
    if family == "opt":
        kw = dict(_COMMON, ffn_dim=352, word_embed_proj_dim=128)
        kw.update(overrides)
        return transformers.OPTConfig(**kw)
    kw = dict(_COMMON, intermediate_size=352, num_key_value_heads=2)
    if family == "mixtral":
        kw.update(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)
    elif family in ("qwen2_moe", "qwen3_moe"):
        kw.update(moe_intermediate_size=96, num_experts=8, num_experts_per_tok=2)
    elif family == "olmoe":
        kw.update(intermediate_size=96, num_experts=8, num_experts_per_tok=2, eos_token_id=2)
    elif family == "deepseek_v3":  # latent attention; layer 0 a dense MLP, one shared expert
        kw.update(moe_intermediate_size=96, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                  first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16,
                  qk_nope_head_dim=16, v_head_dim=32, n_group=1, topk_group=1, num_key_value_heads=4)
    if family == "qwen2_moe":  # a shared expert; layer 1 a dense MLP (mlp_only_layers)
        kw.update(shared_expert_intermediate_size=64, mlp_only_layers=[1])
    kw.update(overrides)
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mixtral": transformers.MixtralConfig,
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "olmoe": transformers.OlmoeConfig,
        "deepseek_v3": transformers.DeepseekV3Config,
    }[family]
    return cls(**kw)


def save_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over words w0..wN, good enough for encode/decode round trips."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    # a plain chat template, so chat completions can be served and tested
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}assistant{% endif %}")
    fast.save_pretrained(folder)


def build_model(folder, family: str = "llama", dtype=torch.float16, *, sharded: bool = False,
                seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    """Create and save a random model; returns the folder."""
    folder = Path(folder)
    cfg = make_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(folder, max_shard_size="150KB" if sharded else "10GB")
    if tokenizer:
        save_tokenizer(folder, cfg.vocab_size)
    return folder


def state_dict_of(folder) -> dict[str, torch.Tensor]:
    """All tensors of a saved checkpoint, read with the safetensors library (the independent path)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    folder = Path(folder)
    out = {}
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    for f in files:
        out.update(load_file(folder / f))
    return out
