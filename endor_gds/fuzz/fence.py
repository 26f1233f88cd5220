"""Fenced buffers for fuzzing native code: an inaccessible page right before and right after the
data, so that reading or writing one byte outside it kills the process (SIGSEGV) instead of
passing unseen. Used by endor_gds/fuzz/fuzzcheck.py around the C decoder; numpy and ctypes only, so a
test can check the fence itself in a light subprocess."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_PROT_NONE = 0


def fenced_empty(nbytes: int) -> np.ndarray:
    """A writable uint8 array of ``nbytes`` that ends exactly at an inaccessible page."""
    pages = -(-nbytes // PAGE)
    mm = mmap.mmap(-1, (pages + 2) * PAGE)
    anchor = ctypes.c_char.from_buffer(mm)
    base = ctypes.addressof(anchor)
    del anchor  # release the buffer export; the address stays valid while `mm` lives
    for at in (base, base + (pages + 1) * PAGE):
        if _libc.mprotect(at, PAGE, _PROT_NONE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
    # the array keeps `mm` alive; unmapping it (guard pages included) needs no special care
    return np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=(pages + 1) * PAGE - nbytes)


def fenced_copy(arr: np.ndarray) -> np.ndarray:
    raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
    out = fenced_empty(raw.size)
    out[:] = raw
    return out
