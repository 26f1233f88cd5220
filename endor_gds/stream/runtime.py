"""A transformers model whose decoder layers stream from an .endor file.

``endor_gds.from_pretrained(path)`` returns the ordinary ``PreTrainedModel`` class of the
checkpoint (``LlamaForCausalLM``, ``OPTForCausalLM``, ...), built on the meta device from the
config embedded in the file. Resident tensors (embeddings, final norm, lm_head) and as many whole
layers as ``max_memory`` allows are loaded once; every other decoder layer gets a pre-forward hook
that swaps in its weights from the prefetch pipeline and a post-forward hook that hands them back
(and puts meta placeholders back, so a layer run outside the pipeline fails loudly instead of
using another layer's weights). ``generate()`` works as usual.

``model.endor`` is the :class:`StreamingRuntime`: reader mode, per-step statistics, ``close()``.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from endor_gds import defaults
from endor_gds.container import EndorFile
from endor_gds.decode.cpu import CpuDecoder
from endor_gds.decode.fused import AUTO_MAX_ROWS
from endor_gds.decode.fused import CODECS as FUSED_CODECS
from endor_gds.defaults import parse_bytes
from endor_gds.errors import (
    ArgumentError,
    BudgetError,
    ClosedError,
    FormatError,
    PlacementError,
    UnsupportedModelError,
)
from endor_gds.modeling import (
    check_tensors,
    exception_line,
    get_submodule,
    model_dtype,
    model_for,
    set_tensor,
)
from endor_gds.read.readers import check_mode, open_reader
from endor_gds.recipes import Recipe, recipes, usable
from endor_gds.shards import shard_plan
from endor_gds.stream import parallel
from endor_gds.stream.backends import CpuBackend, CudaBackend, RamImage
from endor_gds.stream.experts import ExpertCache, ExpertTable, routed_experts
from endor_gds.stream.integrity import ExtentCheck
from endor_gds.stream.parallel import TensorParallel
from endor_gds.stream.pipeline import Pipeline
from endor_gds.stream.plan import LayerPlan, LayerTimes, plan_layer

__all__ = ["from_pretrained", "StreamingRuntime", "StepStats", "runtime_of"]

TIERS = ("ssd", "ram")
EXPERT_MODES = ("routed", "all")
KEEP_STEPS = 4096  # per-step records kept (a ring), so a long generation's memory stays flat


@dataclass
class StepStats:
    """One forward pass of the model (one generated token, or the prompt's prefill)."""

    step: int
    wall_s: float = 0.0
    layers: int = 0  # streamed layers run
    bytes_read: int = 0
    read_s: float = 0.0
    decode_s: float = 0.0
    compute_s: float = 0.0
    stall_s: float = 0.0  # time the forward waited for a layer to be ready
    fused: int = 0  # streamed layers whose linear weights were multiplied from bitmap + values
    experts_routed: int = 0  # mixture-of-experts layers: (layer, expert) pairs the router picked
    experts_read: int = 0  # experts read and decoded (their bytes are in bytes_read)
    expert_hits: int = 0  # routed experts their forward started no read for (cached or prefetched)
    experts_prefetched: int = 0  # experts read on a guess of the next layer's routing
    prefetch_hits: int = 0  # of those, experts the next layer was then routed to
    collective_s: float = 0.0  # tensor parallelism: time in all-reduces (the other ranks' lag included)

    @property
    def overlap(self) -> float:
        """Fraction of read + decode time hidden behind compute (1 = fully overlapped)."""
        busy = self.read_s + self.decode_s
        return max(0.0, min(1.0, 1.0 - self.stall_s / busy)) if busy > 0 else 1.0

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.wall_s / 1e9 if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        return dict(asdict(self), overlap=self.overlap, gbps=self.gbps)


class StepRing:
    """The last ``capacity`` steps' statistics in one preallocated array.

    Preallocated and touched up front, so recording a step allocates nothing and a generation of
    any length keeps the process's memory flat; iterating yields :class:`StepStats` objects.
    """

    FIELDS = ("step", "wall_s", "layers", "bytes_read", "read_s", "decode_s", "compute_s", "stall_s", "fused",
              "experts_routed", "experts_read", "expert_hits", "experts_prefetched", "prefetch_hits",
              "collective_s")
    COUNTS = frozenset(("step", "layers", "bytes_read", "fused", "experts_routed", "experts_read", "expert_hits",
                        "experts_prefetched", "prefetch_hits"))

    def __init__(self, capacity: int = KEEP_STEPS):
        self._data = np.empty((capacity, len(self.FIELDS)))
        self._data.fill(0.0)  # fault every page in now, not one page per 64 steps later
        self._count = 0

    def append(self, s: StepStats) -> None:
        row = self._data[self._count % len(self._data)]
        for i, f in enumerate(self.FIELDS):
            row[i] = getattr(s, f)
        self._count += 1

    def clear(self) -> None:
        self._count = 0

    def __len__(self) -> int:
        return min(self._count, len(self._data))

    def __iter__(self):
        cap = len(self._data)
        for k in range(max(0, self._count - cap), self._count):
            row = self._data[k % cap]
            yield StepStats(**{f: (int(v) if f in self.COUNTS else float(v))
                               for f, v in zip(self.FIELDS, row)})


def _device(device) -> torch.device:
    """The torch device ``from_pretrained`` was asked for, or an ArgumentError saying what to do."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allowed = "'auto', 'cpu', 'cuda' or 'cuda:N' (or a torch.device of those)"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ArgumentError(f"device must be {allowed}, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ArgumentError(f"device must be {allowed}, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA" if torch.version.cuda is None else "torch sees no CUDA GPU"
            raise ArgumentError(f"device={device!r} was asked for, but {why} (torch.cuda.is_available() is "
                                f"False): use device='cpu', or on a GPU host install a CUDA build of torch")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise ArgumentError(f"device={device!r}, but this host has {torch.cuda.device_count()} CUDA "
                                f"device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def _tier(tier) -> str:
    if not isinstance(tier, str) or tier not in TIERS:
        raise ArgumentError(f"tier must be one of {', '.join(map(repr, TIERS))}, got {tier!r}")
    return tier


def _prefetch_depth(value) -> int:
    """``prefetch_depth``: None means the default; otherwise a whole number of buffer sets >= 1."""
    if value is None:
        return defaults.get("prefetch_depth")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ArgumentError(f"prefetch_depth must be a whole number >= 1 (1 = no overlap, 2 = double "
                            f"buffering), got {value!r}")
    return value


def _expert_options(experts, expert_cache) -> None:
    if experts not in EXPERT_MODES:
        raise ArgumentError(f"experts must be one of {', '.join(map(repr, EXPERT_MODES))} ('routed' reads "
                            f"the experts each token is routed to, 'all' every expert of every "
                            f"layer), got {experts!r}")
    if expert_cache is not None and (not isinstance(expert_cache, int) or isinstance(expert_cache, bool)
                                     or expert_cache < 1):
        raise ArgumentError(f"expert_cache must be a whole number of experts >= 1, or None (one "
                            f"layer's experts), got {expert_cache!r}")


def _verify_reads(value) -> bool:
    if value is None:
        return defaults.get("verify_reads")
    if not isinstance(value, bool):
        raise ArgumentError(f"verify_reads must be True, False or None (the default, on), got {value!r}")
    return value


def _budget(max_memory, device: torch.device) -> int | None:
    if max_memory is None:
        return None
    if isinstance(max_memory, dict):
        for key in (str(device), device.type, device.index):
            if key in max_memory:
                return _bytes(max_memory[key])
        raise BudgetError(f"max_memory {max_memory} has no entry for device {device} "
                          f"(use e.g. {{'{device.type}': '20GiB'}})")
    return _bytes(max_memory)


def _bytes(value) -> int:
    try:
        return parse_bytes(value)
    except ArgumentError as exc:
        raise ArgumentError(f"max_memory: {exc}") from None


def runtime_of(model: nn.Module) -> "StreamingRuntime":
    rt = getattr(model, "endor", None)
    if not isinstance(rt, StreamingRuntime):
        raise ValueError("this model was not created by endor_gds.from_pretrained")
    return rt


@dataclass
class _Placement:
    resident_layers: list[int]
    streamed_layers: list[int]
    resident_bytes: int
    buffer_bytes: int
    budget: int | None


def _set_bytes(plans, sets: int, device: torch.device, tier: str) -> int:
    """Bytes of ``sets`` buffer sets sized for the largest of ``plans`` (staging + dense arena;
    no staging where the CPU reads the RAM tier in place)."""
    staging = max((p.length for p in plans), default=0)
    arena = max((p.arena_bytes for p in plans), default=0)
    return sets * (arena if tier == "ram" and device.type == "cpu" else staging + arena)


def _plan_budget(plans: dict[int, LayerPlan], resident_bytes: int, depth: int,
                 budget: int | None, device: torch.device, tier: str, expert_bytes: int = 0) -> _Placement:
    """Keep as many whole layers resident as the budget allows once buffer sets (and the expert
    cache, ``expert_bytes``) are counted."""
    order = sorted(plans)
    staging = max((p.length for p in plans.values()), default=0)
    arena = max((p.arena_bytes for p in plans.values()), default=0)
    sets = _set_bytes(plans.values(), depth, device, tier) + expert_bytes
    if budget is None:
        return _Placement([], order, resident_bytes, sets, None)
    need = resident_bytes + sets
    if need > budget:
        raise BudgetError(
            f"max_memory={budget} bytes for {device} cannot hold the resident tensors "
            f"({resident_bytes} bytes) plus {depth} buffer set(s) of {staging + arena} bytes "
            f"(staging {staging} + dense {arena})"
            + (f" plus the expert cache ({expert_bytes} bytes; expert_cache= sets how many experts)"
               if expert_bytes else "")
            + f"; need at least {need} bytes, or a smaller prefetch_depth")
    left = budget - need
    resident_layers = []
    for i in order:
        cost = plans[i].length + plans[i].arena_bytes
        if cost > left:
            break
        resident_layers.append(i)
        left -= cost
    if len(resident_layers) == len(order):
        # everything fits: no streaming, and the buffer sets are not needed
        return _Placement(order, [], resident_bytes + sum(plans[i].length + plans[i].arena_bytes
                                                          for i in order), 0, budget)
    streamed = [i for i in order if i not in resident_layers]
    held = resident_bytes + sum(plans[i].length + plans[i].arena_bytes for i in resident_layers)
    return _Placement(resident_layers, streamed, held, sets, budget)


class StreamingRuntime:
    """Everything behind one streaming model: file, reader, decoder, buffers, hooks and stats."""

    def __init__(self, model: nn.Module, ef: EndorFile, recipe: Recipe, device: torch.device, *,
                 max_memory=None, tier: str = "ssd", prefetch_depth: int | None = None,
                 io: str | None = None, verify_reads: bool | None = None, experts: str = "routed",
                 expert_cache: int | None = None, expert_prefetch: bool = False,
                 tp: TensorParallel | None = None):
        self.file, self.recipe, self.device, self.tier = ef, recipe, device, _tier(tier)
        self.tp = tp
        self._collective_at_step = 0.0
        _expert_options(experts, expert_cache)
        self.expert_mode, self._expert_capacity = experts, expert_cache
        self.expert_prefetch = expert_prefetch and experts == "routed"
        self._routers: dict[int, torch.Tensor] = {}  # MoE layer -> the next MoE layer's router weight
        self.experts: ExpertCache | None = None
        self.depth = _prefetch_depth(prefetch_depth)
        self.verify_reads = _verify_reads(verify_reads)
        self.reader = open_reader(ef.path, mode=io, device=device.type, expected_size=ef.file_size)
        self.mode = self.reader.mode
        self.steps = StepRing()
        self._nsteps = 0
        self._current = StepStats(step=0)  # reused: a step allocates no new record
        self._step: StepStats | None = None
        self._t_step = 0.0
        # One forward step at a time: the streamed layers' weights live in shared buffer sets, so
        # two threads' steps interleaved used to swap each other's layers (wrong tokens, or a
        # "Tensor on device meta" error). Held from the model's pre-hook to its always-called hook.
        self._step_lock = threading.Lock()
        self._step_owner: int | None = None
        self._hooks = []
        self.pipeline = None
        self._closed = False
        try:
            self._build(model, max_memory)
        except BaseException:
            self.close()
            raise

    # -- construction ---------------------------------------------------------------------------

    def _build(self, model: nn.Module, max_memory) -> None:
        ef, recipe = self.file, self.recipe
        self.dtype = model.dtype
        layers_module = get_submodule(model, recipe.layers)
        # a tensor-parallel file: this rank's shard extents, and the model in this rank's shapes
        self.rank = parallel.check_file(ef, self.tp)
        if self.rank is not None:
            spec = ef.tensor_parallel
            self.shards = shard_plan(ef.config, recipe, spec["size"])
            if self.shards.styles != spec["plan"]:
                # the split must be the one this runtime's model computes with: a plan cut another
                # way would fail in a matmul, or (swapped in pairs) compute something else
                theirs = {m: s for m, s in spec["plan"].items() if self.shards.styles.get(m) != s}
                ours = {m: self.shards.styles.get(m) for m in theirs}
                raise FormatError(f"{ef.path} was split by the tensor-parallel plan {theirs}, which is not "
                                  f"this transformers' base_model_tp_plan for {recipe.family} ({ours}): "
                                  f"pack it again with --tp")
            parallel.localize(model, recipe, self.shards, self.rank)
        extents = ef.layer_extents(self.rank)
        if len(layers_module) != len(extents):
            raise FormatError(f"{ef.path}: the file has {len(extents)} layer extents, the model "
                              f"config builds {len(layers_module)} layers")
        expert_plans = self._expert_plans()
        slices = {n: recipe.expert_slice(n) for p in expert_plans.values() for n in (s.entry.name for s in p.slots)}
        check_tensors(model, {n: (e.shape, e.dtype.torch) for n, e in ef.model_tensors(self.rank).items()},
                      ef.tied, ef.path, "the file", slices)
        prefix = ef.layer_prefix(self.rank) + recipe.layers
        plans = {ext.layer: plan_layer(ef, ext, f"{prefix}.{ext.layer}.") for ext in extents}
        resident_plan = plan_layer(ef, ef.resident, "") if ef.resident is not None else None
        resident_bytes = 0 if resident_plan is None else resident_plan.length + resident_plan.arena_bytes
        if expert_plans:
            per_layer = max(len(exts) for exts in ef.experts.values())
            self._expert_capacity = per_layer if self.expert_mode == "all" or self._expert_capacity is None \
                else self._expert_capacity
        expert_bytes = _set_bytes(expert_plans.values(), self._expert_capacity or 0, self.device, self.tier)
        self.placement = _plan_budget(plans, resident_bytes, self.depth,
                                      _budget(max_memory, self.device), self.device, self.tier, expert_bytes)
        self.decoder = self._make_decoder()
        streamed = [plans[i] for i in self.placement.streamed_layers]
        depth = self.depth if streamed else 0
        ram = None
        self.check = ExtentCheck(ef.path, ef.opened_stat) if self.verify_reads else None
        if self.tier == "ram" and streamed:
            ram = RamImage(streamed, self.reader, pinned=self.device.type == "cuda", check=self.check)
        if self.device.type == "cuda":
            self.backend = CudaBackend(streamed, depth, self.device, self.reader, self.decoder, ram, self.check)
        else:
            # the portable path adds in the same order but is ~30x slower than decoding: only
            # a CPU with the vector path multiplies fused
            fused = {p.index: _fusable(layers_module[p.index], p) for p in streamed} \
                if "fma" in self.decoder.features else {}
            self.backend = CpuBackend(streamed, depth, self.reader, self.decoder, ram, self.check, fused)
        self.ram_bytes = 0 if ram is None else ram.nbytes
        if expert_plans:
            self._attach_experts(model, layers_module, expert_plans)

        # resident tensors, then tied aliases, then resident layers
        if resident_plan is not None:
            views, _ = self.backend.load(resident_plan, self.reader)
            for name, t in views.items():
                set_tensor(model, name, t)
            for alias, target in ef.tied.items():
                set_tensor(model, alias, views[target])
        for i in self.placement.resident_layers:
            views, _ = self.backend.load(plans[i], self.reader)
            layer = layers_module[i]
            for rel, t in views.items():
                set_tensor(layer, rel, t)
        for name, buf in list(model.named_buffers()):
            if buf.device != self.device:
                set_tensor(model, name, buf.to(self.device))

        # streamed layers: meta placeholders now, weights swapped in by hooks (check_tensors above
        # has made sure every parameter has a tensor in the file)
        if streamed:
            # the RAM tier was checked as it was loaded; streamed reads are checked as they arrive
            self.pipeline = Pipeline(streamed, self.backend, self.depth,
                                     check=self.check if ram is None else None, on_layer_done=self._layer_done)
            for i in self.placement.streamed_layers:
                self._attach(layers_module[i], i)
        self._install_rowwise(layers_module)
        # not in self._hooks: it outlives close(), so a closed model says so instead of failing
        # in a matmul on meta placeholders
        model.register_forward_pre_hook(self._refuse_if_closed)
        self._hooks.append(model.register_forward_pre_hook(self._step_begin))
        self._hooks.append(model.register_forward_hook(self._step_end))
        self._hooks.append(model.register_forward_hook(self._step_unlock, always_call=True))

    def _install_rowwise(self, layers_module) -> None:
        """In a process group, every row-parallel module sums the ranks' partial outputs (installed
        after the streaming hooks and the fused product, so it wraps the forward they give)."""
        if self.tp is not None and self.rank is not None:
            parallel.install_rowwise(layers_module, self.shards, self.tp)

    def _make_decoder(self):
        if self.device.type == "cuda":
            from endor_gds.decode.gpu import GpuDecoder  # noqa: PLC0415 - needs cupy; loaded on GPU hosts only

            return GpuDecoder(self.device.index or 0)
        return CpuDecoder()

    def _attach(self, layer: nn.Module, index: int) -> None:
        """Hooks that swap layer ``index``'s weights in before its forward and out after it."""
        params = {}
        for rel, p in layer.named_parameters():
            owner_path, _, leaf = rel.rpartition(".")
            params[rel] = (layer.get_submodule(owner_path) if owner_path else layer, leaf, p)
        pipeline = self.pipeline
        # the linear layers that may multiply from bitmap + values: what each is to use this step
        fused = {rel: _fuse_forward(params[rel][0], self.decoder) for rel in self.backend.fused.get(index, ())}
        cache: dict[tuple[int, bool], list] = {}

        def pre(module, args, kwargs):
            dense = not (fused and _fused_step(args, kwargs))
            tensors = pipeline.acquire(index, dense)
            swap = cache.get((id(tensors), dense))
            if swap is None:  # one Parameter per (layer, buffer set), built on first use
                missing = set(params) - set(tensors)
                if missing:
                    raise FormatError(f"layer {index} of {self.file.path} lacks {sorted(missing)}")
                # a fused weight keeps its meta placeholder: any use but the fused product fails
                swap = cache[(id(tensors), dense)] = [
                    (params[rel][0], params[rel][1], nn.Parameter(t, requires_grad=False))
                    for rel, t in tensors.items() if rel in params and (dense or rel not in fused)]
            for owner, leaf, value in swap:
                owner._parameters[leaf] = value
            if not dense:
                for rel, weight in pipeline.fused_weights().items():
                    fused[rel][0] = weight
                if self._step is not None:
                    self._step.fused += 1

        def post(module, args, output):
            for owner, leaf, placeholder in params.values():
                owner._parameters[leaf] = placeholder
            for holder in fused.values():
                holder[0] = None
            pipeline.release(index)

        self._hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        self._hooks.append(layer.register_forward_hook(post))

    def _expert_plans(self) -> dict[tuple[int, int], LayerPlan]:
        """Every expert extent's plan by ``(layer, expert)``, numbered apart from the layers (its
        own backend keys buffers by plan index)."""
        ef, recipe = self.file, self.recipe
        if not ef.experts:
            return {}
        if recipe.experts is None:
            raise FormatError(f"{ef.path} has expert extents, but its architecture {recipe.family} has "
                              f"no experts in this endor_gds's recipe")
        plans = {}
        for i, exts in sorted(ef.experts.items()):
            for ext in exts:
                plan = plan_layer(ef, ext, f"{recipe.layers}.{i}.{recipe.experts.module}.{ext.expert}.")
                plans[(i, ext.expert)] = replace(plan, index=len(plans), label=f"layer {i} expert {ext.expert}")
        return plans

    def _attach_experts(self, model: nn.Module, layers_module, plans) -> None:
        """An expert cache with its own backend and buffer sets (one per cached expert), and in
        every MoE layer the fused experts parameters replaced by tables that read from it."""
        ram = None
        check = self.check
        if self.tier == "ram":  # the experts' compressed extents in host memory, checked once
            ram = RamImage(list(plans.values()), self.reader, pinned=self.device.type == "cuda", check=check)
            check = None
            self.ram_bytes += ram.nbytes
        capacity = self._expert_capacity
        if self.device.type == "cuda":
            backend = CudaBackend(list(plans.values()), capacity, self.device, self.reader, self.decoder, ram, check)
        else:
            backend = CpuBackend(list(plans.values()), capacity, self.reader, self.decoder, ram, check)
        self.experts = ExpertCache(plans, backend, capacity, check)
        module_path = self.recipe.experts.module
        moe_layers = sorted(self.file.experts)
        router = self.recipe.experts.router
        if self.expert_prefetch and router:  # a few KB per layer, read once, checked
            for i, j in zip(moe_layers, moe_layers[1:]):
                self._routers[i] = self.file.read_tensor(f"{self.recipe.layers}.{j}.{router}",
                                                        verify=self.verify_reads).to(self.device)
        self._next_moe = dict(zip(moe_layers, moe_layers[1:]))
        for i in moe_layers:
            module = get_submodule(layers_module[i], module_path)
            module.config._experts_implementation = "eager"  # the forward that indexes only routed experts
            for name in self.recipe.experts.params:
                param = module._parameters.pop(name)
                setattr(module, name, ExpertTable(self.experts, i, name, tuple(param.shape), param.dtype, self.device))
            self._hooks.append(module.register_forward_pre_hook(self._route_hook(i), with_kwargs=True))
            self._hooks.append(module.register_forward_hook(lambda *_: self.experts.done(), always_call=True))

    def _route_hook(self, index: int):
        every = len(self.file.experts[index])

        def pre(mod, args, kwargs):
            top_k = args[1] if len(args) > 1 else kwargs.get("top_k_index")
            if not isinstance(top_k, torch.Tensor):
                raise UnsupportedModelError(f"layer {index}: the experts module {type(mod).__name__} was "
                                            f"called without top_k_index; endor_gds streams experts for "
                                            f"forwards that receive the routing")
            wanted = routed_experts(top_k, every) if self.expert_mode == "routed" else list(range(every))
            self.experts.route(index, wanted, reread=self.expert_mode == "all")
            router = self._routers.get(index)
            if router is not None:  # guess the next MoE layer's experts from this layer's hidden state
                hidden = args[0] if args else kwargs["hidden_states"]
                logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), router)
                guess = logits.topk(min(top_k.shape[-1], router.shape[0]), dim=-1).indices
                self.experts.prefetch(self._next_moe[index], routed_experts(guess, router.shape[0]))
        return pre

    # -- statistics -----------------------------------------------------------------------------

    def _refuse_if_closed(self, module, args):
        if self._closed:
            raise ClosedError(f"{self.file.path}: this model was closed (model.endor.close()); its "
                              f"streamed weights and file are released. Load it again with "
                              f"endor_gds.from_pretrained(path)")

    def _step_begin(self, module, args):
        me = threading.get_ident()
        # torch calls always-call hooks after an Exception, not after a KeyboardInterrupt: a step
        # of this thread cut short by Ctrl-C still holds the lock, and this step takes it over.
        if self._step_owner != me:
            self._step_lock.acquire()
            self._step_owner = me
        cur = self._current
        cur.step, cur.wall_s, cur.layers, cur.bytes_read = self._nsteps, 0.0, 0, 0
        cur.read_s = cur.decode_s = cur.compute_s = cur.stall_s = 0.0
        cur.fused = cur.experts_routed = cur.experts_read = cur.expert_hits = 0
        cur.experts_prefetched = cur.prefetch_hits = 0
        cur.collective_s = 0.0
        if self.tp is not None:
            self._collective_at_step = self.tp.collective_s
        if self.experts is not None:
            self.experts.stats.clear()
        self._step = cur
        self._nsteps += 1
        self._t_step = time.perf_counter()

    def _step_end(self, module, args, output):
        # A GPU decode error of any layer of this step is raised here, so the step's output is
        # never returned (see CudaBackend: error words are read once per step, not per layer).
        self.backend.check_decodes()
        if self.experts is not None:
            self.experts.backend.check_decodes()
        if self._step is not None and self.experts is not None:
            x, s = self.experts.stats, self._step
            s.experts_routed, s.experts_read, s.expert_hits = x.routed, x.read, x.hits
            s.experts_prefetched, s.prefetch_hits = x.prefetched, x.prefetch_hits
            s.bytes_read += x.nbytes
            s.read_s += x.read_s
            s.stall_s += x.wait_s
        if self._step is not None:
            if self.tp is not None:
                self._step.collective_s = self.tp.collective_s - self._collective_at_step
            self._step.wall_s = time.perf_counter() - self._t_step
            self.steps.append(self._step)
            self._step = None

    def _step_unlock(self, module, args, output):
        if self._step_owner == threading.get_ident():
            self._step_owner = None
            self._step_lock.release()

    def _layer_done(self, t: LayerTimes) -> None:
        s = self._step
        if s is None:
            return
        s.layers += 1
        s.bytes_read += t.nbytes
        s.read_s += t.read_s
        s.decode_s += t.decode_s
        s.compute_s += t.compute_s
        s.stall_s += t.stall_s

    def reset_stats(self) -> None:
        self.steps.clear()
        self._nsteps = 0

    def fused_product(self) -> str:
        """Whether streamed linear weights are multiplied from bitmap + values (``run``, ``bench``)."""
        if self.device.type == "cuda":
            return "off: the GPU decodes every layer"
        if "fma" not in self.decoder.features:
            return "off: this CPU lacks AVX2 + FMA + F16C (the fused product's vector path); every step decodes"
        if not any(self.backend.fused.values()):
            return (f"off: no streamed linear weight is encoded with a codec it reads "
                    f"({', '.join(FUSED_CODECS)}): the file stores them dense")
        if not defaults.get("fused"):
            return "off (fused=False): every step decodes to dense, bit-identical to the in-memory model"
        limit = defaults.get("fused_max_rows")
        rows = _max_rows(self.dtype)
        how = f" ({rows} for {self.dtype}: fused_max_rows='auto')" if limit == "auto" else ""
        return (f"on for steps of at most {rows} rows (batch x sequence){how}: their "
                f"linear weights are multiplied from bitmap + values; larger steps decode to dense")

    def checked_reads(self) -> str:
        """How the bytes the model computes with are checked (printed by ``run`` and ``bench``)."""
        if self.check is None:
            return "off (verify_reads=False): reads are not checked"
        direct = self.device.type == "cuda" and self.mode in ("gds", "kvikio-compat") and self.tier == "ssd"
        where = " (on the GPU, where KvikIO read it)" if direct else ""
        return ("every byte against its CRC-32C" + where + ": the streamed layers "
                + ("once, as they are loaded into RAM" if self.tier == "ram" else "as each is read, before decode")
                + f", the resident tensors (embeddings, final norm, lm_head) once at load; "
                  f"{self.check.rereads} layer(s) read again after a failed check")

    def summary(self) -> dict:
        """Configuration and aggregated statistics (what ``endor-gds run --json`` prints).

        In a process group this is a collective: every rank must call it, and each gets every
        rank's per-token figures under ``tensor_parallel.ranks``."""
        steps = list(self.steps)
        if len(steps) > 1 and steps[0].step == 0:
            steps = steps[1:]  # step 0 is the prompt's prefill, not a generated token
        tot = StepStats(step=-1)
        for s in steps:
            for f in ("wall_s", "bytes_read", "read_s", "decode_s", "compute_s", "stall_s", "layers", "fused",
                      "experts_routed", "experts_read", "expert_hits", "experts_prefetched", "prefetch_hits",
                      "collective_s"):
                setattr(tot, f, getattr(tot, f) + getattr(s, f))
        n = max(len(steps), 1)
        per_token = {
            "s": tot.wall_s / n, "bytes_read": tot.bytes_read / n, "read_s": tot.read_s / n,
            "decode_s": tot.decode_s / n, "compute_s": tot.compute_s / n,
            "stall_s": tot.stall_s / n, "overlap": tot.overlap, "gbps": tot.gbps,
            "fused_layers": tot.fused / n,  # streamed layers multiplied from bitmap + values
            "experts_routed": tot.experts_routed / n,
            "experts_read": tot.experts_read / n,
            "expert_hits": tot.expert_hits / n,
            "experts_prefetched": tot.experts_prefetched / n,
            "prefetch_hits": tot.prefetch_hits / n,
            "collective_s": tot.collective_s / n,
            "tokens_per_s": n / tot.wall_s if tot.wall_s > 0 else 0.0,
        }
        tensor_parallel = None
        if self.tp is not None:
            tensor_parallel = {"size": self.tp.size, "rank": self.tp.rank, "backend": self.tp.backend,
                               "ranks": self.tp.gather(dict(per_token, file=self.file.path))}
        return {
            "file": self.file.path,
            "device": str(self.device),
            "reader_mode": self.mode,
            "reader_reason": self.reader.mode_reason,  # why this mode (e.g. why not GDS)
            "tier": self.tier,
            "prefetch_depth": self.depth,
            "resident_layers": self.placement.resident_layers,
            "streamed_layers": len(self.placement.streamed_layers),
            "resident_bytes": self.placement.resident_bytes,
            "buffer_bytes": self.placement.buffer_bytes,
            "ram_tier_bytes": self.ram_bytes,
            "budget_bytes": self.placement.budget,
            "decoder": repr(self.decoder),
            "checked_reads": self.checked_reads(),
            "fused_product": self.fused_product(),
            "experts": None if self.experts is None else
                {"mode": self.expert_mode, "cache_experts": self.experts.capacity,
                 "prefetch": bool(self._routers),
                 "cache_bytes": self.experts.backend.buffer_bytes},
            "steps": self._nsteps,
            "tensor_parallel": tensor_parallel,
            "per_token": per_token,
            "step_stats": [s.as_dict() for s in self.steps],
        }

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for h in self._hooks:
            h.remove()
        if self.pipeline is not None:
            self.pipeline.close()
        if self.experts is not None:
            self.experts.close()
        check = getattr(self, "check", None)
        if check is not None:
            check.close()
        dec = getattr(self, "decoder", None)
        if dec is not None and hasattr(dec, "close"):
            dec.close()
        self.reader.close()
        self.file.close()

    def __repr__(self) -> str:
        p = self.placement if hasattr(self, "placement") else None
        return (f"<StreamingRuntime {self.file.path!r} device={self.device} mode={self.mode} "
                f"tier={self.tier} depth={self.depth} "
                f"resident_layers={len(p.resident_layers) if p else '?'} "
                f"streamed={len(p.streamed_layers) if p else '?'}>")


def _fusable(layer: nn.Module, plan: LayerPlan) -> frozenset[str]:
    """The layer's encoded weights that the fused product can take: those of plain ``nn.Linear``
    modules (their forward is ``F.linear``, which the product replaces) whose values are in a codec
    it reads, with a bitmap or (exphuff) without."""
    names = set()
    for slot in plan.slots:
        owner_path, _, leaf = slot.rel.rpartition(".")
        e = slot.entry
        encoded = e.encoding == "bitmap" or e.codec == "exphuff"
        if not encoded or e.codec not in FUSED_CODECS or leaf != "weight" or len(e.shape) != 2:
            continue
        owner = layer.get_submodule(owner_path) if owner_path else layer
        if type(owner).forward is nn.Linear.forward:
            names.add(slot.rel)
    return frozenset(names)


def _fuse_forward(linear: nn.Module, decoder: CpuDecoder) -> list:
    """Make ``linear`` take the fused product whenever its holder (returned, ``[None]``) is given a
    :class:`~endor_gds.decode.fused.FusedWeight`, and ``F.linear`` otherwise."""
    holder: list = [None]
    dense_forward = linear.forward

    def forward(x):
        weight = holder[0]
        return dense_forward(x) if weight is None else weight(decoder, x, linear.bias)

    linear.forward = forward
    return holder


def _max_rows(dtype: torch.dtype) -> int:
    """The ``fused_max_rows`` option, ``"auto"`` resolved for ``dtype``."""
    limit = defaults.get("fused_max_rows")
    return AUTO_MAX_ROWS.get(dtype, 1) if limit == "auto" else limit


def _fused_step(args, kwargs) -> bool:
    """Whether a decoder layer's forward is small enough for the fused product: its hidden states
    (the first argument) hold at most ``fused_max_rows`` rows (batch x sequence)."""
    if not defaults.get("fused"):
        return False
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        return False
    return hidden.numel() // max(hidden.shape[-1], 1) <= _max_rows(hidden.dtype)


def _build_model(ef: EndorFile, recipe: Recipe) -> nn.Module:
    """The empty model of the manifest's config. The layer count is checked first (a Llama config
    asking for 10^9 layers was still building modules on meta after a minute)."""
    n = recipe.num_layers(ef.config)
    if n != ef.num_layers:
        raise FormatError(f"{ef.path}: the file has {ef.num_layers} layers' extents, its config "
                          f"asks for {n} layers")
    # by the model's parameter names (a tensor-parallel file's are prefixed with their rank)
    some_rank = None if ef.tensor_parallel is None else ef.tensor_parallel["ranks"][0]
    dtype = model_dtype(recipe, ((n, e.dtype.torch) for n, e in ef.model_tensors(some_rank).items()))
    return model_for(ef.config, dtype, ef.path, ef.architecture)


def from_pretrained(path, device="auto", max_memory=None, tier: str = "ssd",
                    prefetch_depth: int | None = None, io: str | None = None, *,
                    verify_reads: bool | None = None, experts: str = "routed",
                    expert_cache: int | None = None, expert_prefetch: bool = False,
                    process_group="auto"):
    """Load an ``.endor`` file as a streaming transformers model (see module docstring).

    ``device``: ``"auto"`` (CUDA when available), ``"cuda"``, ``"cuda:N"`` or ``"cpu"``.
    ``max_memory``: a byte budget for the device (``"20GiB"`` or ``{"cuda": "20GiB"}``) that
    resident tensors, resident layers and the buffer sets must fit; ``None`` streams every layer.
    ``tier``: ``"ssd"`` reads every streamed layer from the file each token; ``"ram"`` reads the
    compressed extents once into (pinned) host memory and streams from there.
    ``prefetch_depth``: buffer sets (2 = double buffering). ``io``: reader mode (see
    :func:`endor_gds.read.readers.open_reader`). ``verify_reads`` (default on, ``ENDOR_VERIFY_READS``):
    check every segment's CRC-32C as it arrives (see :mod:`endor_gds.stream.integrity`).
    Mixture-of-experts files (see :mod:`endor_gds.stream.experts`): ``experts="routed"`` reads
    only the experts a step's tokens are routed to, ``"all"`` every expert of a layer each time it
    runs (what streaming whole layers costs); ``expert_cache``: how many decoded experts stay
    resident (default: as many as one layer has), counted in ``max_memory``; ``expert_prefetch``:
    guess each MoE layer's experts from the previous one's hidden state (its router applied early)
    and read them ahead (off by default: with random-weight routers the guesses were right 20-35 %
    of the time and cost more reads than they hid, docs/performance.md).
    Tensor parallelism (files packed with ``tp=N``, see :mod:`endor_gds.stream.parallel`):
    ``process_group="auto"`` splits the model over the default process group when one is
    initialised; ``None`` never does (every process runs the whole file); a ``ProcessGroup``, over
    that group. ``path`` may hold ``{rank}``, replaced by this process's rank in it.
    """
    # bad arguments are named before the file is opened
    _tier(tier), _prefetch_depth(prefetch_depth), check_mode(io), _verify_reads(verify_reads)
    _expert_options(experts, expert_cache)
    dev = _device(device)
    _budget(max_memory, dev)
    tp = parallel.current(process_group)

    def load(ef: EndorFile):
        return _load(ef, dev, tp, max_memory=max_memory, tier=tier, prefetch_depth=prefetch_depth, io=io,
                     verify_reads=verify_reads, experts=experts, expert_cache=expert_cache,
                     expert_prefetch=expert_prefetch)

    if tp is None:
        return load(EndorFile(parallel.rank_path(path, 0)))
    # every rank opens its file, and the ranks compare them before anything is loaded
    ef = tp.together("opening the file", lambda: _open_shards(parallel.rank_path(path, tp.rank), tp),
                     fingerprint=EndorFile.fingerprint, cleanup=EndorFile.close)
    return tp.together("loading the model", lambda: load(ef), cleanup=lambda model: model.endor.close())


def _open_shards(path, tp: TensorParallel) -> EndorFile:
    ef = EndorFile(path)
    try:
        parallel.check_file(ef, tp)
    except BaseException:
        ef.close()
        raise
    return ef


def _load(ef: EndorFile, dev: torch.device, tp: TensorParallel | None, **options):
    """The streaming model of the opened file ``ef`` (closed if this fails)."""
    try:
        recipe = recipes().get(ef.architecture)
        if recipe is None:
            raise UnsupportedModelError(f"{ef.path} was packed for architecture {ef.architecture!r}, "
                                        f"which this endor_gds has no recipe for")
        model = _build_model(ef, usable(recipe))
        gen = ef.manifest.get("generation_config")  # an object or None: checked at open
        if gen is not None and getattr(model, "generation_config", None) is not None:
            model.generation_config = _generation_config(ef, gen)
    except BaseException:
        ef.close()
        raise
    runtime = StreamingRuntime(model, ef, recipe, dev, tp=tp, **options)
    model.endor = runtime
    _guard_placement(model, runtime)
    weakref.finalize(model, runtime.close)
    return model


def _guard_placement(model: nn.Module, runtime: StreamingRuntime) -> None:
    """Make ``model.to(...)``, ``.cuda()``, ``.half()`` and the like (all of them go through
    ``Module._apply``) either a no-op or a PlacementError. Left to torch, a move fails halfway
    ("Cannot copy out of meta tensor") and a dtype change converts the resident tensors but not
    the streamed ones, so the next forward fails in a matmul: either way the model is broken. The
    habitual ``model.to(device)`` to where it already is returns the model unchanged. The
    conversion is tried on an empty tensor first, so a refused move changes nothing."""
    here = torch.empty(0, dtype=model.dtype, device=runtime.device)
    owner = weakref.ref(model)  # no reference cycle: the model is still freed when dropped

    def _apply(fn, recurse=True):
        try:
            there = fn(here)
        except Exception as exc:  # noqa: BLE001 - e.g. .cuda() where torch has no CUDA
            there = exc
        if isinstance(there, torch.Tensor) and (there.device, there.dtype) == (here.device, here.dtype):
            return owner()
        target = f"to {there.device} in {there.dtype}" if isinstance(there, torch.Tensor) else \
            f"({type(there).__name__}: {there})"
        raise PlacementError(
            f"{runtime.file.path}: a streaming model stays where from_pretrained placed it, on "
            f"{here.device} in {here.dtype} (the file's dtype); it cannot be moved {target}. For "
            f"another device, load the file again: endor_gds.from_pretrained(path, device=...)")

    model._apply = _apply


def _generation_config(ef: EndorFile, gen: dict):
    """The file's generation_config (its typed fields were checked at open); a value that
    transformers itself refuses (``max_new_tokens: 0``) is a FormatError, like a bad config."""
    import transformers  # noqa: PLC0415 - heavy (~1 s); only when a model is built or tokenized

    try:
        return transformers.GenerationConfig.from_dict(gen)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"{ef.path}: its generation_config is refused by transformers "
                          f"({exception_line(exc)})") from exc
