"""The prefetch pipeline: read → decode → compute, each on its own thread, over reused buffer sets.

A *buffer set* is a staging buffer (one layer's extent, as stored) plus a dense arena (the
layer's bitmap tensors rebuilt). ``depth`` sets exist, allocated once per model. A set is taken
for layer ``j`` when its read is submitted and returned when layer ``j``'s forward has finished
with it; a new job is submitted whenever a set is free, so with two sets the reader starts layer
``j+1`` as soon as layer ``j-1`` has been computed — reads run back to back and the link never
idles while decode and compute are shorter than a read. ::

    reader thread   R(j)──────R(j+1)─────R(j+2)─────
    decoder thread       D(j)       D(j+1)     D(j+2)
    forward (main)          C(j)        C(j+1)      C(j+2)

Dense-encoded tensors (norms, biases, and every tensor of an unpruned file) are not copied: the
model's parameters are views of the staging buffer. Bitmap tensors are views of the arena.

On the CPU the decoder is :class:`~endor_gds.decode.cpu.CpuDecoder`. On a GPU the decode kernel
runs on its own stream and signals a CUDA event the compute stream waits on; a "free" event
recorded after the layer's forward tells the next user of the set when the GPU is done with it.
Layers are expected in a cyclic order (0..L-1, 0..L-1, ... as ``generate`` runs them); any other
order drains the queue and restarts from the requested layer, so correctness never depends on it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from endor_gds.errors import EndorError
from endor_gds.stream.backends import Backend
from endor_gds.stream.integrity import ChunkedCheck, ExtentCheck
from endor_gds.stream.plan import LayerPlan, LayerTimes

__all__ = ["Pipeline"]


@dataclass
class _Job:
    plan: LayerPlan
    set: int
    times: LayerTimes
    read: Future | None = None
    ready: Future | None = None
    early: ChunkedCheck | None = None  # the checksums checked as the extent's pieces arrived
    dense: bool = True  # every bitmap tensor decoded (False: the fused weights were left out)
    t_forward: float = 0.0


class Pipeline:
    """Owns the buffer sets and the two worker threads; the runtime's hooks call ``acquire``/``release``.

    ``backend`` does the device-specific work: the calls of :class:`endor_gds.stream.backends.Backend`,
    each on the thread its docstring names. ``check`` (when reads are checked) runs on the decoder
    thread between a layer's read and its decode.
    """

    def __init__(self, plans: list[LayerPlan], backend: Backend, depth: int, *,
                 check: ExtentCheck | None = None, on_layer_done=None):
        if depth < 1:
            raise ValueError(f"prefetch_depth must be >= 1, got {depth}")
        self.plans = {p.index: p for p in plans}
        self.order = sorted(self.plans)
        self.backend = backend
        self.depth = depth
        self.check = check  # None: reads are not checked (verify_reads=False, or the RAM tier)
        self.on_layer_done = on_layer_done
        # Whether the next layers will be wanted dense: the last acquire's answer. A prefetched
        # layer decoded for a fused step is completed on the forward thread if the step wants it
        # dense (the step after a prompt's prefill, say), so a wrong guess costs time, never output.
        self._want_dense = True
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="endor-read")
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="endor-decode")
        self._free: deque[int] = deque(range(depth))
        self._pending: deque[_Job] = deque()
        self._in_use: _Job | None = None
        self._next = 0  # position in self.order of the next layer to submit
        self._lock = threading.Lock()
        self._closed = False

    # -- worker side ----------------------------------------------------------------------------

    def _read(self, job: _Job) -> None:
        t0 = time.perf_counter()
        job.early = self.backend.read_checked(job.plan, job.set, self.check)
        job.times.read_s = time.perf_counter() - t0
        job.times.nbytes = job.plan.length

    def _decode(self, job: _Job) -> None:
        job.read.result()  # re-raises a read error in this job
        t0 = time.perf_counter()
        if self.check is not None:  # done as the pieces arrived where the reader reports them
            self.check.check(job.plan, lambda: self.backend.first_mismatch(job.plan, job.set),
                             lambda: self.backend.reread(job.plan, job.set), early=job.early)
        # on a GPU this also moves a host-read extent over
        job.dense = self.backend.decode(job.plan, job.set, dense=self._want_dense)
        job.times.decode_s = time.perf_counter() - t0

    def _submit_locked(self) -> None:
        """Start jobs for the next layers in cyclic order while a buffer set is free."""
        while self._free and self.order and not self._closed:
            s = self._free.popleft()
            layer = self.order[self._next]
            self._next = (self._next + 1) % len(self.order)
            job = _Job(self.plans[layer], s, LayerTimes(layer))
            job.read = self._reader.submit(self._read, job)
            job.ready = self._decoder.submit(self._decode, job)
            self._pending.append(job)

    def _drain_locked(self) -> None:
        """Wait out and discard every pending job (their errors belong to no one now)."""
        while self._pending:
            job = self._pending.popleft()
            try:
                job.ready.result()
            except BaseException:  # noqa: BLE001 - a discarded prefetch; its error is irrelevant
                pass
            self._free.append(job.set)
        if self._in_use is not None:
            self._recycle_locked(self._in_use)

    def _recycle_locked(self, job: _Job) -> None:
        """Give the set of the job in use back (after its forward, or after that forward failed)."""
        self.backend.mark_free(job.plan, job.set)
        self._free.append(job.set)
        self._in_use = None

    # -- forward side (hooks) -------------------------------------------------------------------

    def acquire(self, layer: int, dense: bool = True) -> dict[str, torch.Tensor]:
        """Block until ``layer`` is ready; returns its tensors by relative name (valid until release).
        ``dense=False``: the weights the backend multiplies fused may be left undecoded (their
        tensors are then not to be used: the caller takes ``backend.fused_weights``)."""
        t0 = time.perf_counter()
        self._want_dense = dense
        with self._lock:
            if self._closed:
                raise EndorError("the streaming pipeline is closed")
            if self._in_use is not None:  # previous forward raised before its release
                self._recycle_locked(self._in_use)
            if not self._pending or self._pending[0].plan.index != layer:
                self._drain_locked()
                self._next = self.order.index(layer)
            self._submit_locked()
            job = self._pending.popleft()
            self._in_use = job
        try:
            job.ready.result()
            if dense and not job.dense:  # decoded for a fused step, wanted dense: finish here
                t1 = time.perf_counter()
                job.dense = self.backend.decode(job.plan, job.set)
                job.times.decode_s += time.perf_counter() - t1
            self.backend.wait_ready(job.plan, job.set)
        except BaseException:
            with self._lock:
                if self._in_use is job:
                    self._recycle_locked(job)
                # The layers prefetched behind a failed one are not used: their reads may have
                # overlapped whatever failed this one (a file rewritten in place, a failing
                # drive). Waited out now, so the next step reads afresh.
                self._drain_locked()
            raise
        job.times.stall_s = time.perf_counter() - t0
        job.t_forward = time.perf_counter()
        return self.backend.tensors(job.plan, job.set)

    def fused_weights(self) -> dict:
        """The fused weights of the layer in use (acquired with ``dense=False``)."""
        job = self._in_use
        return {} if job is None else self.backend.fused_weights(job.plan, job.set)

    def release(self, layer: int) -> None:
        """The forward of ``layer`` is done with its tensors: recycle the set, start the next read."""
        with self._lock:
            job = self._in_use
            if job is None or job.plan.index != layer:
                return
            job.times.compute_s = time.perf_counter() - job.t_forward
            self._recycle_locked(job)
            self._submit_locked()
        if self.on_layer_done is not None:
            self.on_layer_done(job.times)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._drain_locked()
            self._closed = True
        self._reader.shutdown(wait=True)
        self._decoder.shutdown(wait=True)
