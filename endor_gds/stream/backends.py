"""Where a streamed layer's bytes live and how they become dense weights: CPU and CUDA backends.

Both implement :class:`Backend`, the contract :class:`~endor_gds.stream.pipeline.Pipeline` calls
from its threads, and ``load(plan)``, which reads and decodes an extent once into buffers of its
own, for resident tensors and resident layers. All buffers are allocated when the backend is
built; nothing is allocated per token.

``tier="ram"``: the streamed extents are read once into one host buffer (pinned on a GPU host),
and a layer's "read" is then a view of it (CPU) or a host-to-device copy of it (GPU).

Checked reads (:mod:`endor_gds.stream.integrity`): ``first_mismatch(plan, s)`` checks a staged
extent where it lies, in host memory by default; :class:`CudaBackend` checks what KvikIO read into
device memory on the GPU (:mod:`endor_gds.decode.gpu_crc`), on a stream of its own.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import torch

from endor_gds.decode.cpu import CpuDecoder
from endor_gds.decode.fused import FusedWeight
from endor_gds.errors import DecodeError
from endor_gds.read.buffers import aligned_empty, host_buffer
from endor_gds.read.readers import Reader
from endor_gds.stream.integrity import ChunkedCheck, ExtentCheck, Mismatch, device_mismatch, host_mismatch
from endor_gds.stream.plan import LayerPlan, staging_views

__all__ = ["Backend", "CpuBackend", "CudaBackend", "RamImage", "crc_segments"]


class Backend(ABC):
    """Where a streamed layer's bytes live: the calls the pipeline makes, and on which thread.

    ``s`` is a buffer set (``0 <= s < depth``); a set belongs to one layer from its ``read`` to its
    ``mark_free``.
    """

    @abstractmethod
    def read(self, plan: LayerPlan, s: int, on_chunk=None) -> None:
        """Reader thread: fill set ``s``'s staging buffer with the layer's extent; ``on_chunk``
        (only where :meth:`chunked_reads`) is called on a reader thread as pieces arrive."""

    def chunked_reads(self) -> bool:
        """Whether :meth:`read` reads into the host bytes ``staging_view`` sees, in pieces it can
        report: then the checksums are checked as the pieces arrive."""
        return False

    def read_checked(self, plan: LayerPlan, s: int, check: ExtentCheck | None) -> ChunkedCheck | None:
        """Reader thread: :meth:`read`, with ``check``'s checks of the pieces as they arrive where
        the reads are chunked; returns that early check, for ``check.check(..., early=...)``
        after the read (None: nothing was checked yet)."""
        if check is None or not self.chunked_reads():
            self.read(plan, s)
            return None
        early = check.for_read(plan, self.staging_view(plan, s))
        self.read(plan, s, early.on_chunk)
        return early

    @abstractmethod
    def staging_view(self, plan: LayerPlan, s: int) -> np.ndarray:
        """Decoder thread: host bytes of the staged extent (the host check reads them)."""

    def first_mismatch(self, plan: LayerPlan, s: int) -> Mismatch | None:
        """Decoder thread: check set ``s``'s staged extent where it lies; its first segment that
        fails its CRC-32C, or None (here: on the host, over ``staging_view``)."""
        return host_mismatch(plan, self.staging_view(plan, s))

    ram: RamImage | None = None  # the RAM tier, when the streamed extents are held in host memory
    # per layer, the weights the forward may multiply fused (fused_weights); none unless a backend
    # sets its own (CpuBackend), and never changed in place
    fused: Mapping[int, frozenset[str]] = MappingProxyType({})

    def reread(self, plan: LayerPlan, s: int) -> None:
        """Decoder thread: read the extent again from storage into set ``s`` (its checksum
        failed: a transient fault on the way in heals this way)."""
        if self.ram is not None:
            self.ram.reload(plan)
        else:
            self.read(plan, s)

    @abstractmethod
    def decode(self, plan: LayerPlan, s: int, dense: bool = True) -> bool:
        """Decoder thread (or the forward thread, when a step needs what was left out): rebuild
        the layer's bitmap tensors into set ``s``'s arena; with ``dense=False`` the backend may
        leave the weights it multiplies fused undecoded. Returns whether all of them are decoded."""

    def fused_weights(self, plan: LayerPlan, s: int) -> dict:
        """Forward thread: the weights ``decode(dense=False)`` left out, as
        :class:`~endor_gds.decode.fused.FusedWeight` by relative name (none by default)."""
        return {}

    @abstractmethod
    def wait_ready(self, plan: LayerPlan, s: int) -> None:
        """Forward thread: make compute wait for the decode (a GPU event; nothing on the CPU)."""

    @abstractmethod
    def tensors(self, plan: LayerPlan, s: int) -> dict[str, torch.Tensor]:
        """Forward thread: the layer's tensors as torch views (built once per layer and set)."""

    @abstractmethod
    def mark_free(self, plan: LayerPlan, s: int) -> None:
        """Forward thread: the layer's forward is done with set ``s``."""

    @abstractmethod
    def check_decodes(self) -> None:
        """Forward thread, end of a step: raise any decode error of that step."""

    def forget(self, plan: LayerPlan, s: int) -> None:
        """Set ``s`` will hold another extent than ``plan``'s: drop what was prepared for the pair
        (an expert cache cycles many extents through few sets; the layers' pipeline never calls it)."""
        for memo in self._memos():
            for key in [k for k in memo if k[:2] == (plan.index, s)]:
                del memo[key]

    def _memos(self) -> tuple[dict, ...]:
        return ()


class RamImage:
    """The compressed extents of the streamed layers, read once into one host buffer."""

    def __init__(self, plans: list[LayerPlan], reader: Reader, *, pinned: bool = False,
                 check: ExtentCheck | None = None):
        self.reader = reader
        self.offsets: dict[int, int] = {}
        total = 0
        for p in plans:
            self.offsets[p.index] = total
            total += p.length
        self.nbytes = total
        if pinned:
            self.buffer = host_buffer(total, pinned=True)
        else:
            self.buffer = aligned_empty(total)
        futures = [reader.pread((p.offset, p.length), self.buffer[self.offsets[p.index]:][: p.length])
                   for p in plans]
        for f in futures:
            f.get()
        if check is not None:  # once, here: the RAM tier is never read from storage again
            for p in plans:
                check.check(p, lambda p=p: host_mismatch(p, self.view(p)), lambda p=p: self.reload(p))

    def reload(self, plan: LayerPlan) -> None:
        """Read one extent again from storage into its place in the image."""
        self.reader.read((plan.offset, plan.length), self.view(plan))

    def view(self, plan: LayerPlan) -> np.ndarray:
        start = self.offsets[plan.index]
        return self.buffer[start:start + plan.length]


def _segment_bytes(staging, slot) -> dict:
    """Every segment of a slot as a byte range of its staging buffer (kind -> view, no copy)."""
    return {k: staging[off:off + slot.entry.segments[k].nbytes] for k, off in slot.segments.items()}


def _encoded(staging: np.ndarray, slot) -> tuple:
    """A decoded slot's (bitmap, values, tile offsets) over its staged bytes, no copies: raw
    values or a codec's streams; a dense exphuff tensor has neither bitmap nor tile offsets."""
    e = slot.entry
    segs = _segment_bytes(staging, slot)
    if e.encoding != "bitmap":
        return None, e.values(segs), None
    return segs["bitmap"].view("<u4"), e.values(segs), segs["tile_offsets"].view("<u4")


class CpuBackend(Backend):
    """Host memory: posix-direct reads into page-aligned staging, the C decoder into the arena.

    ``fused`` names, per layer, the weights the forward may multiply straight from their bitmap +
    values (:mod:`endor_gds.decode.fused`); ``decode(dense=False)`` leaves those out.
    """

    device = torch.device("cpu")

    def __init__(self, plans: list[LayerPlan], depth: int, reader: Reader | None,
                 decoder: CpuDecoder, ram: RamImage | None = None, check: ExtentCheck | None = None,
                 fused: dict[int, frozenset[str]] | None = None):
        self.reader, self.decoder, self.ram, self.check = reader, decoder, ram, check
        self.fused = fused or {}
        staging = max((p.length for p in plans), default=0)
        arena = max((p.arena_bytes for p in plans), default=0)
        self._staging = [] if ram is not None else [aligned_empty(staging) for _ in range(depth)]
        self._arena = [aligned_empty(arena) for _ in range(depth)] if arena else [None] * depth
        self.buffer_bytes = (0 if ram is not None else staging * depth) + arena * depth
        self._views: dict[tuple[int, int], dict] = {}
        self._items: dict[tuple[int, int, bool], object] = {}  # prepared decode work per (layer, set, dense)
        self._fused: dict[tuple[int, int], dict] = {}

    def staging_view(self, plan: LayerPlan, s: int) -> np.ndarray:
        return self.ram.view(plan) if self.ram is not None else self._staging[s][: plan.length]

    def _memos(self) -> tuple[dict, ...]:
        return self._views, self._items, self._fused

    def chunked_reads(self) -> bool:
        return self.ram is None and self.reader.chunked

    def read(self, plan: LayerPlan, s: int, on_chunk=None) -> None:
        if self.ram is None:
            self.reader.read((plan.offset, plan.length), self._staging[s], on_chunk)

    def _decode_items(self, staging: np.ndarray, arena: np.ndarray, plan: LayerPlan,
                      skip: frozenset[str] = frozenset()):
        items, labels = [], []
        for slot in plan.slots:
            if slot.arena_offset is None or slot.rel in skip:
                continue
            e = slot.entry
            out = arena[slot.arena_offset:slot.arena_offset + e.dense_nbytes]
            items.append((*_encoded(staging, slot), out.view(e.dtype.bits)))
            labels.append(f"{plan.where}: {e.name}")
        return items, labels

    def decode(self, plan: LayerPlan, s: int, dense: bool = True) -> bool:
        skip = frozenset() if dense else self.fused.get(plan.index, frozenset())
        if not plan.needs_decode:
            return True
        key = (plan.index, s, not skip)
        prepared = self._items.get(key)
        if prepared is None:
            items = self._decode_items(self.staging_view(plan, s), self._arena[s], plan, skip)
            prepared = self._items[key] = self.decoder.prepare(*items)
        self.decoder.run(prepared)
        return not skip

    def fused_weights(self, plan: LayerPlan, s: int) -> dict:
        key = (plan.index, s)
        weights = self._fused.get(key)
        if weights is None:  # checked and built once per (layer, set), like the decode work
            staging, names = self.staging_view(plan, s), self.fused.get(plan.index, frozenset())
            weights = self._fused[key] = {
                slot.rel: FusedWeight(*_encoded(staging, slot), slot.entry.shape, slot.entry.dtype.torch,
                                      f"{plan.where}: {slot.entry.name}")
                for slot in plan.slots if slot.rel in names}
        return weights

    def tensors(self, plan: LayerPlan, s: int) -> dict[str, torch.Tensor]:
        key = (plan.index, s)
        views = self._views.get(key)
        if views is None:
            arena = self._arena[s]
            views = staging_views(torch.from_numpy(self.staging_view(plan, s)), plan,
                                  None if arena is None else torch.from_numpy(arena))
            self._views[key] = views
        return views

    def wait_ready(self, plan: LayerPlan, s: int) -> None:
        pass  # the decoder thread has finished when its future resolves

    def mark_free(self, plan: LayerPlan, s: int) -> None:
        pass

    def check_decodes(self) -> None:
        pass  # the C decoder raises in the decoder thread, before the layer is handed out

    def load(self, plan: LayerPlan, reader: Reader) -> tuple[dict[str, torch.Tensor], int]:
        """Read and decode one extent into new buffers; returns its tensors and the bytes held."""
        staging = aligned_empty(plan.length)
        reader.read((plan.offset, plan.length), staging)
        if self.check is not None:
            self.check.check(plan, lambda: host_mismatch(plan, staging),
                             lambda: reader.read((plan.offset, plan.length), staging))
        arena = aligned_empty(plan.arena_bytes) if plan.arena_bytes else None
        if plan.needs_decode:
            self.decoder.decode(*self._decode_items(staging, arena, plan))
        return _kept(staging_views(torch.from_numpy(staging), plan,
                                   None if arena is None else torch.from_numpy(arena)), plan)


def _kept(views: dict, plan: LayerPlan) -> tuple[dict[str, torch.Tensor], int]:
    """A loaded extent's tensors and the bytes they hold. Where the extent was decoded, the few
    tensors still in its staging bytes (norms, biases) are copied out so that the staging buffer,
    the compressed extent, is freed: a loaded layer holds its dense weights, not both forms."""
    if not plan.needs_decode:
        return views, plan.length
    for slot in plan.slots:
        if slot.arena_offset is None:
            views[slot.rel] = views[slot.rel].clone()
    return views, plan.arena_bytes + sum(s.entry.dense_nbytes for s in plan.slots if s.arena_offset is None)


def crc_segments(plan: LayerPlan, base: int) -> list:
    """The GPU check's view of ``plan``'s extent staged at device address ``base``: a
    :class:`~endor_gds.decode.gpu_crc.GpuSegment` per ``plan.segment_crcs`` entry, in that order
    (the order :func:`~endor_gds.stream.integrity.device_mismatch` reads the result in)."""
    from endor_gds.decode.gpu_crc import GpuSegment  # noqa: PLC0415 - CuPy-free, but only GPU hosts need it

    return [GpuSegment(base + off, length, crc) for _, _, off, length, crc in plan.segment_crcs]


def _gpu_item(slot, base: int, out: int, label: str):
    """The kernel's view of a decoded slot whose extent is staged at device address ``base``:
    segment pointers and padded lengths (the readable capacity) and, for codecs expdict and
    exphuff, their streams and parameters; a dense exphuff tensor has no bitmap nor tile offsets."""
    from endor_gds.decode.gpu import GpuExpDict, GpuExpHuff, GpuItem  # noqa: PLC0415 - CuPy-free, but only GPU hosts need it

    e = slot.entry
    ptr = {k: base + off for k, off in slot.segments.items()}
    expdict = exphuff = None
    values = "values" if e.params is None else "residuals"  # the stream the kernel stages per value
    if e.expdict is not None:
        expdict = GpuExpDict(e.expdict, ptr["codes"], e.segments["codes"].length,
                             ptr["escape_offsets"], ptr["escape_positions"], ptr["escape_values"])
    if e.exphuff is not None:
        exphuff = GpuExpHuff(e.exphuff, ptr["bits"], e.segments["bits"].length, ptr["tile_bits"],
                             ptr["chunk_bits"])
    return GpuItem(bitmap_ptr=ptr.get("bitmap", 0), values_ptr=ptr[values],
                   values_capacity=e.segments[values].length, tile_offsets_ptr=ptr.get("tile_offsets", 0),
                   out_ptr=out, n=e.numel, nnz=e.nnz, elem_bytes=e.dtype.itemsize, label=label,
                   expdict=expdict, exphuff=exphuff)


class CudaBackend(Backend):
    """GPU memory: KvikIO reads straight into device staging, or host reads + async copies; the
    decode kernel runs on its own stream and the compute stream waits on an event, never the host.
    What KvikIO read into device staging is checked there, by the GPU check's kernels on a stream
    of their own (the decode waits on their event); host staging is checked on the host.
    """

    def __init__(self, plans: list[LayerPlan], depth: int, device: torch.device,
                 reader: Reader | None, decoder, ram: RamImage | None = None, check: ExtentCheck | None = None):
        self.device, self.reader, self.decoder, self.ram, self.check = device, reader, decoder, ram, check
        self.direct_to_device = reader is not None and reader.mode in ("gds", "kvikio-compat") \
            and ram is None
        staging = max((p.length for p in plans), default=0)
        arena = max((p.arena_bytes for p in plans), default=0)
        self._dev_staging = [torch.empty(staging, dtype=torch.uint8, device=device) for _ in range(depth)]
        self._arena = [torch.empty(arena, dtype=torch.uint8, device=device) if arena else None
                       for _ in range(depth)]
        # host staging only when bytes land in host memory first (posix reader, not the RAM tier)
        self._host_staging = [host_buffer(staging, pinned=True) for _ in range(depth)] \
            if ram is None and not self.direct_to_device else []
        self.buffer_bytes = (staging + arena) * depth
        self.stream = torch.cuda.Stream(device=device)
        self._ready = [torch.cuda.Event() for _ in range(depth)]
        self._free = [torch.cuda.Event() for _ in range(depth)]
        self._copied = [torch.cuda.Event() for _ in range(depth)]  # host staging may be reused
        self._views: dict[tuple[int, int], dict] = {}
        self._tables: dict[tuple[int, int], object] = {}
        self._copies: dict[tuple[int, int], tuple] = {}  # (host source, device staging) tensors
        # The GPU check of device staging: its own stream, so it starts as soon as KvikIO's read
        # returns (the read is synchronous: the bytes are in device memory), behind no compute and
        # no decode; set s's next decode waits on _checked[s]. The checker and its tables (one per
        # layer and set, like the decode tables) are built at the first check.
        self._check_stream = torch.cuda.Stream(device=device) if check is not None else None
        self._checked = [torch.cuda.Event() for _ in range(depth)]
        self._crc = None
        self._crc_tables: dict[tuple[int, int], object] = {}
        # Decode errors are read after the fact, never by a host sync per layer: such a sync
        # holds the forward thread until the GPU has copied and decoded the layer, so the host
        # cannot queue compute ahead of the copies. A layer's forward uses its weights before
        # the kernel's error word is read; the step's end (check_decodes) raises, so the
        # step's output never reaches the caller.
        self._lock = threading.Lock()
        self._consumed: list = []  # tables handed to a forward since the last check_decodes
        self._error: DecodeError | None = None  # first error read, raised by check_decodes

    def _memos(self) -> tuple[dict, ...]:
        return self._views, self._tables, self._copies, self._crc_tables

    def _host_source(self, plan: LayerPlan, s: int):
        return self.ram.view(plan) if self.ram is not None else self._host_staging[s][: plan.length]

    def staging_view(self, plan: LayerPlan, s: int) -> np.ndarray:
        if self.direct_to_device:  # a copy, for tools and tests: the checks never ask for it
            return self._dev_staging[s][: plan.length].cpu().numpy()
        return np.asarray(self._host_source(plan, s))

    def first_mismatch(self, plan: LayerPlan, s: int) -> Mismatch | None:
        if not self.direct_to_device:
            return super().first_mismatch(plan, s)
        key = (plan.index, s)
        table = self._crc_tables.get(key)
        if table is None:
            table = self._crc_tables[key] = self._crc_checker().make_table(
                crc_segments(plan, self._dev_staging[s].data_ptr()))
        return self._device_mismatch(plan, table, self._checked[s])

    def _crc_checker(self):
        if self._crc is None:
            from endor_gds.decode.gpu_crc import GpuCrc  # noqa: PLC0415 - needs cupy; loaded on GPU hosts only

            self._crc = GpuCrc(self.device.index or 0)
        return self._crc

    def _device_mismatch(self, plan: LayerPlan, table, checked=None) -> Mismatch | None:
        """The GPU check of ``table``'s staging, launched on the check stream, waited for here (the
        decoder or loader thread, never the forward thread); ``checked`` is recorded after it."""
        crc = self._crc_checker()
        crc.launch(table, self._check_stream)
        if checked is not None:
            checked.record(self._check_stream)
        return device_mismatch(plan, crc.result(table))

    def chunked_reads(self) -> bool:
        return self.ram is None and not self.direct_to_device and self.reader.chunked

    def read(self, plan: LayerPlan, s: int, on_chunk=None) -> None:
        if self.ram is not None:
            return
        if self.direct_to_device:
            # KvikIO writes device memory outside any stream: wait until compute is done with it.
            self._free[s].synchronize()
            self.reader.read((plan.offset, plan.length), self._dev_staging[s][: plan.length])
        else:
            self._copied[s].synchronize()  # the previous host-to-device copy has left the buffer
            self.reader.read((plan.offset, plan.length), self._host_staging[s], on_chunk)

    def _table(self, plan: LayerPlan, s: int, staging: torch.Tensor, arena: torch.Tensor):
        base, out = staging.data_ptr(), arena.data_ptr()
        items = [_gpu_item(slot, base, out + slot.arena_offset, f"{plan.where}: {slot.entry.name}")
                 for slot in plan.slots if slot.arena_offset is not None]
        return self.decoder.make_table(items)

    def decode(self, plan: LayerPlan, s: int, dense: bool = True) -> bool:
        key = (plan.index, s)
        table = None
        if plan.needs_decode:
            table = self._tables.get(key)
            if table is None:
                table = self._tables[key] = self._table(plan, s, self._dev_staging[s], self._arena[s])
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self._free[s])  # the set's previous layer has been computed
            if self.direct_to_device and self._check_stream is not None:  # and passed the GPU check
                self.stream.wait_event(self._checked[s])
            if not self.direct_to_device:
                pair = self._copies.get(key)
                if pair is None:  # built once per (layer, set), like the tables and views
                    pair = self._copies[key] = (torch.from_numpy(np.asarray(self._host_source(plan, s))),
                                                self._dev_staging[s][: plan.length])
                pair[1].copy_(pair[0], non_blocking=True)
                self._copied[s].record(self.stream)
            if table is not None:
                if table.launched:  # read the last launch's error word before the launch resets it
                    self._harvest(table)
                self.decoder.launch(table, self.stream)
            self._ready[s].record(self.stream)
        return True

    def _harvest(self, table) -> None:
        """Read ``table``'s error word (waits for its launch) and keep the first error."""
        try:
            self.decoder.check(table)
        except DecodeError as exc:
            with self._lock:
                self._error = self._error or exc

    def check_decodes(self) -> None:
        """Raise the first decode error among the layers computed since the last call."""
        with self._lock:
            consumed, self._consumed = self._consumed, []
        for table in consumed:
            self._harvest(table)
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def tensors(self, plan: LayerPlan, s: int) -> dict[str, torch.Tensor]:
        key = (plan.index, s)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = staging_views(self._dev_staging[s], plan, self._arena[s])
        return views

    def wait_ready(self, plan: LayerPlan, s: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self._ready[s])
        table = self._tables.get((plan.index, s))
        if table is not None:
            with self._lock:
                self._consumed.append(table)

    def mark_free(self, plan: LayerPlan, s: int) -> None:
        self._free[s].record(torch.cuda.current_stream(self.device))

    def load(self, plan: LayerPlan, reader: Reader) -> tuple[dict[str, torch.Tensor], int]:
        staging = torch.empty(plan.length, dtype=torch.uint8, device=self.device)
        if reader.mode in ("gds", "kvikio-compat"):
            def read():
                reader.read((plan.offset, plan.length), staging)
            host = None
        else:
            host = aligned_empty(plan.length)

            def read():
                reader.read((plan.offset, plan.length), host)
        read()
        if self.check is not None:  # once, at load: where the bytes are (device staging on the GPU)
            if host is None:
                crc_table = self._crc_checker().make_table(crc_segments(plan, staging.data_ptr()))

                def find():
                    return self._device_mismatch(plan, crc_table)
            else:
                def find():
                    return host_mismatch(plan, host)
            self.check.check(plan, find, read)
            if host is None:  # the decode below runs after the check on the GPU too
                torch.cuda.current_stream(self.device).wait_stream(self._check_stream)
        if host is not None:
            staging.copy_(torch.from_numpy(host))
        arena = torch.empty(plan.arena_bytes, dtype=torch.uint8, device=self.device) \
            if plan.arena_bytes else None
        if plan.needs_decode:
            table = self._table(plan, -1, staging, arena)
            self.decoder.launch(table, torch.cuda.current_stream(self.device))
            self.decoder.check(table)
        return _kept(staging_views(staging, plan, arena), plan)
