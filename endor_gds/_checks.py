"""Typed checks of untrusted JSON (the manifest, safetensors headers, configs): one place for all.

Each check returns the value when it has the expected type and range, and otherwise raises a
:class:`~endor_gds.errors.FormatError` that starts with the file's path and names the field, the
allowed range and (summarised, never ``repr`` of a container) the value found.
"""

from __future__ import annotations

import math
import re

from endor_gds.errors import FormatError

__all__ = ["MAX_NAME", "fail", "show", "plain_name", "check_int", "check_str", "check_dict",
           "check_list", "check_number", "check_fraction", "check_choice", "check_generation_config"]

MAX_NAME = 1024
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def fail(path, msg: str) -> FormatError:
    return FormatError(f"{path}: {msg}")


def show(value, limit: int = 80) -> str:
    """A short description of a manifest value for an error message.

    Never ``repr`` of a container: a hostile manifest can nest lists a thousand deep (``repr``
    would overflow the stack) or hold megabytes (the message would too).
    """
    if isinstance(value, (list, dict)):
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(value)} characters)"


def plain_name(name) -> bool:
    """A file name that stays inside any folder it is joined to: no '/', '..', NUL or hidden."""
    return isinstance(name, str) and 0 < len(name) <= 128 and set(name) <= _NAME_OK \
        and not name.startswith(".")


def check_int(path, where: str, value, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise fail(path, f"{where} must be an integer in [{lo}, {hi}], got {show(value)}")
    return value


def check_str(path, where: str, value, limit: int = MAX_NAME) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise fail(path, f"{where} must be a non-empty string of at most {limit} characters, "
                          f"got {show(value)}")
    # Names end up in error messages and `endor-gds inspect` output: no terminal escapes there.
    if _CONTROL.search(value):
        raise fail(path, f"{where} {show(value)} contains a control character")
    return value


def check_dict(path, where: str, value) -> dict:
    if not isinstance(value, dict):
        raise fail(path, f"{where} must be an object, got {type(value).__name__}")
    return value


def check_list(path, where: str, value, limit: int) -> list:
    if not isinstance(value, list) or len(value) > limit:
        raise fail(path, f"{where} must be a list of at most {limit} items, got {show(value)}")
    return value


def check_number(path, where: str, value, lo: float = -math.inf, hi: float = math.inf) -> float:
    """A JSON number (not a bool) in [lo, hi]; NaN fails the comparison, so it is refused too."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        span = "" if (lo, hi) == (-math.inf, math.inf) else f" in [{lo:g}, {hi:g}]"
        raise fail(path, f"{where} must be a number{span}, got {show(value)}")
    return float(value)


def check_fraction(path, where: str, value) -> float:
    return check_number(path, where, value, 0, 1)


# The generation_config fields that generate() computes with, by the type it needs. transformers'
# GenerationConfig.from_dict takes {"max_length": "abc"} or {"temperature": "hot"} as they are,
# and generate() then fails with a TypeError deep inside a logits processor: refused here instead.
# Types only, and int32 ranges: values that real checkpoints carry (pad_token_id -1 in some
# converted Llama folders) must still pack and open.
_GEN_INTS = ("max_length", "max_new_tokens", "min_length", "min_new_tokens", "num_beams",
             "num_beam_groups", "num_return_sequences", "top_k", "no_repeat_ngram_size")
_GEN_NUMBERS = ("temperature", "top_p", "typical_p", "min_p", "repetition_penalty",
                "length_penalty", "epsilon_cutoff", "eta_cutoff", "diversity_penalty")
_GEN_BOOLS = ("do_sample", "use_cache", "output_scores", "return_dict_in_generate")
_GEN_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
_INT32_MAX = (1 << 31) - 1


def check_generation_config(path, gen) -> dict:
    """``gen`` if it is an object whose typed fields have their types (None means unset, as in
    transformers); the packer checks a checkpoint's generation_config.json with it before
    writing anything, so that no pack produces a file its reader refuses."""
    gen = check_dict(path, "generation_config", gen)
    for key in _GEN_INTS:
        if gen.get(key) is not None:
            check_int(path, f"generation_config.{key}", gen[key], 0, _INT32_MAX)
    for key in _GEN_NUMBERS:
        if gen.get(key) is not None:
            check_number(path, f"generation_config.{key}", gen[key])
    for key in _GEN_BOOLS:
        if gen.get(key) is not None and not isinstance(gen[key], bool):
            raise fail(path, f"generation_config.{key} must be true or false, got {show(gen[key])}")
    for key in _GEN_TOKEN_IDS:  # one id, or a list of them (several end-of-sequence tokens)
        value, where = gen.get(key), f"generation_config.{key}"
        if value is None:
            continue
        for v in check_list(path, where, value, 64) if isinstance(value, list) else [value]:
            check_int(path, where, v, -_INT32_MAX - 1, _INT32_MAX)
    return gen


def check_choice(path, where: str, value, allowed) -> str:
    """``value`` if it is one of the strings ``allowed`` (checked as a string first: a list or
    dict from a hostile manifest must not reach a ``dict`` lookup, which would raise TypeError)."""
    if not isinstance(value, str) or value not in allowed:
        raise fail(path, f"{where} must be one of {', '.join(map(repr, allowed))}, got {show(value)}")
    return value
