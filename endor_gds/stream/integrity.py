"""Every byte the model computes with has passed its checksum: the check of a staged extent.

The packer stores a CRC-32C per segment. A streamed extent is checked on the decoder thread,
after its read and before its decode, so the reader is already fetching the next layer while the
check runs (hardware CRC-32C: ~18 GB/s on one core of the 2-core development VM, against
~1-3 GB/s of storage). The RAM tier and the resident tensors are checked once, when they are
loaded. A failed check is read again from storage once (a transient fault on the way in heals);
a second failure is a :class:`~endor_gds.errors.ChecksumError` naming the file, extent, tensor,
segment and file offset, and saying whether the file changed on disk since it was opened.
"""

from __future__ import annotations

import os
from typing import Callable

import crc32c as _crc32c
import numpy as np

from endor_gds.errors import ChecksumError
from endor_gds.stream.plan import LayerPlan

__all__ = ["ExtentCheck"]


class ExtentCheck:
    """Checks the segments of staged extents of one file against the CRCs of its manifest."""

    def __init__(self, path: str, opened_stat: os.stat_result):
        self.path = path
        self.opened = opened_stat
        self.extents_checked = 0  # statistics: how many extents passed, how many were read twice
        self.rereads = 0

    def first_mismatch(self, plan: LayerPlan, host: np.ndarray) -> tuple | None:
        """``(tensor, kind, offset in extent, length, stored, computed)`` of the first bad segment."""
        for tensor, kind, off, length, crc in plan.segment_crcs():
            got = _crc32c.crc32c(host[off:off + length])
            if got != crc:
                return tensor, kind, off, length, crc, got
        return None

    def check(self, plan: LayerPlan, host: Callable[[], np.ndarray], reread: Callable[[], None]) -> None:
        """Check ``plan``'s extent as staged (``host()`` gives its bytes in host memory); on a
        mismatch read it again from storage (``reread()``) and check once more."""
        if self.first_mismatch(plan, host()) is None:
            self.extents_checked += 1
            return
        self.rereads += 1
        reread()
        bad = self.first_mismatch(plan, host())
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
