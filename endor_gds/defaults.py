"""Run-time tunables, in one place.

Each option has a documented default, an ``ENDOR_*`` environment variable that overrides it when
the process starts, and can be changed from Python either globally or for a ``with`` block::

    endor_gds.defaults.get("io_threads")
    endor_gds.defaults.set("io_threads", 8)            # global
    with endor_gds.defaults.set(io="posix-buffered"):   # restored on exit
        ...

An unknown option name is a ``KeyError``; a bad value (from the environment too) is a
``ValueError`` naming the option and the accepted values. The table in ``docs/design.md`` is
checked against this module by the test suite.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from endor_gds.errors import ArgumentError

__all__ = ["get", "set", "options", "Option", "describe", "parse_bytes", "format_bytes"]

IO_MODES = ("auto", "kvikio", "posix-direct", "posix-buffered")
COMPAT_MODES = ("auto", "on", "off")


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (1/0, true/false, yes/no, on/off), got {text!r}")


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(text):
        value = str(text).strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


def format_bytes(n: float, binary: bool = True) -> str:
    """``2361393152`` → ``2.20 GiB`` (``binary=False``: ``2.36 GB``, as tqdm and disk tools count):
    the inverse of :func:`parse_bytes`, for people to read."""
    step, units = (1024, ("B", "KiB", "MiB", "GiB", "TiB")) if binary else (1000, ("B", "kB", "MB", "GB", "TB"))
    for unit in units:
        if abs(n) < step or unit == units[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= step
    return f"{n}"  # pragma: no cover


def parse_bytes(text) -> int:
    """``4MiB``, ``1GiB``, ``4096``, ``1.5GB`` → bytes (binary suffixes are powers of 1024)."""
    if isinstance(text, bool) or not isinstance(text, (int, float, str)):
        raise ArgumentError(f"cannot read a byte size from {text!r} (try 4096, '4MiB', '1GiB')")
    if isinstance(text, int):
        value = text
    else:
        s = str(text).strip().replace("_", "")
        units = {
            "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
            "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
            "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "b": 1,
        }
        low = s.lower()
        for suffix in sorted(units, key=len, reverse=True):
            if low.endswith(suffix):
                number, scale = low[: -len(suffix)].strip(), units[suffix]
                break
        else:
            number, scale = low, 1
        try:
            value = int(float(number) * scale)
        except (ValueError, OverflowError):  # "twenty", "nan", "inf"
            raise ArgumentError(f"cannot read a byte size from {text!r} (try 4096, '4MiB', '1GiB')") from None
    if value < 0:
        raise ArgumentError(f"a byte size cannot be negative, got {text!r}")
    return value


def _positive_int(text) -> int:
    value = int(str(text).strip()) if not isinstance(text, int) else text
    if value < 1:
        raise ValueError(f"expected an integer >= 1, got {text!r}")
    return value


def _nonnegative_int(text) -> int:
    value = int(str(text).strip()) if not isinstance(text, int) else text
    if value < 0:
        raise ValueError(f"expected an integer >= 0, got {text!r}")
    return value


def _fused_rows(text) -> int | str:
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        value = _positive_int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 16:  # MAX_ROWS of endor_gds.decode.fused, an accumulator per row
        raise ValueError(f"expected 'auto' or an integer from 1 to 16, got {text!r}")
    return value


def _positive_bytes(text) -> int:
    value = parse_bytes(text)
    if value < 4096 or value % 4096:
        raise ValueError(f"expected a positive multiple of 4096 bytes, got {text!r}")
    return value


@dataclass(frozen=True)
class Option:
    name: str
    env: str
    default: Any
    parse: Callable[[Any], Any]
    doc: str


_OPTIONS: dict[str, Option] = {
    o.name: o
    for o in [
        Option("io", "ENDOR_IO", "auto", _choice(IO_MODES),
               "reader backend: auto picks kvikio for GPU destinations when the file gets GDS, "
               "else posix-direct (pinned memory + async copy on a GPU), else posix-buffered"),
        Option("compat_mode", "ENDOR_COMPAT_MODE", "auto", _choice(COMPAT_MODES),
               "KvikIO compat mode: auto lets KvikIO choose GDS or its POSIX fallback; on forces "
               "the fallback, off requires GDS"),
        Option("io_threads", "ENDOR_IO_THREADS", 4, _positive_int,
               "threads that split one extent read into chunks (posix-direct, posix-buffered)"),
        Option("chunk_bytes", "ENDOR_CHUNK_BYTES", 4 << 20, _positive_bytes,
               "bytes per read request; a multiple of 4096"),
        Option("io_retries", "ENDOR_IO_RETRIES", 3, _nonnegative_int,
               "times a failed read (EIO) is retried before ReadError"),
        Option("decode_threads", "ENDOR_DECODE_THREADS", 0, _nonnegative_int,
               "threads of the CPU decoder; 0 means one per CPU core"),
        Option("prefetch_depth", "ENDOR_PREFETCH_DEPTH", 2, _positive_int,
               "buffer sets of the streaming pipeline: 1 = no overlap, 2 = double buffering"),
        Option("verify_reads", "ENDOR_VERIFY_READS", True, _bool,
               "check every segment's CRC-32C as it is read: streamed extents before their decode, "
               "the RAM tier and resident tensors once at load (0 turns it off)"),
        Option("fused", "ENDOR_FUSED", True, _bool,
               "CPU: multiply streamed linear weights straight from bitmap + values in steps of at "
               "most fused_max_rows rows (the dense weights are never written; fp32 sums in another "
               "order, so outputs match the in-memory model to rounding); 0 decodes every step and "
               "is bit-identical to the in-memory model"),
        Option("fused_max_rows", "ENDOR_FUSED_MAX_ROWS", "auto", _fused_rows,
               "largest batch x sequence a step may have and still take the fused product (1-16); "
               "larger steps (a prompt's prefill) decode to dense and use torch's matmul. auto: 16 "
               "for fp16, 8 for fp32, 1 for bf16 (where torch's own bf16 product is fast)"),
        Option("tp_timeout", "ENDOR_TP_TIMEOUT", 120, _positive_int,
               "seconds a tensor-parallel rank waits in a collective (the process group endor-gds "
               "starts under torchrun) before it fails with TensorParallelError: a rank that died "
               "or hangs stops the others within it"),
        Option("cache_dir", "ENDOR_CACHE_DIR", "~/.cache/endor_gds", str,
               "where the demo and benchmarks keep the random-init checkpoints they build"),
    ]
}


def _from_env(option: Option):
    raw = os.environ.get(option.env)
    if raw is None:
        return option.default
    try:
        return option.parse(raw)
    except ValueError as exc:
        raise ArgumentError(f"environment variable {option.env}: {exc}") from None


_values: dict[str, Any] = {name: _from_env(o) for name, o in _OPTIONS.items()}


def options() -> dict[str, Option]:
    """All options by name (read-only view of the table)."""
    return dict(_OPTIONS)


def get(name: str):
    """Current value of option ``name`` (``KeyError`` when there is no such option)."""
    if name not in _OPTIONS:
        raise KeyError(f"unknown endor_gds option {name!r}; known: {', '.join(_OPTIONS)}")
    return _values[name]


class _Restore:
    """Returned by :func:`set`: the change is already made; leaving a ``with`` block undoes it."""

    def __init__(self, old: dict[str, Any]):
        self._old = old

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _values.update(self._old)
        return False


def set(*args, **kwargs) -> _Restore:  # noqa: A001 - mirrors kvikio.defaults.set
    """Set options: ``set("io_threads", 8)``, ``set({"io": "kvikio"})`` or ``set(io_threads=8)``.

    All values are validated before any is applied, so a bad value changes nothing.
    """
    if len(args) == 2:
        changes = {args[0]: args[1]}
    elif len(args) == 1 and isinstance(args[0], dict):
        changes = dict(args[0])
    elif args:
        raise TypeError("set() takes (name, value), a dict, or keyword arguments")
    else:
        changes = {}
    changes.update(kwargs)
    parsed = {}
    for name, value in changes.items():
        if name not in _OPTIONS:
            raise KeyError(f"unknown endor_gds option {name!r}; known: {', '.join(_OPTIONS)}")
        try:
            parsed[name] = _OPTIONS[name].parse(value)
        except ValueError as exc:
            raise ArgumentError(f"option {name!r}: {exc}") from None
    old = {name: _values[name] for name in parsed}
    _values.update(parsed)
    return _Restore(old)


def describe() -> str:
    """The options as a Markdown table (the same table docs/design.md carries)."""
    rows = ["| option | environment variable | default | meaning |", "|---|---|---|---|"]
    for o in _OPTIONS.values():
        rows.append(f"| `{o.name}` | `{o.env}` | `{o.default!r}` | {o.doc} |")
    return "\n".join(rows)
