"""Host buffers for reads: page-aligned (any machine) and page-locked (a CUDA GPU present).

:func:`aligned_empty` gives ``O_DIRECT``-ready memory on every machine; :func:`host_buffer` pins it
when a GPU is present, so host-to-device copies from it are asynchronous.
"""

from __future__ import annotations

import mmap
import weakref

import numpy as np

from endor_gds.errors import MissingDependencyError

__all__ = ["ALIGN", "aligned_empty", "host_buffer", "cuda_available"]

ALIGN = 4096  # O_DIRECT / GDS alignment of file offsets, lengths and host buffer addresses


_HUGE = 2 << 20  # x86-64 transparent huge page


def _aligned_mmap(nbytes: int, align: int) -> tuple[mmap.mmap, np.ndarray]:
    if nbytes < 0 or align < 1 or align & (align - 1):
        raise ValueError(f"aligned_empty needs nbytes >= 0 and a power-of-two align, "
                         f"got nbytes={nbytes}, align={align}")
    # A device request carries at most max_segments physically contiguous pieces (254 on
    # virtio-blk, 128-ish on NVMe): over scattered 4 KiB pages a 4 MiB O_DIRECT read becomes ~1 MiB
    # requests. Huge pages make each chunk one request; on the dev VM that was 1.2 GB/s instead
    # of 0.42 (docs/performance.md). Needs 2 MiB alignment; madvise because THP is often "madvise".
    huge = nbytes >= _HUGE and hasattr(mmap, "MADV_HUGEPAGE")
    if huge:
        align = max(align, _HUGE)
    extra = align if align > mmap.PAGESIZE else 0
    capacity = max(mmap.PAGESIZE, -(-(nbytes + extra) // mmap.PAGESIZE) * mmap.PAGESIZE)
    mm = mmap.mmap(-1, capacity)
    if huge:
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # kernel without THP: 4 KiB pages still work, only requests are smaller
            pass
    arr = np.frombuffer(mm, dtype=np.uint8, count=capacity)
    start = (-arr.ctypes.data) % align
    return mm, arr[start:start + nbytes]


def aligned_empty(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """Uninitialised uint8 host array of ``nbytes`` whose address is a multiple of ``align``.

    Anonymous ``mmap`` gives page-aligned memory that the kernel zero-fills lazily, so a large
    staging buffer costs nothing until it is read into. An ``align`` above the page size (e.g.
    2 MiB) is honoured by over-allocating and slicing. Buffers of 2 MiB or more are 2 MiB-aligned
    and ask for transparent huge pages, so large reads reach the device as large requests.
    """
    return _aligned_mmap(nbytes, align)[1]


_cuda_state: list[bool] = []


def cuda_available() -> bool:
    """True when torch sees a CUDA GPU. Cached; never raises on a machine without a driver."""
    if not _cuda_state:
        try:
            import torch  # noqa: PLC0415 - heavy, and only needed here on first use

            _cuda_state.append(bool(torch.cuda.is_available()))
        except (ImportError, RuntimeError, OSError):  # no torch, or a broken driver install
            _cuda_state.append(False)
    return _cuda_state[0]


class _PinnedRegion:
    """Owns a mapping page-locked with ``cudaHostRegister``; numpy arrays view it through
    ``__array_interface__``, so the last view's death runs the finalizer (unregister) before the
    mapping itself is released (munmap); the other order would unmap locked pages."""

    def __init__(self, mm: mmap.mmap, ptr: int, nbytes: int, unregister):
        self._mm = mm
        self.__array_interface__ = {"data": (ptr, False), "shape": (nbytes,), "typestr": "|u1",
                                    "version": 3}
        weakref.finalize(self, unregister, ptr)


def _cuda_host_register(mm: mmap.mmap, arr: np.ndarray) -> np.ndarray | None:
    """``arr`` (a view of ``mm``) page-locked with ``cudaHostRegister``, or None if that failed."""
    import torch  # noqa: PLC0415 - heavy, and only needed here on first use

    try:
        cudart = torch.cuda.cudart()
        ptr = arr.ctypes.data
        if int(cudart.cudaHostRegister(ptr, arr.nbytes, 0)) != 0:  # 0 == cudaSuccess
            return None
    except (AttributeError, RuntimeError):  # a torch build without the cudart binding
        return None
    return np.asarray(_PinnedRegion(mm, ptr, arr.nbytes, cudart.cudaHostUnregister))


def host_buffer(nbytes: int, pinned: bool | None = None, align: int = ALIGN) -> np.ndarray:
    """Page-aligned uint8 host array for reads, page-locked ("pinned") when a GPU is present.

    ``pinned=None`` pins when :func:`cuda_available`; ``pinned=False`` is :func:`aligned_empty`;
    ``pinned=True`` without a GPU raises :class:`MissingDependencyError`. Pinned memory is what
    makes ``gpu.copy_(torch.from_numpy(buf), non_blocking=True)`` a real asynchronous DMA.

    Pinning registers exactly ``nbytes`` (rounded up to a page) with ``cudaHostRegister``; torch's
    ``pin_memory`` allocator rounds every block up to a power of two, which would cost up to 2x
    for a multi-GB RAM tier. It is the fallback when the cudart binding is missing.
    """
    if pinned is None:
        pinned = cuda_available()
    mm, arr = _aligned_mmap(nbytes, align)
    if not pinned:
        return arr
    if not cuda_available():
        raise MissingDependencyError(
            "host_buffer(pinned=True) needs a CUDA GPU and driver (torch.cuda.is_available() is "
            "False); use pinned=None to pin only when a GPU is present")
    if nbytes == 0:
        return arr
    pinned_arr = _cuda_host_register(mm, arr)
    if pinned_arr is not None:
        return pinned_arr
    import torch  # noqa: PLC0415 - heavy, and only needed here on first use

    raw = torch.empty(nbytes + align, dtype=torch.uint8, pin_memory=True).numpy()  # base: tensor
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes]


