"""Build a transformers model without materialising its weights, and put tensors into it.

The runtime and the Wanda pruner both need the model's real module classes (so ``generate()``,
the KV cache and attention masks behave as users know them) but never the whole model's weights
in memory. Parameters are therefore created on the ``meta`` device; buffers (rotary
``inv_freq`` and the like, computed in ``__init__``) are created for real, because nothing else
would compute them. transformers' ``no_init_weights`` skips the random init, so each parameter
costs one uninitialised allocation that is immediately replaced by a meta tensor.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from endor_gds._checks import check_int  # the manifest's integer check: a config is untrusted JSON too
from endor_gds.errors import EndorError, FormatError, UnsupportedModelError

__all__ = ["empty_model", "params_on_meta", "set_tensor", "get_submodule", "slot_of", "model_dtype",
           "model_for", "check_tensors", "exception_line"]


@contextmanager
def params_on_meta():
    """Inside this block, every ``nn.Parameter`` registered on a module lives on ``meta``."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def empty_model(config: dict, dtype: torch.dtype):
    """An ``AutoModelForCausalLM`` for ``config`` (a config.json dict): params on meta, buffers real."""
    import transformers  # noqa: PLC0415 - heavy import, only when a model is built
    from transformers.initialization import no_init_weights  # noqa: PLC0415 - heavy (~1 s); only when a model is built or tokenized

    cfg = transformers.AutoConfig.for_model(**config)
    with no_init_weights(), params_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def model_dtype(recipe, tensors: Iterable[tuple[str, torch.dtype]]) -> torch.dtype:
    """The dtype a model is built and run in: that of its first linear weight (float32 if none)."""
    return next((dtype for name, dtype in tensors if recipe.is_linear_weight(name)), torch.float32)


# config.json fields that size tensors or reshape activations. transformers checks their types but
# not their sign: an OPT config with num_attention_heads = -1 builds (head_dim 128 // -1 = -128
# passes its divisibility check), loads, and fails in the first forward (found by the fuzzer).
_SIZE_FIELDS = ("hidden_size", "intermediate_size", "ffn_dim", "word_embed_proj_dim",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                "max_position_embeddings")


def model_for(config: dict, dtype: torch.dtype, where, family: str) -> nn.Module:
    """``empty_model``, with a config that transformers refuses (a string head count, an unknown
    ``model_type``), or whose sizes are not positive integers, as a FormatError naming ``where``,
    not a transformers exception or a failing forward."""
    for key in _SIZE_FIELDS:
        if config.get(key) is not None:
            check_int(where, f"config {key}", config[key], 1, (1 << 31) - 1)
    if not dtype.is_floating_point:
        raise UnsupportedModelError(f"{where}: its linear weights are {_name(dtype)}; endor_gds "
                                    f"runs models whose weights are floating point")
    try:
        return empty_model(config, dtype)
    except EndorError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises for a bad config
        raise FormatError(f"{where}: its config does not build a {family} model "
                          f"({exception_line(exc)})") from exc


def check_tensors(model: nn.Module, tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                  tied: Mapping[str, str], where, holder: str,
                  slices: Mapping[str, tuple[str, int]] | None = None) -> None:
    """Every parameter of ``model`` has a tensor, and each tensor (name → shape, dtype) and tied
    alias fits the parameter or buffer it becomes in ``model``, which was built from the same
    config: the same shape, and for a parameter the same dtype. The packer checks a checkpoint
    before writing and ``from_pretrained`` a file before reading (the manifest CRC covers config
    and tensor table alike, so only a buggy or hostile writer gets a file past the first): a
    config that disagrees with its weights can otherwise run and give other tokens (a doubled
    ``hidden_size`` changes the head size attention reshapes by), and one tensor of another dtype
    fails inside a matmul mid-``generate``. ``holder`` names where the tensors are ("the file",
    "the checkpoint") in the message. ``slices`` maps the name of one expert's slice of a fused
    experts parameter ``[E, ...]`` to ``(parameter, expert)``: the parameter is covered when
    experts ``0..E-1`` each have a slice of its shape without the first dimension."""
    kind = type(model).__name__
    slices = slices or {}
    names = {**{n: n for n in tensors if n not in slices}, **tied}
    experts: dict[str, set[int]] = {}
    for name, (param, e) in slices.items():
        experts.setdefault(param, set()).add(e)
    missing = [n for n, _ in model.named_parameters(remove_duplicate=False)
               if n not in names and n not in experts]
    if missing:
        raise UnsupportedModelError(f"{where}: the {kind} its config builds needs tensors {holder} "
                                    f"lacks: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for param, have in experts.items():
        slot = slot_of(model, param)
        if slot is None or slot.dim() < 2:
            raise FormatError(f"{where}: {holder} has experts' slices of {param}, which is not a "
                              f"fused experts parameter of the {kind} its config builds")
        if have != set(range(slot.shape[0])):
            raise FormatError(f"{where}: {holder} has {len(have)} experts' slices of {param} "
                              f"(experts {min(have)}..{max(have)}), but the {kind} its config builds "
                              f"has {slot.shape[0]} experts (the config's expert count disagrees "
                              f"with the weights)")
    checks = [(n, slot_of(model, n), tensors[s]) for n, s in names.items()]
    checks += [(n, slot_of(model, p), tensors[n]) for n, (p, _) in slices.items()]
    for name, slot, (shape, dtype) in checks:
        if slot is None:
            raise FormatError(f"{where}: tensor {name} has no parameter or buffer in the {kind} "
                              f"its config builds")
        want = tuple(slot.shape[1:]) if name in slices else tuple(slot.shape)
        if want != tuple(shape):
            raise FormatError(f"{where}: tensor {name} is {list(shape)} in {holder} but "
                              f"{list(want)} in the {kind} its config builds (the config "
                              f"disagrees with the weights)")
        if isinstance(slot, nn.Parameter) and slot.dtype != dtype:
            raise FormatError(f"{where}: tensor {name} is {_name(dtype)} in {holder}, but the model "
                              f"runs in {_name(slot.dtype)}, the dtype of its linear weights; a "
                              f"model runs in one dtype (convert the checkpoint: "
                              f"model.to(torch.{_name(slot.dtype)}).save_pretrained(...))")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def exception_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` on one line, cut at ``limit`` characters (transformers' messages can
    quote a whole config)."""
    why = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {why[:limit]}{'...' if len(why) > limit else ''}"


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise AttributeError(f"{type(model).__name__} has no submodule {path!r}: {exc}") from None


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding parameter (or buffer) ``name``, and its name there."""
    owner_path, _, leaf = name.rpartition(".")
    return (get_submodule(model, owner_path) if owner_path else model), leaf


def slot_of(model: nn.Module, name: str) -> torch.Tensor | None:
    """The tensor now in parameter (or buffer) ``name`` of ``model``, or None if it has no such one."""
    try:
        owner, leaf = _owner(model, name)
    except AttributeError:
        return None
    return owner._parameters.get(leaf, owner._buffers.get(leaf))


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Make parameter (or buffer) ``name`` of ``model`` be ``value`` itself, without a copy."""
    owner, leaf = _owner(model, name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        raise KeyError(f"{type(owner).__name__} at {name.rpartition('.')[0]!r} has no parameter or "
                       f"buffer {leaf!r}")


def load_tokenizer(ef, tokenizer_dir: str | None = None):
    """The tokenizer: ``tokenizer_dir`` if given, else the one embedded in the .endor file ``ef``,
    else ``None``."""
    import transformers  # noqa: PLC0415 - heavy (~1 s); only when a model is built or tokenized

    if tokenizer_dir:
        return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    if not ef.files:
        return None
    with tempfile.TemporaryDirectory(prefix="endor-tok-") as tmp:
        ef.extract_files(tmp)
        return transformers.AutoTokenizer.from_pretrained(tmp)
