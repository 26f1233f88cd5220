"""Readers: move byte ranges (extents) of a file into memory, as fast as the storage allows.

One interface, several backends:

* ``posix-direct``  — ``O_DIRECT`` reads into page-aligned host memory, one extent split into
  ``chunk_bytes`` requests over ``io_threads`` threads (``os.preadv`` drops the GIL), so the
  device sees a deep queue of large sequential requests and the page cache is bypassed.
* ``posix-buffered`` — the same through the page cache, for file systems that refuse
  ``O_DIRECT``; chosen automatically with a warning.
* ``kvikio``        — ``kvikio.CuFile.pread`` straight into GPU memory: GPUDirect Storage when the
  host has it (mode ``gds``), KvikIO's own POSIX path otherwise (mode ``kvikio-compat``).

``pread(where, into)`` returns an :class:`IOFuture`; ``read`` is ``pread(...).get()``. ``where``
is anything with ``offset`` and ``length`` (an extent of the manifest) or an ``(offset, length)``
pair. Readers are context managers. The mode in effect is ``reader.mode``.

Faults: a short read is continued, ``EINTR`` is retried, ``EIO`` is retried ``io_retries`` times
and then raised as :class:`~endor_gds.errors.ReadError` naming file, offset and length; reading
past the end of the file is a ``ReadError`` too, never a silent short buffer.
"""

from __future__ import annotations

import errno as _errno
import mmap
import os
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import defaults
from .errors import MissingDependencyError, ReadError

__all__ = [
    "IOFuture",
    "Reader",
    "PosixReader",
    "open_reader",
    "aligned_empty",
    "read_fully",
    "evict_page_cache",
    "ALIGN",
    "MODES",
]

ALIGN = 4096  # O_DIRECT / GDS alignment of file offsets, lengths and host buffer addresses
MODES = ("gds", "kvikio-compat", "posix-direct", "posix-buffered")
_RETRYABLE = {_errno.EIO, _errno.EAGAIN, _errno.EBUSY}


def aligned_empty(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """Uninitialised uint8 host array whose address and capacity are multiples of ``align``.

    Anonymous ``mmap`` gives page-aligned memory that the kernel zero-fills lazily, so a large
    staging buffer costs nothing until it is read into.
    """
    capacity = max(align, -(-nbytes // align) * align)
    mm = mmap.mmap(-1, capacity)
    arr = np.frombuffer(mm, dtype=np.uint8, count=capacity)
    return arr[:nbytes]


def evict_page_cache(path) -> None:
    """Drop a file's pages from the page cache (cold-cache measurements)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_fully(fd: int, view: memoryview, offset: int, *, path: str, direct: bool, retries: int) -> int:
    """Read ``len(view)`` bytes at ``offset`` into ``view``: short reads continued, EINTR/EIO retried.

    On a direct descriptor a short read can leave the position unaligned; the partial page is
    then read again from its aligned start (same bytes), because O_DIRECT refuses unaligned I/O.
    """
    want = len(view)
    pos = 0
    failures = 0
    while pos < want:
        try:
            got = os.preadv(fd, [view[pos:]], offset + pos)
        except InterruptedError:
            continue
        except OSError as exc:
            if exc.errno in _RETRYABLE and failures < retries:
                failures += 1
                time.sleep(0.001 * failures)
                continue
            raise ReadError(
                f"reading {path} failed at offset {offset + pos} (request offset={offset}, "
                f"length={want}) after {failures} retr{'y' if failures == 1 else 'ies'}: "
                f"{os.strerror(exc.errno) if exc.errno else exc}",
                path=path, offset=offset, length=want, errno=exc.errno,
            ) from exc
        if got == 0:
            raise ReadError(
                f"{path} ends before offset {offset + pos}: request offset={offset}, length={want} "
                f"(file truncated?)",
                path=path, offset=offset, length=want,
            )
        pos += got
        if direct and pos < want and pos % ALIGN:
            pos -= pos % ALIGN
    return want


class IOFuture:
    """Result of :meth:`Reader.pread`: ``get()`` waits and returns the bytes read (or raises)."""

    def __init__(self, parts: list[Future] | None = None, nbytes: int = 0, _get=None):
        self._parts = parts or []
        self._nbytes = nbytes
        self._get = _get

    def done(self) -> bool:
        return all(p.done() for p in self._parts)

    def get(self) -> int:
        if self._get is not None:
            return self._get()
        first_error = None
        for part in self._parts:  # wait for every chunk even after an error: none keeps writing
            try:
                part.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after all chunks end
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return self._nbytes


def _where(where) -> tuple[int, int]:
    if isinstance(where, tuple):
        offset, length = where
    else:
        offset, length = where.offset, where.length
    return int(offset), int(length)


class Reader:
    """Base class: a file opened for extent reads. Subclasses set ``mode`` and ``_submit``."""

    mode: str = "?"

    def __init__(self, path, *, expected_size: int | None = None):
        self.path = os.fspath(path)
        self.size = os.stat(self.path).st_size
        if expected_size is not None and self.size < expected_size:
            raise ReadError(
                f"{self.path} is {self.size} bytes but its header says {expected_size} (truncated?)",
                path=self.path, offset=self.size, length=expected_size - self.size,
            )

    def pread(self, where, into) -> IOFuture:
        offset, length = _where(where)
        if offset < 0 or length < 0:
            raise ValueError(f"negative read request offset={offset} length={length}")
        if offset + length > self.size:
            raise ReadError(
                f"request offset={offset} length={length} runs past the end of {self.path} "
                f"({self.size} bytes)",
                path=self.path, offset=offset, length=length,
            )
        return self._submit(offset, length, into)

    def read(self, where, into) -> int:
        return self.pread(where, into).get()

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r} mode={self.mode}>"

    def _submit(self, offset: int, length: int, into) -> IOFuture:  # pragma: no cover
        raise NotImplementedError


def _host_view(into, length: int) -> memoryview:
    view = memoryview(into).cast("B") if not isinstance(into, memoryview) else into.cast("B")
    if view.readonly:
        raise ValueError("read destination is read-only")
    if len(view) < length:
        raise ValueError(f"destination holds {len(view)} bytes, request is {length}")
    return view[:length]


class PosixReader(Reader):
    """``posix-direct`` (``O_DIRECT``) or ``posix-buffered`` reads into host memory."""

    def __init__(self, path, *, direct: bool = True, threads: int | None = None,
                 chunk_bytes: int | None = None, retries: int | None = None,
                 expected_size: int | None = None):
        super().__init__(path, expected_size=expected_size)
        self.threads = threads or defaults.get("io_threads")
        self.chunk_bytes = chunk_bytes or defaults.get("chunk_bytes")
        self.retries = defaults.get("io_retries") if retries is None else retries
        if self.chunk_bytes % ALIGN:
            raise ValueError(f"chunk_bytes={self.chunk_bytes} must be a multiple of {ALIGN}")
        self.direct = False
        if direct:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError as exc:
                if exc.errno not in (_errno.EINVAL, _errno.EOPNOTSUPP):
                    raise
                warnings.warn(
                    f"{self.path}: the file system refuses O_DIRECT ({os.strerror(exc.errno)}); "
                    f"reading through the page cache (mode posix-buffered)",
                    RuntimeWarning, stacklevel=2,
                )
        if not self.direct:
            self._fd = os.open(self.path, os.O_RDONLY)
        self.mode = "posix-direct" if self.direct else "posix-buffered"
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="endor-io")
        self._closed = False
        self._lock = threading.Lock()

    def _check_direct(self, offset: int, length: int, view: memoryview) -> None:
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0
        bad = [f"{name}={value}" for name, value in
               (("offset", offset), ("length", length), ("buffer address", address)) if value % ALIGN]
        if bad:
            raise ValueError(
                f"posix-direct reads need offset, length and buffer address aligned to {ALIGN} "
                f"bytes (O_DIRECT); got {', '.join(bad)}. Extents of .endor files are always "
                f"aligned; use aligned_empty() for buffers or mode posix-buffered for odd ranges"
            )

    def _submit(self, offset: int, length: int, into) -> IOFuture:
        if self._closed:
            raise ValueError(f"reader for {self.path} is closed")
        view = _host_view(into, length)
        if self.direct:
            self._check_direct(offset, length, view)
        parts = []
        for start in range(0, length, self.chunk_bytes):
            stop = min(length, start + self.chunk_bytes)
            parts.append(self._pool.submit(
                read_fully, self._fd, view[start:stop], offset + start,
                path=self.path, direct=self.direct, retries=self.retries,
            ))
        return IOFuture(parts, length)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)
        os.close(self._fd)


@dataclass
class _KvikioState:
    module: object
    compat_preferred: bool


def _import_kvikio():
    try:
        import kvikio  # noqa: PLC0415 - GPU library, loaded on first use only
    except Exception as exc:  # ImportError, or OSError when libcuda.so.1 is absent
        raise MissingDependencyError(
            f"the kvikio reader needs KvikIO and a CUDA driver ({type(exc).__name__}: {exc}); "
            f"install it with: pip install 'endor_gds[gpu]' (kvikio-cu13), or use ENDOR_IO=posix-direct"
        ) from exc
    return kvikio


class KvikioReader(Reader):
    """``kvikio.CuFile`` reads into GPU memory; reports ``gds`` or ``kvikio-compat``."""

    def __init__(self, path, *, compat_mode: str | None = None, expected_size: int | None = None):
        super().__init__(path, expected_size=expected_size)
        kvikio = _import_kvikio()
        setting = compat_mode or defaults.get("compat_mode")
        mode_enum = {"auto": kvikio.CompatMode.AUTO, "on": kvikio.CompatMode.ON,
                     "off": kvikio.CompatMode.OFF}[setting]
        kvikio.defaults.set("compat_mode", mode_enum)
        self._kvikio = kvikio
        self._file = kvikio.CuFile(self.path, "r")
        self.mode = "kvikio-compat" if self._file.is_compat_mode_preferred() else "gds"

    def _submit(self, offset: int, length: int, into) -> IOFuture:
        fut = self._file.pread(into, length, offset)
        return IOFuture(nbytes=length, _get=lambda: self._check(fut.get(), offset, length))

    def _check(self, got: int, offset: int, length: int) -> int:
        if got != length:
            raise ReadError(
                f"kvikio read of {self.path} returned {got} of {length} bytes at offset {offset}",
                path=self.path, offset=offset, length=length,
            )
        return got

    def close(self) -> None:
        self._file.close()


def open_reader(path, *, mode: str | None = None, device: str = "cpu",
                expected_size: int | None = None, **options) -> Reader:
    """Open ``path`` with the backend ``mode`` (default: option ``io``, normally ``auto``).

    ``auto``: ``kvikio`` when the destination is a GPU and KvikIO loads, else ``posix-direct``
    (which itself falls back to ``posix-buffered`` with a warning where O_DIRECT is refused).
    """
    mode = mode or defaults.get("io")
    if mode not in defaults.IO_MODES:
        raise ValueError(f"unknown reader mode {mode!r}; choose one of {', '.join(defaults.IO_MODES)}")
    if mode == "auto":
        if device.startswith("cuda"):
            try:
                return KvikioReader(path, expected_size=expected_size)
            except MissingDependencyError:
                pass
        mode = "posix-direct"
    if mode == "kvikio":
        return KvikioReader(path, expected_size=expected_size, **options)
    return PosixReader(path, direct=(mode == "posix-direct"), expected_size=expected_size, **options)
