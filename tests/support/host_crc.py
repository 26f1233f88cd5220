"""A host stand-in for endor_gds.decode.gpu_crc.GpuCrc, for the GPU check's callers on a machine
without a GPU: tables go through the real pack_segments (every argument check of make_table), a
launch computes each segment's CRC-32C with crc32c from the memory its pointer names (host
memory here: CPU tensors, numpy arrays), result() answers as the kernels' error word would.
Kernel correctness itself is tests/decode/test_crc_emulated.py's and test_gpu_crc.py's."""

from __future__ import annotations

import ctypes

import crc32c
import numpy as np

from endor_gds.decode import gpu_crc


def host_bytes(ptr: int, nbytes: int) -> np.ndarray:
    """``nbytes`` of host memory at ``ptr`` as uint8 (a null pointer only with 0 bytes)."""
    if nbytes == 0:
        return np.zeros(0, np.uint8)
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))


class HostTable:
    def __init__(self, segments):
        self.segments = list(segments)
        self.key = gpu_crc.NO_MISMATCH
        self.launched = False


class HostCrc:
    """GpuCrc's calls, computed on the host; ``launches`` lists ``(table, stream)`` per launch."""

    made: list[HostCrc] = []

    def __init__(self, device: int = 0):
        self.device = device
        self.tables: list[HostTable] = []
        self.launches: list[tuple[HostTable, object]] = []
        HostCrc.made.append(self)

    def make_table(self, segments) -> HostTable:
        gpu_crc.pack_segments(segments)
        table = HostTable(segments)
        self.tables.append(table)
        return table

    def launch(self, table: HostTable, stream) -> None:
        if stream is None:
            raise TypeError("launch() needs an explicit stream")
        self.launches.append((table, stream))
        table.key = gpu_crc.NO_MISMATCH
        for i, sg in enumerate(table.segments):
            got = crc32c.crc32c(host_bytes(sg.ptr, sg.length))
            if got != sg.crc:
                table.key = i << 32 | got
                break
        table.launched = True

    def result(self, table: HostTable):
        if not table.launched:
            raise RuntimeError("not launched")
        return None if table.key == gpu_crc.NO_MISMATCH else gpu_crc.mismatch_key(table.key)
