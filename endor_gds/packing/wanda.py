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

Mixture-of-experts layers. transformers 5 holds a layer's experts as one module with fused 3-D
parameters (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``), not as linear modules, and each
expert sees only the tokens the router sends it. The packer hands the pruner every expert's slices
with the layer; they are stacked into the fused parameters (on a CPU each slice then becomes a
view of them, so the experts are held once). During the statistics pass a forward pre-hook on the
experts module (:class:`_ExpertNorms`) takes ``hidden_states`` and ``top_k_index`` and, for each
expert ``e``, adds in float64 the squares of the hidden states of the tokens routed to ``e``
(``gate_up_proj[e]``'s input) and of ``act_fn(gate) * up`` for those tokens (``down_proj[e]``'s
input), computed as the eager experts forward computes it: the same tokens in the same order, the
module's own parameters and ``act_fn``, the model's dtype. Each expert's slices are then pruned by
:func:`~endor_gds.packing.prune.wanda_prune` with its own norms. The experts run transformers' eager
forward, as the streaming runtime runs them, so the next layer's inputs are what the streamed model
computes. An expert no calibration token was routed to has no activation statistics: it is
magnitude-pruned (Wanda with every input norm 1, i.e. equal weight for every channel, the only
prior without data), a ``RuntimeWarning`` names it and the manifest lists it under
``prune.unrouted_experts`` (``layer.<i>.expert.<e>``); more calibration tokens route to more
experts. Routers are not linear weights of the recipe and stay unpruned (as with magnitude); shared
experts and dense MLP layers are linear modules, pruned as any other. Experts modules of another
layout (transposed, with biases, without a gate, interleaved gate/up) are refused by name.

Peak memory on the host (with ``device="cuda"`` the layer's working copy, the activations and
the intermediates are on the GPU instead, the layer as read stays on the host)::

    max(resident tensors used before layer 0 (embeddings),
        one layer's tensors, all its experts included (pruned in place) + pruning scratch)
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
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from endor_gds.codec.bitmap import dtype_of
from endor_gds.errors import CalibrationError, UnsupportedModelError
from endor_gds.modeling import empty_model, get_submodule, model_dtype, set_tensor, slot_of
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


def _add_sq(acc: torch.Tensor, x: torch.Tensor) -> None:
    """``acc[j] += sum over rows of x[..., j]^2``, in float64, a block of rows at a time."""
    x = x.detach().reshape(-1, x.shape[-1])
    rows = max(1, _NORM_BLOCK_ELEMS // max(1, x.shape[1]))
    for block in x.split(rows):
        acc += block.double().square().sum(0)


def _accumulate_sq_norm(acc: torch.Tensor, module, args, kwargs, output) -> None:
    """Forward hook: ``acc[j] += sum over tokens of x[..., j]^2`` for the module's input ``x``."""
    _add_sq(acc, args[0] if args else kwargs["input"])


# What the eager experts forward of transformers 5 (``@use_experts_implementation``) must look
# like for _ExpertNorms to compute its inputs: ``gate, up = linear(x, gate_up_proj[e]).chunk(2)``,
# ``down_proj[e]`` applied to ``act_fn(gate) * up``, no biases, no norm after each expert. These
# are the decorator's defaults: a flag a transformers version does not set is a feature it lacks.
_EXPERTS_LAYOUT = {"is_transposed": False, "has_bias": False, "has_gate": True,
                   "is_concatenated": True, "has_post_expert_norm": False}
_EXPERT_PARAMS = ("gate_up_proj", "down_proj")


class _ExpertNorms:
    """Forward pre-hook on one layer's experts module: per-expert squared input norms, float64.

    The module holds ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` and is called as
    ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``. For every expert
    ``e`` and every call, over the tokens routed to ``e``:

    * ``sq["gate_up_proj"][e, j] += sum x_j^2``, ``x`` the hidden state (``[E, H]``);
    * ``sq["down_proj"][e, j] += sum m_j^2``, ``m = act_fn(gate) * up`` with
      ``gate, up = linear(x, gate_up_proj[e]).chunk(2)`` (``[E, I]``);
    * ``tokens[e] += number of those tokens`` (int64, on the CPU).

    The tokens are taken in the eager forward's order (``torch.where`` over the ``[k, T]`` mask of
    expert ``e``: the tokens that rank ``e`` first, then second, ...) and ``m`` with the module's own
    parameters and ``act_fn`` in the model's dtype, so ``m`` is bit for bit what ``down_proj[e]``
    receives. An index outside ``0..E-1`` (the forward's padding index ``E``) routes nowhere.
    """

    def __init__(self, layer: int, module: nn.Module, device: torch.device):
        experts, _, hidden = module.gate_up_proj.shape
        self.layer = layer
        self.sq = {"gate_up_proj": torch.zeros(experts, hidden, dtype=torch.float64, device=device),
                   "down_proj": torch.zeros(experts, module.down_proj.shape[2], dtype=torch.float64,
                                            device=device)}
        self.tokens = torch.zeros(experts, dtype=torch.int64)

    def __repr__(self) -> str:
        routed = int((self.tokens > 0).sum())
        return (f"_ExpertNorms(layer={self.layer}, experts={len(self.tokens)}, routed={routed}, "
                f"tokens={int(self.tokens.sum())})")

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        top_k = args[1] if len(args) > 1 else kwargs.get("top_k_index")
        if not isinstance(top_k, torch.Tensor):
            raise UnsupportedModelError(f"layer {self.layer}: the experts module {type(module).__name__} "
                                        f"was called without top_k_index; Wanda needs the routing")
        hidden = hidden.reshape(-1, hidden.shape[-1])
        by_rank = top_k.reshape(hidden.shape[0], -1).T  # [k, T]: the forward's expert_mask[e] is (by_rank == e)
        count = len(self.tokens)
        for e in torch.unique(top_k).tolist():
            if not 0 <= e < count:
                continue
            tokens = torch.where(by_rank == e)[1]
            x = hidden[tokens]
            gate, up = nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
            _add_sq(self.sq["gate_up_proj"][e], x)
            _add_sq(self.sq["down_proj"][e], module.act_fn(gate) * up)
            self.tokens[e] += tokens.numel()


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
    tensors; a mixture-of-experts layer's expert slices included, named as in the file:
    ``<layer>.mlp.experts.<e>.gate_up_proj``), prunes every linear weight of the recipe present in
    the layer and every expert slice with Wanda and returns the same dict (on a CPU the weights are
    pruned in place: no copy of a weight is ever made; an expert slice comes back as a view of its
    fused parameter); norms, biases, routers and other tensors are returned untouched.
    ``summary()`` is what the manifest records under ``prune``.
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
        self._check_experts()
        self.unrouted: list[str] = []  # "layer.<i>.expert.<e>": no calibration token, magnitude-pruned
        self._inputs: torch.Tensor | None = None  # [samples, seqlen, hidden]: next layer's inputs
        self._layer_call: list = []  # per layer: (extra positional args, kwargs) from the model
        self._next = 0
        self._sample = 0  # the calibration sequence being captured
        self.seconds = 0.0

    def _compute_dtype(self) -> torch.dtype:
        """The dtype the model runs in at inference (the packer has checked it is the only one)."""
        names = [n for layer in self.plan.layers for n in layer]
        return model_dtype(self.recipe, ((n, dtype_of(self.ckpt.tensors[self.plan.sources_of(n)[0]].dtype).torch)
                                         for n in names))  # sources: a tensor renamed (Mixtral's block_sparse_moe)

    def _check_experts(self) -> None:
        """Every experts module of the plan's MoE layers has the layout :class:`_ExpertNorms`
        computes the inputs of, and runs transformers' eager experts forward (as the streaming
        runtime runs it); refused by name before anything is read or written otherwise."""
        if not self.plan.experts:
            return
        experts = self.recipe.experts
        if tuple(experts.params) != _EXPERT_PARAMS:
            raise UnsupportedModelError(
                f"prune='wanda' computes expert inputs for fused experts parameters "
                f"{', '.join(_EXPERT_PARAMS)}; the {self.recipe.family} recipe has "
                f"{', '.join(experts.params)}; use prune='magnitude'")
        for i in self.plan.experts:
            try:
                module = self.layers[i].get_submodule(experts.module)
            except AttributeError:
                raise UnsupportedModelError(f"layer {i} has expert tensors but no {experts.module} "
                                            f"module in {type(self.model).__name__}") from None
            wrong = [f"{k}={getattr(module, k)!r}" for k, want in _EXPERTS_LAYOUT.items()
                     if getattr(module, k, want) is not want]
            gate_up, down = (getattr(module, p, None) for p in _EXPERT_PARAMS)
            if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3 \
                    or gate_up.shape[0] != down.shape[0] or gate_up.shape[1] != 2 * down.shape[2] \
                    or gate_up.shape[2] != down.shape[1]:
                wrong.append("parameters not gate_up_proj [E, 2I, H] and down_proj [E, H, I]")
            if not callable(getattr(module, "act_fn", None)):
                wrong.append("no act_fn")
            if wrong:
                raise UnsupportedModelError(
                    f"prune='wanda': layer {i}'s experts module {type(module).__name__} "
                    f"({experts.module}) is not the layout whose expert inputs Wanda computes "
                    f"(gate_up_proj [E, 2I, H] with the gate rows first, down_proj [E, H, I], "
                    f"act_fn(gate) * up, no biases): {', '.join(wrong)}; use prune='magnitude'")
            if getattr(module, "config", None) is not None:  # the forward _ExpertNorms mirrors
                module.config._experts_implementation = "eager"

    def _put(self, name: str, value: torch.Tensor) -> None:
        try:
            set_tensor(self.model, name, value)
        except (AttributeError, KeyError) as exc:
            raise UnsupportedModelError(f"checkpoint tensor {name} has no place in "
                                        f"{type(self.model).__name__}: {exc}") from None

    def _to_meta(self, name: str, like: torch.Tensor) -> None:
        self._put(name, torch.empty(like.shape, dtype=like.dtype, device="meta"))

    def _slot_dtype(self, name: str) -> torch.dtype:
        """The dtype the model holds ``name`` in: the model's, except where a module fixes its own
        (DeepSeek-V3's router weight and score bias are float32 in a bf16 model, and transformers
        loads them so): cast to the model's dtype, the router would route other tokens."""
        slot = slot_of(self.model, name)
        return slot.dtype if slot is not None and slot.is_floating_point() else self.dtype

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
        linears = [lin for lin in (*self.recipe.linear, *self.recipe.linear_optional)
                   if f"{prefix}{lin}.weight" in tensors]  # optional ones: where the layer has them
        slices = self._expert_slices(index, tensors)
        sliced = {name for names in slices.values() for name in names}
        for name, t in tensors.items():
            if name not in sliced:
                self._put(name, t.to(device=self.device, dtype=self._slot_dtype(name)))
        fused = {param: self._fuse(param, names, tensors) for param, names in slices.items()}
        missing = [n for n, p in layer.named_parameters() if p.is_meta]
        if missing:
            raise UnsupportedModelError(f"layer {index} has no checkpoint tensor for "
                                        f"{', '.join(prefix + n for n in missing)}")
        bar = tqdm(total=2 * samples, desc=f"wanda layer {index + 1}/{len(self.layers)}",
                   unit="seq", leave=False, disable=not self.progress)
        try:
            sq_norms, hooks, experts = {}, [], None
            for lin in linears:
                module = layer.get_submodule(lin)
                acc = torch.zeros(module.weight.shape[1], dtype=torch.float64, device=self.device)
                sq_norms[lin] = acc
                hooks.append(module.register_forward_hook(
                    functools.partial(_accumulate_sq_norm, acc), with_kwargs=True))
            if fused:
                module = layer.get_submodule(self.recipe.experts.module)
                experts = _ExpertNorms(index, module, self.device)
                hooks.append(module.register_forward_pre_hook(experts, with_kwargs=True))
            try:
                for j in range(samples):  # statistics with the layer's unpruned weights
                    self._run(layer, index, j)
                    bar.update()
            finally:
                for h in hooks:
                    h.remove()
            _trim_heap()  # the passes' intermediates
            for lin in linears:
                name = f"{prefix}{lin}.weight"
                # In place: the weight was read for us alone, and a copy of the largest linear
                # would add to the peak. On a GPU the device copy is pruned and brought back.
                pruned = wanda_prune(tensors[name].to(self.device), sq_norms[lin].sqrt(),
                                     self.sparsity, inplace=True)
                self._put(name, pruned.to(self.dtype))
                tensors[name] = pruned.to("cpu")
                _trim_heap()  # the pruning scratch
            if experts is not None:
                self._prune_experts(index, experts, fused, slices, tensors)
            for j in range(samples):  # the pruned layer's outputs are the next layer's inputs
                self._inputs[j] = self._run(layer, index, j)[0]
                bar.update()
        finally:
            bar.close()
            for name, t in tensors.items():
                if name not in sliced:
                    self._to_meta(name, t)
            for param, t in fused.items():
                self._to_meta(param, t)

    def _expert_slices(self, index: int, tensors: dict[str, torch.Tensor]) -> dict[str, list[str]]:
        """The expert slices among layer ``index``'s tensors: fused parameter → the names of
        experts ``0..E-1``'s slices of it, every expert present once."""
        found: dict[str, dict[int, str]] = {}
        for name in tensors:
            where = self.recipe.expert_slice(name)
            if where is not None:
                found.setdefault(where[0], {})[where[1]] = name
        out = {}
        for param, by_expert in found.items():
            slot = self.layers[index].get_parameter(param.removeprefix(f"{self.recipe.layers}.{index}."))
            lacking = sorted(set(range(slot.shape[0])) - set(by_expert))
            extra = sorted(set(by_expert) - set(range(slot.shape[0])))
            if lacking or extra:
                why = [f"lack experts {lacking[:8]}"] if lacking else []
                why += [f"have experts {extra[:8]} it does not"] if extra else []
                raise UnsupportedModelError(f"layer {index}: {param} has {slot.shape[0]} experts; the "
                                            f"slices given {' and '.join(why)}")
            out[param] = [by_expert[e] for e in range(slot.shape[0])]
        return out

    def _fuse(self, param: str, names: list[str], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The fused experts parameter ``param`` (``[E, ...]``) stacked from its slices ``names``
        and put in the model. On a CPU each slice in ``tensors`` is replaced by a view of it, the
        slice as read being freed at once: the experts are held once, and pruning the fused
        parameter in place prunes what the packer writes."""
        first = tensors[names[0]]
        fused = torch.empty((len(names), *first.shape), dtype=self._slot_dtype(param), device=self.device)
        for e, name in enumerate(names):
            fused[e].copy_(tensors[name])
            if self.device.type == "cpu":
                tensors[name] = fused[e]
        self._put(param, fused)
        return fused

    def _prune_experts(self, index: int, norms: _ExpertNorms, fused: dict[str, torch.Tensor],
                       slices: dict[str, list[str]], tensors: dict[str, torch.Tensor]) -> None:
        """Each expert's slices by Wanda with its own input norms, in place in the fused
        parameters (which the recompute pass then runs); an expert no calibration token was routed
        to by magnitude (module doc), with a warning, recorded for the manifest."""
        unrouted = [e for e in range(len(norms.tokens)) if norms.tokens[e] == 0]
        if unrouted:
            warnings.warn(
                f"wanda: no calibration token was routed to expert(s) {unrouted} of layer {index} "
                f"({len(unrouted)} of {len(norms.tokens)}); they are magnitude-pruned (no input "
                f"norms to weigh them by). More calibration tokens (calib_samples, calib_seqlen) "
                f"reach more experts", RuntimeWarning, stacklevel=2)
            self.unrouted += [f"layer.{index}.expert.{e}" for e in unrouted]
        for param, names in slices.items():
            sq = norms.sq[param.rpartition(".")[2]]
            for e, name in enumerate(names):
                norm = sq[e].sqrt() if norms.tokens[e] else torch.ones_like(sq[e])
                pruned = wanda_prune(fused[param][e], norm, self.sparsity, inplace=True)
                tensors[name] = pruned.to("cpu")  # on a CPU the same view
            _trim_heap()  # the pruning scratch

    def summary(self) -> dict:
        """Calibration statistics, recorded in the manifest under ``prune``."""
        c = self.calib
        moe = {"unrouted_experts": list(self.unrouted)} if self.plan.experts else {}
        return {**moe, "calibration": {
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
