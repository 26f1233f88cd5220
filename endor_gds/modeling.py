"""Build a transformers model without materialising its weights, and put tensors into it.

The runtime and the Wanda pruner both need the model's real module classes (so ``generate()``,
the KV cache and attention masks behave as users know them) but never the whole model's weights
in memory. Parameters are therefore created on the ``meta`` device; buffers (rotary
``inv_freq`` and the like, computed in ``__init__``) are created for real, because nothing else
would compute them. transformers' ``no_init_weights`` skips the random init, so each parameter
costs one uninitialised allocation that is immediately replaced by a meta tensor.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["empty_model", "params_on_meta", "set_tensor", "get_submodule", "slot_of"]


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
    from transformers.initialization import no_init_weights  # noqa: PLC0415

    cfg = transformers.AutoConfig.for_model(**config)
    with no_init_weights(), params_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


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
