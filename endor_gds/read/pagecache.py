"""The page cache of one file: evict it (cold-cache measurements) and measure how much is cached."""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

__all__ = ["evict_page_cache", "page_cache_fraction"]


MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now (written back first where needed)


def evict_page_cache(path, *, sync: bool = True, mapped: bool = False) -> None:
    """Drop a file's pages from the page cache (cold-cache measurements).

    ``POSIX_FADV_DONTNEED`` only drops clean pages, so dirty ones (a file just written) are
    flushed first with ``fdatasync``. Needs no privileges and touches no other file, unlike
    ``drop_caches``. :func:`page_cache_fraction` shows whether it worked.

    Pages a process has mapped are not dropped either: ``mapped=True`` first pages out this
    process's own mappings of the file (``MADV_PAGEOUT``; safetensors and Accelerate's disk
    offload read weights through ``mmap``). Paging out loses nothing: a page touched again is
    read back from the file, a dirty private page goes to swap.
    """
    if mapped:
        _page_out_mappings(os.path.realpath(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        if sync:
            os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _page_out_mappings(path: str) -> None:
    try:
        with open("/proc/self/maps") as f:
            lines = [ln.split(None, 5) for ln in f]
        libc = _libc()
    except OSError:
        return  # not Linux: nothing to page out this way
    for fields in lines:
        if len(fields) == 6 and fields[5].rstrip("\n") == path:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT)


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    return libc


def page_cache_fraction(path) -> float | None:
    """Fraction of ``path``'s pages resident in the page cache (``mincore``, as ``fincore`` does).

    Mapping the file and asking ``mincore`` reads nothing, so the probe cannot warm the cache it
    measures. ``None`` where the platform does not offer it (or the file is empty).
    """
    size = os.stat(path).st_size
    if size == 0:
        return None
    try:
        libc = _libc()
    except (OSError, AttributeError):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = -(-size // mmap.PAGESIZE)
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            return float(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1)) / pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
