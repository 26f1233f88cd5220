"""A mixture-of-experts layer's experts: read only when a token is routed to them, through a cache.

transformers 5 holds a layer's experts as fused 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``), and its eager experts forward indexes them (``self.gate_up_proj[e]``)
only for the experts the router picked, in ascending order, gate-up then down for each. The
runtime replaces each such parameter by an :class:`ExpertTable`: ``table[e]`` is expert ``e``'s
slice, made resident on demand by the :class:`ExpertCache`. The experts module's pre-forward hook
sees ``top_k_index`` and starts loading the routed experts the cache lacks (read, checked, decoded
on a loader thread, in the order the forward will want them) while the forward computes the ones
it has; a table asked for an expert it was not routed to, or used outside its forward, fails by
name instead of computing with another expert's weights.

The cache holds ``capacity`` experts (of any layer), each in a buffer set of its own backend (the
same CPU and CUDA backends, readers, checks and decoders as the layers'). It evicts, among the
experts the forward in progress does not need, the least recently used one of the layer holding
the most (``policy="lru"``: of any layer, kept to measure against). It may be smaller than a
layer's routed experts: an expert the forward is done with (it moved on to a later one) is
evictable. Optionally (:meth:`ExpertCache.prefetch`) a guess of the next layer's experts is read
behind the current loads.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from endor_gds.errors import EndorError
from endor_gds.stream.backends import Backend
from endor_gds.stream.integrity import ExtentCheck
from endor_gds.stream.plan import LayerPlan

__all__ = ["ExpertCache", "ExpertTable", "ExpertStats", "routed_experts", "add_expert_arguments",
           "expert_options"]

Key = tuple[int, int]  # (layer, expert)


@dataclass
class ExpertStats:
    """What the experts cost in one step (added to its :class:`StepStats`)."""

    routed: int = 0  # (layer, expert) pairs the router picked
    read: int = 0  # experts read (storage or the RAM tier) and decoded, for any reason
    hits: int = 0  # routed experts their forward started no read for: cached, or prefetched
    prefetched: int = 0  # reads started on a guess of the next layer's routing
    prefetch_hits: int = 0  # of those, experts the next layer was then routed to
    nbytes: int = 0  # bytes of the experts read
    read_s: float = 0.0  # loader time (read + check + decode), partly hidden behind compute
    wait_s: float = 0.0  # time the forward waited for an expert

    def clear(self) -> None:
        self.routed = self.read = self.hits = self.prefetched = self.prefetch_hits = self.nbytes = 0
        self.read_s = self.wait_s = 0.0


def routed_experts(top_k_index: torch.Tensor, num_experts: int) -> list[int]:
    """The experts ``top_k_index`` routes at least one token to, ascending (as the eager forward
    visits them); indices outside ``0..E-1`` (a padding value some routers use) are not experts."""
    ids = torch.unique(top_k_index.detach().reshape(-1)).tolist()
    return [e for e in ids if 0 <= e < num_experts]


class ExpertCache:
    """Experts resident on one device, by ``(layer, expert)``: at most ``capacity`` of them.

    All calls but the loads come from the forward thread. A load (read, check, decode into a
    slot's buffer set) runs on one loader thread, first in first out: the routed experts of the
    layer in progress in the order its forward wants them, then any guess of the next layer's.
    """

    POLICIES = ("balanced", "lru")

    def __init__(self, plans: dict[Key, LayerPlan], backend: Backend, capacity: int,
                 check: ExtentCheck | None, policy: str = "balanced"):
        if capacity < 1:
            raise ValueError(f"an expert cache holds at least one expert, got capacity {capacity}")
        if policy not in self.POLICIES:
            raise ValueError(f"eviction policy must be one of {self.POLICIES}, got {policy!r}")
        self.plans, self.backend, self.capacity, self.check = plans, backend, capacity, check
        # "lru": the least recently used expert of any layer (kept to measure against)
        self.policy = policy
        self.stats = ExpertStats()
        self._lru: OrderedDict[Key, int] = OrderedDict()  # resident expert -> slot, oldest first
        self._free = list(range(capacity))
        self._loading: dict[Key, tuple[int, Future]] = {}
        self._guessed: set[Key] = set()  # loading or loaded on a guess, not routed to since
        self._wanted: list[Key] = []  # the forward in progress: routed experts it has not used yet
        self._hit: set[Key] = set()  # of those, the ones counted as hits
        self._current: Key | None = None  # the expert the forward is computing with
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="endor-experts")

    # -- loader thread --------------------------------------------------------------------------

    def _load(self, key: Key, slot: int) -> float:
        t0 = time.perf_counter()
        plan = self.plans[key]
        # its pieces checked as they arrive, as a layer's: the loader reads, checks and decodes
        # one expert after another, so a check after the read would hold the next read back
        early = self.backend.read_checked(plan, slot, self.check)
        if self.check is not None:
            self.check.check(plan, lambda: self.backend.first_mismatch(plan, slot),
                             lambda: self.backend.reread(plan, slot), early=early)
        self.backend.decode(plan, slot)
        return time.perf_counter() - t0

    # -- forward thread -------------------------------------------------------------------------

    def route(self, layer: int, experts: list[int], reread: bool = False) -> None:
        """The experts module of ``layer`` is about to run with these experts (ascending): count
        hits, and start loading the others into slots no routed expert needs. ``reread``: the
        layer's cached experts are dropped first (every expert is read each time)."""
        self.done()
        self._settle()
        if reread:
            for key in [k for k in self._lru if k[0] == layer]:
                self._drop(key, self._lru.pop(key))
        for e in experts:
            if (layer, e) not in self.plans:
                raise EndorError(f"layer {layer} routes tokens to expert {e}, which the file does not hold")
        self._wanted = [(layer, e) for e in experts]
        self._hit = {k for k in self._wanted if k in self._lru or k in self._loading}
        self.stats.routed += len(self._wanted)
        self.stats.hits += len(self._hit)
        guessed = {k for k in self._guessed if k[0] == layer}
        self.stats.prefetch_hits += len(guessed & set(self._wanted))
        self._guessed -= guessed  # guessed right or wrong: judged now
        for key in self._wanted:
            if key in self._lru:
                self._lru.move_to_end(key)
        self._start_loads(self._wanted)

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """A guess of the experts ``layer`` will be routed to: read them behind the loads of the
        layer in progress, into slots it does not need (evicting nothing it is using)."""
        keys = [(layer, e) for e in experts if (layer, e) in self.plans]
        started = self._start_loads(keys)
        self._guessed.update(started)
        self.stats.prefetched += len(started)

    def _start_loads(self, keys: list[Key]) -> list[Key]:
        """Submit loads for the experts of ``keys`` not resident, in order, while a slot can be
        had; returns those submitted."""
        started = []
        for key in keys:
            if key in self._lru or key in self._loading:
                continue
            slot = self._take_slot()
            if slot is None:
                break
            self._submit(key, slot)
            started.append(key)
        return started

    def _submit(self, key: Key, slot: int) -> None:
        self._loading[key] = (slot, self._loader.submit(self._load, key, slot))
        self.stats.read += 1
        self.stats.nbytes += self.plans[key].length

    def _take_slot(self, spare_wanted: bool = True) -> int | None:
        """A free slot, or the least recently used expert's that the forward does not need (with
        ``spare_wanted=False``, or else one it needs later: it will be read again)."""
        if self._free:
            return self._free.pop()
        busy = set(self._wanted) if spare_wanted else set()
        busy.add(self._current)
        held: dict[int, int] = {}  # layer -> evictable experts it holds
        for key in self._lru:
            if key not in busy:
                held[key[0]] = held.get(key[0], 0) + 1
        if not held:
            return None
        # The layer holding the most gives up its least recently used expert (the asking layer
        # first among equals). A plain LRU over all layers evicts, in the cyclic order layers
        # run, exactly the experts of the next layers: no hit at all once the cache is smaller
        # than the layers' working set. Balanced per layer, each layer keeps its latest experts,
        # which the next token's routing hits (docs/performance.md measures both).
        asking = self._current[0] if self._current is not None else \
            (self._wanted[0][0] if self._wanted else None)
        most = max(held.values())
        layer = asking if held.get(asking) == most else next(i for i, n in held.items() if n == most)
        key = next(k for k in self._lru if k not in busy and (self.policy == "lru" or k[0] == layer))
        slot = self._lru.pop(key)
        self.backend.forget(self.plans[key], slot)
        self._guessed.discard(key)
        return slot

    def weight(self, layer: int, expert: int, name: str) -> torch.Tensor:
        """Expert ``expert``'s tensor ``name`` (e.g. ``gate_up_proj``), resident."""
        key = (layer, expert)
        if key != self._current:
            if key not in self._wanted:
                raise EndorError(
                    f"layer {layer}: the experts' forward asked for expert {expert}, which the router "
                    f"did not pick for it (or it ran outside the streamed model's forward); a "
                    f"streamed experts parameter is only indexed by routed experts")
            self._finish_current()
            self._wanted.remove(key)
            self._current = key
            self._start_loads(self._wanted)  # the slot just finished with may take the next one
            if key not in self._lru and key not in self._loading:  # evicted for the one before
                if key in self._hit:
                    self._hit.discard(key)
                    self.stats.hits -= 1
                slot = self._take_slot(spare_wanted=False)
                self._submit(key, slot if slot is not None else self._steal_load())
            if key in self._loading:
                slot, job = self._loading.pop(key)
                t0 = time.perf_counter()
                try:
                    self.stats.read_s += job.result()
                except BaseException:
                    self._current = None
                    self._drop(key, slot)
                    raise
                finally:
                    self.stats.wait_s += time.perf_counter() - t0
                self._lru[key] = slot
            self._lru.move_to_end(key)
            self.backend.wait_ready(self.plans[key], self._lru[key])
        return self.backend.tensors(self.plans[key], self._lru[key])[name]

    def _drop(self, key: Key, slot: int) -> None:
        """``key`` no longer holds ``slot``: the slot is free."""
        self.backend.forget(self.plans[key], slot)
        self._free.append(slot)
        self._guessed.discard(key)

    def _steal_load(self) -> int:
        """The slot of a load in flight, once it is over or cancelled: the latest guess's first (a
        load the forward does not want is a guess; the latest is the likeliest not started), else
        the last-wanted expert's (the forward needs the current expert first; that one is read
        again when its turn comes). A load cancelled before it started read nothing and is not
        counted."""
        guess = next((k for k in reversed(self._loading) if k not in self._wanted), None)
        key = guess or next(k for k in reversed(self._wanted) if k in self._loading)
        slot, job = self._loading.pop(key)
        if job.cancel():
            self.stats.read -= 1
            self.stats.nbytes -= self.plans[key].length
            self.stats.prefetched -= guess is not None
        else:
            job.exception()  # waits; its error is no one's: the expert is read again when wanted
        self.backend.forget(self.plans[key], slot)
        self._guessed.discard(key)
        return slot

    def _finish_current(self) -> None:
        if self._current is not None and self._current in self._lru:
            self.backend.mark_free(self.plans[self._current], self._lru[self._current])
        self._current = None

    def _settle(self) -> None:
        """Loads that have finished become cached experts (a failed one frees its slot: its
        expert is read again if a forward wants it, and then fails by name)."""
        for key, (slot, job) in list(self._loading.items()):
            if key in self._wanted or not job.done():
                continue
            del self._loading[key]
            if job.exception() is not None:
                self._drop(key, slot)
            else:
                self.stats.read_s += job.result()
                self._lru[key] = slot

    def done(self) -> None:
        """The experts module's forward ended (or failed): nothing is pinned any more. Its loads
        are waited for and cached; guesses of the next layer go on loading."""
        self._finish_current()
        wanted, self._wanted, self._hit = self._wanted, [], set()
        for key in wanted:
            if key in self._loading:
                self._loading[key][1].exception()  # waits; a failure is settled below
        self._settle()

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)


class ExpertTable:
    """Stands in for a fused experts parameter (``[E, ...]``) of a streamed MoE layer: indexing
    it by an expert gives that expert's slice from the :class:`ExpertCache`."""

    def __init__(self, cache: ExpertCache, layer: int, name: str, shape: tuple[int, ...],
                 dtype: torch.dtype, device: torch.device):
        self.cache, self.layer, self.name = cache, layer, name
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, device

    def __getitem__(self, expert) -> torch.Tensor:
        if isinstance(expert, torch.Tensor) and expert.numel() == 1:
            expert = int(expert)
        if not isinstance(expert, int):
            raise EndorError(f"layer {self.layer}: the streamed experts parameter {self.name} is "
                             f"indexed by one expert at a time, not {type(expert).__name__}")
        return self.cache.weight(self.layer, expert, self.name)

    def __repr__(self) -> str:
        return f"<ExpertTable layer {self.layer} {self.name} {list(self.shape)} {self.dtype}>"


def add_expert_arguments(parser) -> None:
    """The expert options of ``endor-gds run`` and ``serve`` (mixture-of-experts files)."""
    parser.add_argument("--experts", choices=("routed", "all"), default="routed",
                        help="mixture-of-experts files: read the routed experts (default) or every expert")
    parser.add_argument("--expert-cache", type=int, default=None,
                        help="experts kept decoded (default: as many as one layer has)")
    parser.add_argument("--expert-prefetch", action="store_true",
                        help="read the next layer's likely experts ahead (its router applied early)")


def expert_options(args) -> dict:
    """``from_pretrained`` keywords from the options :func:`add_expert_arguments` added."""
    return {"experts": args.experts, "expert_cache": args.expert_cache, "expert_prefetch": args.expert_prefetch}
