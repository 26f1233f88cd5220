"""Wanda pruning (Sun et al., 2023) one decoder layer at a time, for models larger than memory.

Wanda scores every weight of a linear layer by ``|W_ij| * ||X_j||_2``, where ``||X_j||_2`` is the
L2 norm of input channel ``j`` over all calibration tokens, and zeroes the lowest-scoring fraction
of each output row (:func:`endor_gds.packing.prune.wanda_prune`). The norms must come from the activations
that really reach the layer, i.e. produced by the *already pruned* earlier layers.

This module gets them without ever holding the model:

1. Calibration: a text file tokenized with the checkpoint's own tokenizer, or a ``.ids`` file of
   whitespace-separated token ids, cut into ``samples`` sequences of ``seqlen`` tokens.
2. Capture (the "Catcher" trick of the Wanda reference code): the model's skeleton is built with
   parameters on ``meta`` (:func:`endor_gds.modeling.empty_model`). Each decoder layer's
   ``forward`` is temporarily replaced by a recorder, the resident tensors a module needs are read
   from the checkpoint the first time that module runs (so only the embeddings, never the final
   norm or ``lm_head``), and the model is called on each calibration sequence. The recorders keep
   layer 0's input hidden states and, for every layer, the exact keyword arguments the model
   passes it (attention mask, position ids, rotary position embeddings, cache disabled), so
   models whose layers get different masks (sliding-window layers) are handled too.
3. Layer by layer, in order: the layer's tensors go into the skeleton, the layer runs on the
   calibration activations while forward hooks on its linear modules accumulate ``||X_j||^2`` in
   float64, every linear weight is pruned, the layer runs again with the pruned weights and its
   outputs overwrite the activations in place (they are the next layer's inputs), and the layer's
   parameters go back to ``meta``.

Peak memory on the host (with ``device="cuda"`` the layer's working copy, the activations and
the intermediates are on the GPU instead, the layer as read stays on the host)::

    max(resident tensors used before layer 0 (embeddings),
        one layer's tensors (pruned in place) + pruning scratch)
    + activations: samples x seqlen x hidden x dtype size (one buffer, overwritten in place)
    + one sequence's intermediates inside a layer (attention, MLP, a float64 block of <= 32 MB)
    + the packer's own per-tensor encode buffers

The pruning scratch is bounded by :mod:`endor_gds.packing.prune`'s row blocks (about 40 MB). With the
paper's 128 x 2048 tokens, a Llama-2-70B (hidden 8192, fp16) needs 4 GiB of activations and
1.6 GiB per layer; the measured figures for a 1 GB model are in ``docs/performance.md``.
"""

from __future__ import annotations

import ctypes
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from endor_gds.codec.bitmap import dtype_of
from endor_gds.errors import CalibrationError, UnsupportedModelError
from endor_gds.modeling import empty_model, get_submodule, model_dtype, set_tensor
from endor_gds.packing.checkpoint import TOKENIZER_FILES
from endor_gds.packing.prune import wanda_prune

__all__ = ["CalibrationError", "Calibration", "load_calibration", "WandaPruner"]

# Squared norms are accumulated over blocks of at most this many activation elements, so the
# float64 copy of a block stays at 32 MB whatever the sequence length and layer width.
_NORM_BLOCK_ELEMS = 1 << 22


@dataclass(frozen=True)
class Calibration:
    """``ids``: int64 ``[samples, seqlen]`` token ids, taken from a file of ``tokens_available``."""

    ids: torch.Tensor
    source: str  # file name only: the manifest must not leak the packing machine's paths
    kind: str  # "text" or "ids"
    tokens_available: int

    @property
    def samples(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.ids.shape[1])


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise CalibrationError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _read_ids(path: Path) -> np.ndarray:
    try:
        words = path.read_text(encoding="ascii").split()
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path}: a .ids file holds whitespace-separated decimal token ids, "
                               f"found a non-ASCII byte at offset {exc.start}") from None
    try:
        return np.array([int(w) for w in words], dtype=np.int64)
    except ValueError:
        pos, word = next((i, w) for i, w in enumerate(words) if not w.lstrip("-").isdigit())
        raise CalibrationError(f"{path}: token {pos} is {word[:40]!r}, not an integer token id "
                               f"(a .ids file holds whitespace-separated decimal ids)") from None


def _tokenize(path: Path, folder: Path) -> np.ndarray:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CalibrationError(
            f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...), so {path.name} "
            f"cannot be tokenized; tokenize it elsewhere and pass the ids as a .ids file "
            f"(whitespace-separated integers)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path}: calibration text must be UTF-8 (bad byte at offset "
                               f"{exc.start}); a file of token ids must end in .ids") from None
    import transformers  # noqa: PLC0415 - heavy import, only when text is tokenized

    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"loading the tokenizer in {folder} failed ({exc}); pass token ids in "
                               f"a .ids file instead") from exc
    # No BOS/EOS: the sequences are windows cut from one long stream, as in the Wanda reference.
    # verbose=False: the stream is meant to be longer than the model's maximum length.
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def load_calibration(path, checkpoint_folder, *, samples: int, seqlen: int, vocab_size: int,
                     max_positions: int | None = None) -> Calibration:
    """Read calibration tokens from ``path`` and cut ``samples`` windows of ``seqlen`` tokens.

    ``path`` ending in ``.ids``: whitespace-separated token ids. Anything else: UTF-8 text,
    tokenized without special tokens by the tokenizer in ``checkpoint_folder``. The file must hold
    at least ``samples * seqlen`` tokens; the windows do not overlap and are spread evenly over
    the whole file (deterministic: no random sampling, no seed).
    """
    samples = _positive_int("calib_samples", samples)
    seqlen = _positive_int("calib_seqlen", seqlen)
    if max_positions is not None and seqlen > max_positions:
        raise CalibrationError(f"calib_seqlen {seqlen} exceeds the model's max_position_embeddings "
                               f"{max_positions}")
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist (or is not a file)")
    kind = "ids" if path.suffix == ".ids" else "text"
    stream = _read_ids(path) if kind == "ids" else _tokenize(path, Path(checkpoint_folder))
    bad = np.flatnonzero((stream < 0) | (stream >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise CalibrationError(f"{path}: token id {int(stream[i])} at position {i} is outside the "
                               f"model's vocabulary (vocab_size {vocab_size}); {bad.size} ids are")
    n, need = int(stream.size), samples * seqlen
    if n < need:
        raise CalibrationError(
            f"{path} holds {n} tokens, too short for {samples} samples x {seqlen} tokens = {need}; "
            f"give more text or lower calib_samples / calib_seqlen (--calib-samples/--calib-seqlen)")
    # Evenly spaced starts: the gap (n - seqlen) / (samples - 1) is >= seqlen when n >= need.
    starts = [k * (n - seqlen) // (samples - 1) for k in range(samples)] if samples > 1 else [0]
    ids = torch.from_numpy(np.stack([stream[s:s + seqlen] for s in starts]))
    return Calibration(ids=ids, source=path.name, kind=kind, tokens_available=n)


class _Captured(Exception):
    """Raised by the last layer's recorder: everything needed is recorded, stop the model there."""


def _accumulate_sq_norm(acc: torch.Tensor, module, args, kwargs, output) -> None:
    """Forward hook: ``acc[j] += sum over tokens of x[..., j]^2`` for the module's input ``x``."""
    x = args[0] if args else kwargs["input"]
    x = x.detach().reshape(-1, x.shape[-1])
    rows = max(1, _NORM_BLOCK_ELEMS // max(1, x.shape[1]))
    for block in x.split(rows):
        acc += block.double().square().sum(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):  # musl, macOS: nothing to call
        return None


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; nothing elsewhere).

    Once glibc's dynamic mmap threshold has grown (up to 32 MiB), freed tensors of a few MB stay
    in its heap, fragmented, and the resident set creeps up layer after layer. Measured on the
    1.1 GB model of bench/bench_wanda_rss.py (4 x 256 tokens): RSS after layer 0 / 6 was 512 / 707
    MiB without trimming, 455 / 455 MiB with it, and the peak 732 MiB against 576 MiB.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _layer_output(out):
    # transformers 5 decoder layers return the hidden states; 4.x returned (hidden, ...).
    return out[0] if isinstance(out, tuple) else out


def _device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise CalibrationError(f"calib_device {device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CalibrationError(f"calib_device {device!r}: this torch ({torch.__version__}) sees no "
                               f"CUDA GPU; use calib_device='cpu'")
    return dev


class WandaPruner:
    """Prunes decoder layers 0, 1, 2, ... in order; the packer's layer-pruner protocol.

    ``pruner(index, tensors)`` takes layer ``index``'s checkpoint tensors (full names → CPU
    tensors), prunes every linear weight of the recipe with Wanda and returns the same dict (on a
    CPU the weights are pruned in place: no copy of a weight is ever made); norms, biases and
    other tensors are returned untouched. ``summary()`` is what the manifest
    records under ``prune``.
    """

    def __init__(self, ckpt, recipe, plan, calib: Calibration, sparsity: float, *,
                 device="cpu", progress: bool = True):
        self.ckpt, self.recipe, self.plan, self.calib = ckpt, recipe, plan, calib
        self.sparsity = float(sparsity)
        self.device = _device(device)
        self.progress = progress
        self.dtype = self._compute_dtype()
        self.model = empty_model(ckpt.config, self.dtype)
        for module in self.model.modules():  # buffers (rotary inv_freq) are real; params stay meta
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.to(self.device)
        self.layers = get_submodule(self.model, recipe.layers)  # num_hidden_layers long, as the plan
        self._inputs: torch.Tensor | None = None  # [samples, seqlen, hidden]: next layer's inputs
        self._layer_call: list = []  # per layer: (extra positional args, kwargs) from the model
        self._next = 0
        self._sample = 0  # the calibration sequence being captured
        self.seconds = 0.0

    def _compute_dtype(self) -> torch.dtype:
        """The dtype the model runs in at inference (the packer has checked it is the only one)."""
        names = [n for layer in self.plan.layers for n in layer]
        return model_dtype(self.recipe, ((n, dtype_of(self.ckpt.tensors[n].dtype).torch) for n in names))

    def _put(self, name: str, value: torch.Tensor) -> None:
        try:
            set_tensor(self.model, name, value)
        except (AttributeError, KeyError) as exc:
            raise UnsupportedModelError(f"checkpoint tensor {name} has no place in "
                                        f"{type(self.model).__name__}: {exc}") from None

    def _to_meta(self, name: str, like: torch.Tensor) -> None:
        self._put(name, torch.empty(like.shape, dtype=self.dtype, device="meta"))

    # -- capture ------------------------------------------------------------------------------

    def _record(self, index: int, *args, **kwargs):
        """Stands in for decoder layer ``index``'s forward during capture; returns its input."""
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if index == 0:
            if self._inputs is None:  # layer 0's width, which is not the embeddings' (OPT project_in)
                self._inputs = torch.empty(self.calib.samples, *hidden.shape[1:], dtype=hidden.dtype,
                                           device=self.device)
            self._inputs[self._sample] = hidden[0]
        if len(self._layer_call) == index:  # first sequence: keep what the model passes
            self._layer_call.append((args[1:], kwargs))
        if index == len(self.layers) - 1:
            raise _Captured
        return hidden

    def capture(self) -> None:
        """Run the calibration sequences up to layer 0 (module doc, step 2).

        :func:`make_pruner` calls this before the packer reads any layer, so the embeddings and a
        layer's tensors are never in memory together; ``pruner(0, ...)`` calls it if nobody has.
        """
        t0 = time.perf_counter()
        with torch.no_grad():
            self._capture()
        _trim_heap()  # the embeddings
        self.seconds += time.perf_counter() - t0

    def _capture(self) -> None:
        """Layer 0's input hidden states for every sequence and every layer's call arguments."""
        resident = set(self.plan.resident)
        loaded: dict[str, torch.Tensor] = {}

        def load_residents(module_name, module, args):
            # Only modules that actually run before layer 0 get here: the embeddings, never lm_head.
            for pname, p in module._parameters.items():
                full = f"{module_name}.{pname}" if module_name else pname
                stored = self.plan.tied.get(full, full)
                if stored in resident and p is not None and p.is_meta:
                    t = self.ckpt.read(stored).to(device=self.device, dtype=self.dtype)
                    self._put(full, t)
                    loaded[full] = t

        hooks = []
        for module_name, module in self.model.named_modules():
            if any(self.plan.tied.get(f"{module_name}.{p}", f"{module_name}.{p}") in resident
                   for p in module._parameters):
                hooks.append(module.register_forward_pre_hook(
                    functools.partial(load_residents, module_name)))
        for i, layer in enumerate(self.layers):
            layer.forward = functools.partial(self._record, i)  # instance attribute shadows the class's
        ids = self.calib.ids
        bar = tqdm(total=len(ids), desc="wanda: embed calibration", unit="seq", leave=False,
                   disable=not self.progress)
        try:
            for j in range(len(ids)):
                self._sample = j
                try:
                    self.model(input_ids=ids[j:j + 1].to(self.device), use_cache=False)
                except _Captured:
                    pass
                except (RuntimeError, NotImplementedError) as exc:
                    raise UnsupportedModelError(
                        f"running {type(self.model).__name__} with its layers stubbed out failed: "
                        f"{exc}. A tensor used before layer 0 may be missing from the checkpoint or "
                        f"the recipe's resident list ({self.recipe.path or self.recipe.family})") from exc
                if len(self._layer_call) != len(self.layers):
                    raise UnsupportedModelError(
                        f"{type(self.model).__name__}'s forward called {len(self._layer_call)} of the "
                        f"{len(self.layers)} layers of {self.recipe.layers}; Wanda needs each layer's "
                        f"arguments")
                bar.update()
        finally:
            bar.close()
            for layer in self.layers:
                del layer.forward
            for h in hooks:
                h.remove()
            for name, t in loaded.items():  # the embeddings are not needed again
                self._to_meta(name, t)

    # -- one layer ----------------------------------------------------------------------------

    def _run(self, layer: nn.Module, index: int, j: int) -> torch.Tensor:
        args, kwargs = self._layer_call[index]
        return _layer_output(layer(self._inputs[j:j + 1], *args, **kwargs))

    def __call__(self, index: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if index != self._next:
            raise ValueError(f"Wanda prunes layers in order: expected layer {self._next}, got {index}")
        if self._inputs is None:
            self.capture()
        t0 = time.perf_counter()
        _trim_heap()  # the previous layer's tensors, written and freed by the packer since
        with torch.no_grad():
            self._prune_layer(index, tensors)
        self._next += 1
        self.seconds += time.perf_counter() - t0
        return tensors

    def _prune_layer(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        layer, samples = self.layers[index], self.calib.samples
        prefix = f"{self.recipe.layers}.{index}."
        for name, t in tensors.items():
            self._put(name, t.to(device=self.device, dtype=self.dtype))
        missing = [n for n, p in layer.named_parameters() if p.is_meta]
        if missing:
            raise UnsupportedModelError(f"layer {index} has no checkpoint tensor for "
                                        f"{', '.join(prefix + n for n in missing)}")
        bar = tqdm(total=2 * samples, desc=f"wanda layer {index + 1}/{len(self.layers)}",
                   unit="seq", leave=False, disable=not self.progress)
        try:
            sq_norms, hooks = {}, []
            for lin in self.recipe.linear:
                module = layer.get_submodule(lin)
                acc = torch.zeros(module.weight.shape[1], dtype=torch.float64, device=self.device)
                sq_norms[lin] = acc
                hooks.append(module.register_forward_hook(
                    functools.partial(_accumulate_sq_norm, acc), with_kwargs=True))
            try:
                for j in range(samples):  # statistics with the layer's unpruned weights
                    self._run(layer, index, j)
                    bar.update()
            finally:
                for h in hooks:
                    h.remove()
            _trim_heap()  # the passes' intermediates
            for lin in self.recipe.linear:
                name = f"{prefix}{lin}.weight"
                # In place: the weight was read for us alone, and a copy of the largest linear
                # would add to the peak. On a GPU the device copy is pruned and brought back.
                pruned = wanda_prune(tensors[name].to(self.device), sq_norms[lin].sqrt(),
                                     self.sparsity, inplace=True)
                self._put(name, pruned.to(self.dtype))
                tensors[name] = pruned.to("cpu")
                _trim_heap()  # the pruning scratch
            for j in range(samples):  # the pruned layer's outputs are the next layer's inputs
                self._inputs[j] = self._run(layer, index, j)[0]
                bar.update()
        finally:
            bar.close()
            for name, t in tensors.items():
                self._to_meta(name, t)

    def summary(self) -> dict:
        """Calibration statistics, recorded in the manifest under ``prune``."""
        c = self.calib
        return {"calibration": {
            "source": c.source, "kind": c.kind, "samples": c.samples, "seqlen": c.seqlen,
            "tokens": c.samples * c.seqlen, "tokens_available": c.tokens_available,
            "seconds": round(self.seconds, 3), "device": str(self.device),
            "compute_dtype": str(self.dtype).removeprefix("torch."), "norm_dtype": "float64",
        }}


def make_pruner(ckpt, recipe, plan, *, calib, samples: int, seqlen: int, sparsity: float,
                device="cpu", progress: bool = True) -> WandaPruner:
    """Read and check the calibration input, build the pruner and capture layer 0's inputs, all
    before the packer writes anything: a bad file or model fails fast, and the embeddings are
    freed before any layer is read."""
    vocab = ckpt.config.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise UnsupportedModelError(f"config.json has no valid vocab_size (got {vocab!r}); Wanda "
                                    f"needs it to check the calibration token ids")
    calibration = load_calibration(calib, ckpt.folder, samples=samples, seqlen=seqlen,
                                   vocab_size=vocab,
                                   max_positions=ckpt.config.get("max_position_embeddings"))
    pruner = WandaPruner(ckpt, recipe, plan, calibration, sparsity, device=device, progress=progress)
    pruner.capture()
    return pruner
