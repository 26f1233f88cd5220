"""Continuous batching over a streaming model: one weight pass per step for every request in flight.

When the weights stream from storage a forward step costs about the same for one sequence as for
sixteen (the bytes are the bill, not the FLOPs), so every request that arrives while others are
generating joins them at the next step and leaves when it is done. The batching itself is
transformers' continuous batching (``model.init_continuous_batching``: paged KV cache, requests
joining and leaving between steps, per-request temperature / top-k / top-p); the streaming
runtime's per-layer hooks swap the weights in under it as for ``generate()``.

What this module adds: admission (at most ``max_batch`` requests in the batch, ``max_queue``
waiting, anything beyond is a :class:`QueueFullError`), one thread that hands the manager's results
to each request's asyncio queue, cancellation when a client goes away, and recovery: a forward
step that raises (a decode or checksum error) fails the requests of that step and ends the
manager's loop, so the next request starts a new manager and the server keeps serving.

Tensor parallelism (a model loaded in a process group, :mod:`endor_gds.stream.parallel`): every
rank builds an Engine, and transformers' continuous batching runs tensor-parallel itself — given
the model's device mesh and plan, rank 0 (the driver) takes the requests and broadcasts each step's
new and cancelled requests, so every rank schedules the same batch, and its paged cache holds only
the rank's own key/value heads. The other ranks serve nothing: :meth:`Engine.follow` waits for the
driver's loop to end. A tensor-parallel loop that fails is not restarted (the ranks would have to
start a new one together): its requests fail and the next ones are refused by name.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import torch

from endor_gds.errors import ArgumentError, EndorError

__all__ = ["Engine", "SamplingParams", "Chunk", "QueueFullError", "GenerationError"]


class QueueFullError(EndorError):
    """``max_batch`` requests are generating and ``max_queue`` are waiting: try again later."""


class GenerationError(EndorError):
    """A forward step failed (decode or checksum error, ...): the requests of that step end with it."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0


@dataclass
class Chunk:
    """New tokens of one request; ``finish_reason`` ("stop" at end-of-sequence, "length" at
    ``max_tokens``) on the last one."""

    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class _Request:
    rid: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    sent: int = 0  # tokens already handed out
    done: bool = False


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    requests: int = 0
    failed: int = 0
    rejected: int = 0
    tokens: int = 0
    restarts: int = 0


def _tensor_parallel_batching(model) -> bool:
    """Give a model split over a process group what transformers' continuous batching reads to run
    tensor-parallel (its device mesh and plan); whether it is split."""
    rt = getattr(model, "endor", None)
    tp = getattr(rt, "tp", None)
    if tp is None or rt.rank is None:
        return False
    from torch.distributed.device_mesh import DeviceMesh  # noqa: PLC0415 - only tensor-parallel servers

    kv = rt.shards.kv_heads
    if kv % tp.size:
        # the paged cache divides the key/value heads among the ranks; replicated heads it cannot hold
        fits = ", ".join(str(n) for n in range(1, kv + 1) if kv % n == 0)
        raise ArgumentError(f"serving over {tp.size} ranks needs num_key_value_heads ({kv}) to divide among "
                            f"them (transformers' paged cache splits them): serve it over {fits} rank(s), or "
                            f"generate with `torchrun ... -m endor_gds run`")
    device = rt.device.type
    model._device_mesh = DeviceMesh.from_group(tp.group, device) if tp.group is not None else \
        DeviceMesh(device, list(range(tp.size)))
    # the plan's keys as transformers writes them (its cache looks for layers.*.self_attn.k_proj)
    model.tp_plan = {f"{rt.recipe.layers}.*.{module}": style for module, style in rt.shards.styles.items()}
    return True


def _kv_bytes_per_token(model) -> int:
    """Keys and values of one token over every layer, in the model's dtype."""
    from transformers.generation.continuous_batching.utils import (  # noqa: PLC0415 - heavy; the server's only
        find_head_dim,
        find_num_key_value_heads,
    )

    cfg = model.config
    layers = int(getattr(cfg, "num_hidden_layers", 0) or len(model.model.layers))
    return 2 * layers * find_num_key_value_heads(cfg) * find_head_dim(cfg) * model.dtype.itemsize


async def _name_failure(manager, message: str) -> str:
    """``ChecksumError: ...`` rather than the bare message the batching loop passes on: the loop
    records the exception itself just after failing the requests, so wait a moment for it."""
    for _ in range(20):
        err = manager.background_thread_status.fatal_error
        if err is not None:
            return f"{type(err).__name__}: {err}"
        await asyncio.sleep(0.05)
    return message


class Engine:
    """Requests in, tokens out, one forward step for all of them (see module docstring)."""

    def __init__(self, model, *, eos_token_id, pad_token_id: int = 0, max_batch: int = 32,
                 max_queue: int = 256, max_batch_tokens: int = 2048, seed: int = 0,
                 kv_cache_bytes: int = 2 << 30):
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0),
                                 ("max_batch_tokens", max_batch_tokens, 16)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ArgumentError(f"{name} must be a whole number >= {low}, got {value!r}")
        self.model = model
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.max_batch, self.max_queue, self.max_batch_tokens, self.seed = max_batch, max_queue, max_batch_tokens, seed
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self.vocab_size = int(model.config.vocab_size)
        # The KV cache is paged and shared by the batch; it is not part of max_memory, so it gets
        # its own budget (a 7B model at 32 requests x 4096 positions would need 69 GB).
        self.page = 16
        self.parallel = _tensor_parallel_batching(model)
        # per rank: a tensor-parallel rank's cache holds its share of the key/value heads
        self.kv_bytes_per_token = _kv_bytes_per_token(model) // (model.endor.tp.size if self.parallel else 1)
        # no more than the whole batch at full length can use (the loop's own buffers grow with it)
        self.cache_tokens = min(kv_cache_bytes // self.kv_bytes_per_token, max_batch * self.max_positions)
        self.cache_tokens = self.cache_tokens // self.page * self.page
        if self.cache_tokens < self.page:
            raise ArgumentError(f"kv_cache_bytes={kv_cache_bytes} holds no page of {self.page} tokens "
                                f"({self.kv_bytes_per_token} bytes per token for this model)")
        self.kv_cache_bytes = self.cache_tokens * self.kv_bytes_per_token
        self.stats = Stats()
        self._requests: dict[str, _Request] = {}
        self._lock = threading.Lock()  # _requests, the manager and the counters below
        self._active = 0  # requests in the manager's batch
        self._waiting = 0  # requests waiting for a slot
        self._slots: asyncio.Semaphore | None = None  # made on the server's event loop
        self._manager = None
        self._closed = False
        self._counter = 0
        self._start_manager()
        self._dispatcher = threading.Thread(target=self._dispatch, name="endor-serve-dispatch", daemon=True)
        self._dispatcher.start()

    # -- the continuous batching manager --------------------------------------------------------

    def _start_manager(self) -> None:
        from transformers import GenerationConfig  # noqa: PLC0415 - heavy; the server needs it, the CLI's parser does not
        from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: PLC0415 - as above

        # Sampling in every request: greedy is top_k=1, which keeps only the largest logit, so
        # the sample is the argmax. The processors exist only when the config's values are not
        # their defaults; each request passes its own values, so these are never used as such.
        gen = GenerationConfig(do_sample=True, temperature=0.5, top_k=self.vocab_size, top_p=0.5,
                               max_new_tokens=16, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)
        # paged: a request takes the pages it fills; requests wait when the cache is full
        cbc = ContinuousBatchingConfig(page_size=self.page, num_blocks=self.cache_tokens // self.page,
                                       max_batch_tokens=self.max_batch_tokens, seed=self.seed,
                                       per_request_processors=True)
        with torch.inference_mode():
            self._manager = self.model.init_continuous_batching(generation_config=gen, continuous_batching_config=cbc)
            self._manager.start()

    def _manager_alive(self):
        """The running manager; a new one when the last forward error ended the old one's loop."""
        with self._lock:
            if self._manager is None or not self._manager.is_running():
                if self.parallel and self._manager is not None:
                    raise GenerationError("the tensor-parallel batching loop ended after a failed step, and the "
                                          "ranks cannot start a new one alone: restart the server")
                if self._manager is not None:
                    self._manager.stop(block=True, timeout=5)
                    self.stats.restarts += 1
                self._start_manager()
            return self._manager

    def _dispatch(self) -> None:
        """One consumer of the manager's results, each handed to its request's asyncio queue."""
        while not self._closed:
            manager = self._manager
            try:
                out = manager.get_result(timeout=0.05) if manager is not None else None
            except Exception:  # noqa: BLE001 - a manager torn down under us: take the next one
                out = None
            if out is None:
                continue
            with self._lock:
                req = self._requests.get(out.request_id)
            if req is not None and not req.done:
                req.loop.call_soon_threadsafe(req.queue.put_nowait, out)

    # -- requests ---------------------------------------------------------------------------------

    def check_room(self) -> None:
        """QueueFullError now, before a response starts, when no request could wait for a slot."""
        with self._lock:
            if self._active + self._waiting >= self.max_batch + self.max_queue:
                self.stats.rejected += 1
                raise QueueFullError(f"{self._active} requests are generating and {self._waiting} waiting "
                                     f"(max_batch {self.max_batch}, max_queue {self.max_queue})")

    async def generate(self, prompt_ids: list[int], params: SamplingParams):
        """Yield :class:`Chunk` s of new tokens as the steps make them. Leaving the loop early (a
        stop string found, a client gone) cancels the request and frees its slot at once."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_batch)
        self.check_room()
        with self._lock:
            self._waiting += 1
        try:
            await self._slots.acquire()  # a client gone while waiting never took a slot
        finally:
            with self._lock:
                self._waiting -= 1
        req = None
        try:
            with self._lock:
                self._active += 1
                self._counter += 1
                rid = f"r{self._counter}"
                req = _Request(rid, asyncio.get_running_loop(), asyncio.Queue())
                self._requests[rid] = req
                self.stats.requests += 1
            greedy = params.temperature == 0
            manager = self._manager_alive()
            added = manager.add_request(list(prompt_ids), request_id=rid, max_new_tokens=params.max_tokens,
                                        streaming=True, eos_token_id=self.eos_token_id,
                                        temperature=1.0 if greedy else float(params.temperature),
                                        top_k=1 if greedy else self.vocab_size, top_p=float(params.top_p))
            if added is None:
                raise GenerationError("the batching loop is not accepting requests (shutting down)")
            while True:
                out = await req.queue.get()
                if out.error:
                    self.stats.failed += 1
                    raise GenerationError(await _name_failure(manager, out.error))
                new = out.generated_tokens[req.sent:]
                req.sent += len(new)
                self.stats.tokens += len(new)
                if out.is_finished():
                    req.done = True
                    last = out.generated_tokens[-1] if out.generated_tokens else None
                    eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
                    if last in eos:
                        new = new[:-1]  # end-of-sequence is not part of the text
                    yield Chunk(new, "stop" if last in eos else "length")
                    return
                if new:
                    yield Chunk(new)
        finally:
            if req is not None:
                with self._lock:
                    self._requests.pop(req.rid, None)
                    self._active -= 1
                if not req.done and self._manager is not None:
                    self._manager.cancel_request(req.rid)  # its pages go back to the cache now
            self._slots.release()

    def follow(self) -> None:
        """On a tensor-parallel rank other than the driver: take part in every step until the
        driver's loop stops (its ``close``), then close."""
        while self._manager.is_running():
            time.sleep(0.1)
        self.close()

    def metrics(self) -> dict:
        with self._lock:
            return {"active": self._active, "waiting": self._waiting, **vars(self.stats)}

    def close(self) -> None:
        self._closed = True
        if self._manager is not None:
            self._manager.stop(block=True, timeout=30)
        self._dispatcher.join(timeout=5)
