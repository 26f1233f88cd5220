"""Every byte the model computes with has passed its checksum: the check of a staged extent.

The packer stores a CRC-32C per segment. Where the reader reads an extent in pieces on several
threads (posix-direct, posix-buffered), each piece's share of each segment is checked as soon as
the piece arrives, on a CRC thread of the file's check (the reader thread goes straight on to
its next read), and a segment's CRC is folded from its pieces' when the last one is checked
(:class:`ChunkedCheck`): the CRC then runs in the shadow of the I/O instead of before
the decode (it covers the bytes as they arrived
from storage: a flip in the staging buffer's RAM between the read and the decode, milliseconds
later, is not caught on that path). Where KvikIO reads an extent straight into device memory
(gds, kvikio-compat), the GPU checks it where it lies (:mod:`endor_gds.decode.gpu_crc`): right
after the read the CRC kernels run on a stream of their own, the decoder thread waits for their
8-byte verdict (an event: the kernels are built to read at a good fraction of HBM bandwidth, by
design ~1 ms or less for a 1 GB extent; bench/bench_crc_gpu.py measures it), the decode is
ordered after them on the GPU, and no byte of the extent goes back to the host. Other extents
are checked on the host, on the decoder thread. Either way no layer is decoded before every
segment of it passed (hardware CRC-32C: 15-18 GB/s on one core of the 2-core development VMs,
against ~1-3 GB/s of storage). The RAM tier and the resident tensors are checked once, when
they are loaded (on the GPU too, where KvikIO read them into device memory). A failed check is
read again from storage once (a transient fault on the way in heals); a second failure is a
:class:`~endor_gds.errors.ChecksumError` naming the file, extent, tensor, segment and file
offset, and saying whether the file changed on disk since it was opened. Where the check ran
(host or GPU) only changes how the first bad segment is found (:func:`host_mismatch`,
:func:`device_mismatch`), never what follows.
"""

from __future__ import annotations

import bisect
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import crc32c as _crc32c
import numpy as np

from endor_gds.decode.cpu import crc32c_combine
from endor_gds.errors import ChecksumError
from endor_gds.stream.plan import LayerPlan

__all__ = ["Mismatch", "host_mismatch", "device_mismatch", "ExtentCheck", "ChunkedCheck"]

# The first segment of an extent that fails its CRC-32C: (tensor, kind, offset in the extent,
# length, stored CRC, computed CRC).
Mismatch = tuple[str, str, int, int, int, int]


def host_mismatch(plan: LayerPlan, host: np.ndarray) -> Mismatch | None:
    """The first bad segment of ``plan``'s extent staged in host memory ``host`` (None: all pass)."""
    for tensor, kind, off, length, crc in plan.segment_crcs:
        got = _crc32c.crc32c(host[off:off + length])
        if got != crc:
            return tensor, kind, off, length, crc, got
    return None


def device_mismatch(plan: LayerPlan, result: tuple[int, int] | None) -> Mismatch | None:
    """The first bad segment from the GPU check's result over ``plan.segment_crcs``, in that
    order (:meth:`endor_gds.decode.gpu_crc.GpuCrc.result`: its index and computed CRC, or None)."""
    if result is None:
        return None
    index, computed = result
    tensor, kind, off, length, stored = plan.segment_crcs[index]
    return tensor, kind, off, length, stored, computed


class ExtentCheck:
    """Checks the segments of staged extents of one file against the CRCs of its manifest."""

    # Threads that check the pieces of extents as they arrive, while the reader threads go on
    # reading. Each checks at memory speed (~10 GB/s on the development VMs' cores: the bytes come
    # from RAM, just read), so two keep up with several NVMe drives.
    CRC_THREADS = 2

    def __init__(self, path: str, opened_stat: os.stat_result):
        self.path = path
        self.opened = opened_stat
        self.extents_checked = 0  # statistics: how many extents passed, how many were read twice
        self.rereads = 0
        self._pool: ThreadPoolExecutor | None = None  # made at the first chunked read
        self._pool_lock = threading.Lock()

    def for_read(self, plan: LayerPlan, host: np.ndarray) -> "ChunkedCheck":
        """A check of ``plan``'s extent that runs while it is read into ``host`` (pass its
        ``on_chunk`` to the reader, then the object to :meth:`check` as ``early``)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.CRC_THREADS, thread_name_prefix="endor-crc")
        return ChunkedCheck(plan, host, self._pool)

    def close(self) -> None:
        """Stop the CRC threads (after the checks they were given)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def check(self, plan: LayerPlan, find: Callable[[], Mismatch | None], reread: Callable[[], None],
              early: "ChunkedCheck | None" = None) -> None:
        """Check ``plan``'s extent as staged: ``find()`` checks it where it lies (host or GPU) and
        returns its first bad segment; on a mismatch read it again from storage (``reread()``) and
        check once more. ``early``: the check already made as the extent was read; when every
        segment passed there, done."""
        if early is not None and early.passed():
            self.extents_checked += 1
            return
        if early is None and find() is None:
            self.extents_checked += 1
            return
        self.rereads += 1
        reread()
        bad = find()
        if bad is None:
            self.extents_checked += 1
            return
        tensor, kind, off, length, stored, computed = bad
        raise ChecksumError(
            f"{self.path}: extent {plan.extent or plan.index}, segment {tensor}:{kind} (file offset "
            f"{plan.offset + off}, {length} bytes) fails its CRC-32C, also when read again from storage: "
            f"stored 0x{stored:08x}, computed 0x{computed:08x}. {self.changed_on_disk()}",
            segment=f"{tensor}:{kind}")

    def changed_on_disk(self) -> str:
        """What a failed check most likely means, from the file's size and mtime now and at open."""
        try:
            now = os.stat(self.path)
        except OSError as exc:
            return f"The file cannot be found any more ({exc.strerror}): it was removed or replaced after open."
        if now.st_ino != self.opened.st_ino or now.st_dev != self.opened.st_dev:
            return "The file was replaced by another file after it was opened: load it again."
        if now.st_size != self.opened.st_size:
            return (f"The file changed on disk after it was opened (size {self.opened.st_size} -> "
                    f"{now.st_size} bytes): load it again.")
        if now.st_mtime_ns != self.opened.st_mtime_ns:
            return "The file changed on disk after it was opened (its mtime changed): load it again."
        return ("The file is unchanged since it was opened: the stored bytes are damaged (check the drive; "
                "endor-gds verify lists every bad segment).")


class ChunkedCheck:
    """The segments of one extent checked as its pieces arrive.

    ``on_chunk(start, stop)`` is called on the thread that read bytes ``[start, stop)``; it hands
    the piece to ``pool`` (the file's CRC threads; None: checked on the calling thread) and
    returns, so the reader thread goes straight on to its next read. The CRC-32C of each
    segment's share of the piece is computed at once (crc32c releases the GIL) while other pieces
    are in flight; the thread that checks a segment's last piece folds the pieces' CRCs into the
    segment's (``crc32c_combine``, microseconds): the work left after a layer's last byte is one
    piece's CRC, not a whole segment's. Checked on the reader threads themselves, each piece's CRC
    (~0.4 ms for 4 MiB) kept a thread off the drive: cold reads slowed by ~5 %, as much as the
    check cost end to end (docs/performance.md). Pieces may arrive in any order.
    """

    def __init__(self, plan: LayerPlan, host: np.ndarray, pool: ThreadPoolExecutor | None = None):
        self._pool = pool
        self._checks: list[Future] = []  # the pieces handed to the pool, waited for by passed()
        self._host = host
        self._segs = plan.segment_crcs
        self._starts = [seg[2] for seg in self._segs]
        self._have = [0] * len(self._segs)
        # per segment still arriving: its pieces' (start, crc, length); dropped once folded, so
        # a finished check holds nothing per piece (the pipeline keeps it until the job's reuse)
        self._parts: dict[int, list[tuple[int, int, int]]] = {}
        self._left = sum(1 for seg in self._segs if seg[3] > 0)
        self._bad = any(seg[3] == 0 and seg[4] != 0 for seg in self._segs)  # empty: CRC 0
        self._lock = threading.Lock()

    def on_chunk(self, start: int, stop: int) -> None:
        if self._pool is None:
            self._check_piece(start, stop)
            return
        check = self._pool.submit(self._check_piece, start, stop)
        with self._lock:
            self._checks.append(check)

    def _check_piece(self, start: int, stop: int) -> None:
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        shares = []
        while i < len(self._segs) and self._segs[i][2] < stop:
            off, length = self._segs[i][2], self._segs[i][3]
            a, b = max(start, off), min(stop, off + length)
            if b > a:
                shares.append((i, a, _crc32c.crc32c(self._host[a:b]), b - a))
            i += 1
        whole = []
        with self._lock:
            for i, a, crc, length in shares:
                self._parts.setdefault(i, []).append((a, crc, length))
                self._have[i] += length
                if self._have[i] == self._segs[i][3]:
                    whole.append((i, self._parts.pop(i)))
        for i, parts in whole:
            parts.sort()
            crc = parts[0][1]
            for _, part_crc, length in parts[1:]:
                crc = crc32c_combine(crc, part_crc, length)
            with self._lock:
                self._left -= 1
                self._bad = self._bad or crc != self._segs[i][4]

    def passed(self) -> bool:
        """Every segment arrived whole and matched its CRC (else the caller checks again, and
        reads again, the slow way: that path also names the bad segment). Called once the read
        has ended: waits for the pieces still being checked."""
        with self._lock:
            checks, self._checks = self._checks, []
        for check in checks:
            check.result()
        with self._lock:
            return self._left == 0 and not self._bad
