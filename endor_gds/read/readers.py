"""Readers: move byte ranges (extents) of a file into memory, as fast as the storage allows.

One interface, several backends:

* ``posix-direct``  — ``O_DIRECT`` reads into page-aligned host memory, one extent split into
  ``chunk_bytes`` requests over ``io_threads`` threads (``os.preadv`` drops the GIL), so the
  device sees a deep queue of large sequential requests and the page cache is bypassed.
* ``posix-buffered`` — the same through the page cache, for file systems that refuse
  ``O_DIRECT``; chosen automatically with a ``RuntimeWarning``.
* ``kvikio``        — ``kvikio.CuFile.pread`` straight into GPU memory: GPUDirect Storage when the
  host has it (mode ``gds``), a POSIX path otherwise (mode ``kvikio-compat``).

``pread(where, into)`` returns an :class:`IOFuture`; ``read`` is ``pread(...).get()``. ``where``
is anything with ``offset`` and ``length`` (an extent of the manifest) or an ``(offset, length)``
pair. Readers are context managers. The mode in effect is ``reader.mode`` and the reason it was
chosen ``reader.mode_reason``; every tool prints both.

Faults: a short read is continued, ``EINTR`` is retried, ``EIO`` is retried ``io_retries`` times
and then raised as :class:`~endor_gds.errors.ReadError` naming file, offset and length; reading
past the end of the file is a ``ReadError`` too, never a silent short buffer.

Host buffers to read into are in :mod:`endor_gds.read.buffers`.
"""

from __future__ import annotations

import errno as _errno
import os
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from endor_gds import defaults
from endor_gds.errors import ArgumentError, MissingDependencyError, ReadError
from endor_gds.read.buffers import ALIGN, aligned_empty

__all__ = [
    "IOFuture",
    "Reader",
    "PosixReader",
    "KvikioReader",
    "open_reader",
    "check_mode",
    "read_fully",
    "MODES",
]

MODES = ("gds", "kvikio-compat", "posix-direct", "posix-buffered")
_RETRYABLE = {_errno.EIO, _errno.EAGAIN, _errno.EBUSY}


# -- the read loop ----------------------------------------------------------------------------


def read_fully(fd: int, view: memoryview, offset: int, *, path: str, direct: bool, retries: int) -> int:
    """Read ``len(view)`` bytes at ``offset`` into ``view``: short reads continued, EINTR/EIO retried.

    On a direct descriptor a short read can leave the position unaligned; the partial page is
    then read again from its aligned start (same bytes), because O_DIRECT refuses unaligned I/O.
    Retryable errors (EIO, EAGAIN, EBUSY) and reads that make no progress share one budget of
    ``retries``; past it, :class:`ReadError` names the file, the offset and the length.
    """
    want = len(view)
    pos = 0
    failures = 0

    def fail(why: str, err: int | None = None) -> ReadError:
        tries = f"after {failures} retr{'y' if failures == 1 else 'ies'}"
        return ReadError(
            f"reading {path} failed at offset {offset + pos} (request offset={offset}, "
            f"length={want}) {tries}: {why}",
            path=path, offset=offset, length=want, errno=err)

    while pos < want:
        try:
            got = os.preadv(fd, [view[pos:]], offset + pos)
        except InterruptedError:  # a signal arrived before any byte: the read simply restarts
            continue
        except OSError as exc:
            if exc.errno in _RETRYABLE and failures < retries:
                failures += 1
                time.sleep(0.001 * failures)
                continue
            raise fail(os.strerror(exc.errno) if exc.errno else str(exc), exc.errno) from exc
        if got == 0:
            raise ReadError(
                f"{path} ends before offset {offset + pos}: request offset={offset}, length={want} "
                f"(file truncated?)",
                path=path, offset=offset, length=want)
        before = pos
        pos += got
        if direct and pos < want and pos % ALIGN:
            pos -= pos % ALIGN
            if pos <= before:  # only part of one page came back: no progress this time
                if failures >= retries:
                    raise fail(f"O_DIRECT read returned {got} bytes, less than one page, repeatedly")
                failures += 1
    return want


class IOFuture:
    """Result of :meth:`Reader.pread`: ``get()`` waits and returns the bytes read (or raises).

    ``get()`` can be called again and returns (or raises) the same result. ``done()`` does not
    block. After an error in one chunk, ``get()`` still waits for every other chunk, so no
    thread is writing into the buffer once it returns or raises.
    """

    def __init__(self, nbytes: int, parts: list[Future] | None = None, *, wait=None, poll=None):
        self._nbytes = nbytes
        self._parts = parts or []
        self._wait, self._poll = wait, poll
        self._outcome: tuple[int | None, BaseException | None] | None = None

    def done(self) -> bool:
        if self._outcome is not None:
            return True
        if self._poll is not None:
            return bool(self._poll())
        return all(p.done() for p in self._parts)

    def get(self) -> int:
        if self._outcome is None:
            self._outcome = self._collect()
        value, error = self._outcome
        if error is not None:
            raise error
        return value

    def _collect(self) -> tuple[int | None, BaseException | None]:
        if self._wait is not None:
            try:
                return self._wait(), None
            except Exception as exc:  # noqa: BLE001 - kept, and re-raised by every get()
                return None, exc
        first_error = None
        for part in self._parts:
            try:
                part.result()
            except Exception as exc:  # noqa: BLE001 - first one re-raised after all chunks end
                first_error = first_error or exc
        return (None, first_error) if first_error else (self._nbytes, None)

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<IOFuture {self._nbytes} bytes {state}>"


def _where(where) -> tuple[int, int]:
    if isinstance(where, tuple):
        offset, length = where
    else:
        offset, length = where.offset, where.length
    return int(offset), int(length)


class Reader:
    """Base class: a file opened for extent reads. Subclasses set ``mode`` and ``_submit``."""

    mode: str = "?"
    mode_reason: str = ""

    def __init__(self, path, *, expected_size: int | None = None):
        self.path = os.fspath(path)
        self.size = os.stat(self.path).st_size
        if expected_size is not None and self.size < expected_size:
            raise ReadError(
                f"{self.path} is {self.size} bytes but its header says {expected_size} "
                f"(truncated? {expected_size - self.size} bytes missing)",
                path=self.path, offset=self.size, length=expected_size - self.size,
            )

    chunked = False  # whether pread calls on_chunk as each piece of a request arrives

    def pread(self, where, into, on_chunk=None) -> IOFuture:
        """Start reading ``where`` (extent or ``(offset, length)``) into ``into``; returns a future.

        ``on_chunk(start, stop)``, where the reader is ``chunked``: called on a reader thread as
        soon as bytes ``start:stop`` of the request are in ``into`` (the checked-reads CRC runs
        there, while the other pieces are still being read); elsewhere it must be None."""
        if on_chunk is not None and not self.chunked:
            raise ValueError(f"{type(self).__name__} does not report chunks")
        offset, length = _where(where)
        if offset < 0 or length < 0:
            raise ValueError(f"negative read request offset={offset} length={length}")
        if offset + length > self.size:
            raise ReadError(
                f"request offset={offset} length={length} runs past the end of {self.path} "
                f"({self.size} bytes)",
                path=self.path, offset=offset, length=length,
            )
        return self._submit(offset, length, into, on_chunk) if on_chunk is not None else \
            self._submit(offset, length, into)

    def read(self, where, into, on_chunk=None) -> int:
        return self.pread(where, into, on_chunk).get()

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
    """Writable byte view of a host destination: numpy array, bytearray, mmap or CPU torch tensor."""
    if type(into).__module__.startswith("torch"):
        if into.device.type != "cpu":
            raise ValueError(
                f"posix readers read into host memory, got a tensor on {into.device}; use mode "
                f"kvikio for device buffers, or read into host_buffer() and copy")
        if not into.is_contiguous():
            raise ValueError("read destination tensor is not contiguous")
        import torch  # noqa: PLC0415 - the caller already has torch loaded

        into = into.reshape(-1).view(torch.uint8).numpy()
    try:
        view = memoryview(into).cast("B")
    except TypeError as exc:
        raise ValueError(f"read destination must be a writable C-contiguous buffer: {exc}") from None
    if view.readonly:
        raise ValueError("read destination is read-only")
    if len(view) < length:
        raise ValueError(f"destination holds {len(view)} bytes, request is {length}")
    return view[:length]


def _address(view: memoryview) -> int:
    # __array_interface__, not .ctypes: ndarray.ctypes leaves ~56 bytes behind per call, and this
    # runs for every read request.
    return np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0] if len(view) else 0


class PosixReader(Reader):
    """``posix-direct`` (``O_DIRECT``) or ``posix-buffered`` reads into host memory.

    One request is split into ``chunk_bytes`` pieces read by ``threads`` workers, so up to
    ``threads`` requests are in flight: the queue depth the device sees.
    """

    def __init__(self, path, *, direct: bool = True, threads: int | None = None,
                 chunk_bytes: int | None = None, retries: int | None = None,
                 expected_size: int | None = None):
        super().__init__(path, expected_size=expected_size)
        self.threads = defaults.get("io_threads") if threads is None else int(threads)
        self.chunk_bytes = defaults.get("chunk_bytes") if chunk_bytes is None else int(chunk_bytes)
        self.retries = defaults.get("io_retries") if retries is None else int(retries)
        if self.threads < 1:
            raise ValueError(f"threads={self.threads}: a reader needs at least 1 thread")
        if self.chunk_bytes < ALIGN or self.chunk_bytes % ALIGN:
            raise ValueError(f"chunk_bytes={self.chunk_bytes} must be a positive multiple of {ALIGN}")
        if self.retries < 0:
            raise ValueError(f"retries={self.retries} must be >= 0")
        self._fd = -1
        self.direct = False
        if direct:
            refused = self._open_direct()
            if refused:
                warnings.warn(
                    f"{self.path}: the file system refuses O_DIRECT ({refused}); reading through "
                    f"the page cache (mode posix-buffered)", RuntimeWarning, stacklevel=3)
                self.mode_reason = f"O_DIRECT refused: {refused}"
            else:
                self.mode_reason = "O_DIRECT accepted"
        else:
            self.mode_reason = "requested"
        if not self.direct:
            self._fd = os.open(self.path, os.O_RDONLY)
        self.mode = "posix-direct" if self.direct else "posix-buffered"
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="endor-io")
        self._closed = False
        self._lock = threading.Lock()

    def _open_direct(self) -> str | None:
        """Open with O_DIRECT; return why it was refused, or None when direct reads work.

        Some file systems accept the flag at open and refuse the first read (EINVAL), so one
        aligned page is read as a probe.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        except OSError as exc:
            if exc.errno not in (_errno.EINVAL, _errno.EOPNOTSUPP):
                raise
            return f"open: {os.strerror(exc.errno)}"
        if self.size >= ALIGN:
            try:
                os.preadv(fd, [aligned_empty(ALIGN)], 0)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (_errno.EINVAL, _errno.EOPNOTSUPP):
                    raise
                return f"first read: {os.strerror(exc.errno)}"
        self._fd, self.direct = fd, True
        return None

    def _check_direct(self, offset: int, length: int, view: memoryview) -> None:
        bad = [f"{name}={value}" for name, value in
               (("offset", offset), ("length", length), ("buffer address", _address(view)))
               if value % ALIGN]
        if bad:
            raise ValueError(
                f"posix-direct reads need offset, length and buffer address aligned to {ALIGN} "
                f"bytes (O_DIRECT); got {', '.join(bad)}. Extents of .endor files are always "
                f"aligned; use aligned_empty() for buffers or mode posix-buffered for odd ranges"
            )

    chunked = True

    def _submit(self, offset: int, length: int, into, on_chunk=None) -> IOFuture:
        if self._closed:
            raise ValueError(f"reader for {self.path} is closed")
        view = _host_view(into, length)
        if self.direct:
            self._check_direct(offset, length, view)
        parts = []
        for start in range(0, length, self.chunk_bytes):
            stop = min(length, start + self.chunk_bytes)
            parts.append(self._pool.submit(self._chunk, view[start:stop], offset + start, start, stop, on_chunk))
        return IOFuture(length, parts)

    def _chunk(self, view: memoryview, file_offset: int, start: int, stop: int, on_chunk) -> int:
        n = read_fully(self._fd, view, file_offset, path=self.path, direct=self.direct, retries=self.retries)
        if on_chunk is not None:
            on_chunk(start, stop)
        return n

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)
        os.close(self._fd)


# -- KvikIO -----------------------------------------------------------------------------------


def import_kvikio():
    try:
        import kvikio  # noqa: PLC0415 - GPU library, loaded on first use only
        import kvikio.defaults  # noqa: F401, PLC0415
    except (ImportError, OSError) as exc:  # OSError: libkvikio/libcuda could not be loaded
        raise MissingDependencyError(
            f"the kvikio reader needs KvikIO and a CUDA driver ({type(exc).__name__}: {exc}); "
            f"install it with: pip install 'endor_gds[gpu]' (kvikio-cu13), or use ENDOR_IO=posix-direct"
        ) from exc
    try:
        import kvikio.cufile_driver  # noqa: F401, PLC0415 - not imported by kvikio/__init__
    except (ImportError, OSError):
        pass  # only used to ask whether nvidia-fs is loaded; the mode then says "unknown"
    return kvikio


def _o_direct_refused(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return True
    return False


def _kvikio_mode(kvikio, path: str, compat_setting: str, compat_preferred: bool) -> tuple[str, str]:
    """Which path a freshly opened CuFile really takes: (``gds`` | ``kvikio-compat``, why).

    KvikIO's Python ``CuFile`` does not expose its per-file decision, so it is rebuilt from the
    same facts KvikIO (>= 25.x, ``CompatModeManager``) uses: the global preference (compat mode
    ON, or AUTO without a loadable cuFile), then, under AUTO, whether the file opens with
    O_DIRECT. cuFile itself runs POSIX I/O when the nvidia-fs driver is not loaded, which is not
    GDS either, so ``is_gds_available`` is asked too. Not visible from Python: a failing
    ``cuFileHandleRegister`` under AUTO (KvikIO falls back silently).
    """
    if compat_preferred:
        why = "compat mode forced on" if compat_setting == "on" else \
            "cuFile unavailable (libcufile not found, WSL, or /run/udev unreadable)"
        return "kvikio-compat", why
    if _o_direct_refused(path):
        return "kvikio-compat", "the file system refuses O_DIRECT"
    try:
        gds = bool(kvikio.cufile_driver.get("is_gds_available"))
    except (AttributeError, KeyError, RuntimeError) as exc:  # no cufile_driver, or cuFile error
        return "gds", f"cuFile in use; nvidia-fs state unknown ({type(exc).__name__})"
    if not gds:
        return "kvikio-compat", "cuFile without the nvidia-fs driver (cuFile's POSIX path)"
    return "gds", "cuFile with nvidia-fs"


class KvikioReader(Reader):
    """``kvikio.CuFile`` reads into GPU memory (CuPy, torch, anything with
    ``__cuda_array_interface__``; host arrays work too); reports ``gds`` or ``kvikio-compat``.

    ``compat_mode`` (``auto`` | ``on`` | ``off``, default option ``compat_mode``) is applied only
    while the file is opened: KvikIO fixes a file's mode at open, so the process-wide KvikIO
    setting is restored right after. ``chunk_bytes`` is KvikIO's task size. ``threads`` resizes
    KvikIO's process-wide thread pool; by default it is ``io_threads`` unless ``KVIKIO_NTHREADS``
    is set. A read KvikIO fails (``RuntimeError``) is submitted again up to ``retries`` times,
    then raised as :class:`ReadError` naming file, offset and length.
    """

    def __init__(self, path, *, compat_mode: str | None = None, threads: int | None = None,
                 chunk_bytes: int | None = None, retries: int | None = None,
                 expected_size: int | None = None):
        super().__init__(path, expected_size=expected_size)
        kvikio = import_kvikio()
        self.retries = defaults.get("io_retries") if retries is None else int(retries)
        setting = (compat_mode or defaults.get("compat_mode")).lower()
        if setting not in defaults.COMPAT_MODES:
            raise ValueError(f"compat_mode={setting!r}; choose one of {', '.join(defaults.COMPAT_MODES)}")
        self.task_size = defaults.get("chunk_bytes") if chunk_bytes is None else int(chunk_bytes)
        if threads is None and "KVIKIO_NTHREADS" not in os.environ:
            threads = defaults.get("io_threads")
        if threads is not None and kvikio.defaults.get("num_threads") != int(threads):
            kvikio.defaults.set("num_threads", int(threads))  # waits for running tasks, then resizes
        self.threads = kvikio.defaults.get("num_threads")
        with kvikio.defaults.set("compat_mode", getattr(kvikio.CompatMode, setting.upper())):
            try:
                self._file = kvikio.CuFile(self.path, "r")
            except RuntimeError as exc:  # compat_mode=off on a host where cuFile cannot work
                raise ReadError(f"KvikIO could not open {self.path} with compat_mode={setting}: {exc}",
                                path=self.path, offset=0, length=self.size) from exc
            preferred = bool(kvikio.defaults.is_compat_mode_preferred())
        self.mode, self.mode_reason = _kvikio_mode(kvikio, self.path, setting, preferred)
        self._closed = False

    def _submit(self, offset: int, length: int, into) -> IOFuture:
        if self._closed:
            raise ValueError(f"reader for {self.path} is closed")
        capacity = getattr(into, "nbytes", None)
        if capacity is not None and capacity < length:
            raise ValueError(f"destination holds {capacity} bytes, request is {length}")
        try:
            fut = self._file.pread(into, length, offset, self.task_size)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise self._error(exc, offset, length) from exc

        def wait() -> int:
            nonlocal fut
            failures = 0
            while True:  # KvikIO raises RuntimeError on an I/O error; retried like POSIX reads
                try:
                    got = fut.get()
                    break
                except RuntimeError as exc:
                    if failures >= self.retries:
                        raise self._error(exc, offset, length, failures) from exc
                    failures += 1
                    time.sleep(0.001 * failures)
                    try:
                        fut = self._file.pread(into, length, offset, self.task_size)
                    except RuntimeError as again:
                        raise self._error(again, offset, length, failures) from again
            if got != length:
                raise ReadError(
                    f"kvikio read of {self.path} returned {got} of {length} bytes at offset {offset}",
                    path=self.path, offset=offset, length=length)
            return got

        return IOFuture(length, wait=wait, poll=lambda: fut.done())  # the retried future, if any

    def _error(self, exc: Exception, offset: int, length: int, failures: int = 0) -> ReadError:
        return ReadError(
            f"kvikio read of {self.path} failed (offset={offset}, length={length}, mode {self.mode}) "
            f"after {failures} retr{'y' if failures == 1 else 'ies'}: {type(exc).__name__}: {exc}",
            path=self.path, offset=offset, length=length)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._file.close()


# -- choosing a backend -----------------------------------------------------------------------


READER_MODES = defaults.IO_MODES + ("gds", "kvikio-compat")


def check_mode(mode) -> str:
    """The reader mode ``mode`` names (``None``: option ``io``), or an ArgumentError listing them."""
    if mode is None:
        mode = defaults.get("io")
    if not isinstance(mode, str) or mode.lower() not in READER_MODES:
        raise ArgumentError(f"io (the reader mode) must be one of {', '.join(READER_MODES)}, got {mode!r}")
    return mode.lower()


def open_reader(path, mode: str | None = None, device: str = "cpu",
                expected_size: int | None = None, **options) -> Reader:
    """Open ``path`` with the backend ``mode`` (default: option ``io``, normally ``auto``).

    ``mode``: ``auto`` | ``kvikio`` | ``posix-direct`` | ``posix-buffered``, or a resulting mode
    asked for by name: ``gds`` (kvikio, compat mode off) or ``kvikio-compat`` (compat mode on).
    ``auto``: ``kvikio`` when ``device`` is a GPU, KvikIO loads and the file gets GDS, else
    ``posix-direct`` (which itself falls back to ``posix-buffered`` with a warning where O_DIRECT
    is refused); the reader's ``mode_reason`` says why. KvikIO in compat mode is not chosen by
    ``auto``: it reads through bounce buffers of its own, and on an H200 host without GDS it
    streamed a model 1.28x slower than posix-direct into pinned memory plus an async copy
    (docs/performance.md); ``mode="kvikio"`` still gives it. ``options``: ``threads``,
    ``chunk_bytes``, ``retries``, and ``compat_mode`` for kvikio. ``expected_size``: a shorter
    file is a ``ReadError`` now.
    """
    mode = check_mode(mode)
    if mode in ("gds", "kvikio-compat"):
        options["compat_mode"] = "off" if mode == "gds" else "on"
        mode = "kvikio"
    if mode == "auto":
        if str(device).startswith("cuda"):
            try:
                kv = KvikioReader(path, expected_size=expected_size, **options)
            except MissingDependencyError as exc:
                why = f"kvikio unavailable ({exc})"
            else:
                if kv.mode == "gds":
                    return kv
                why = f"KvikIO would run in compat mode ({kv.mode_reason})"
                kv.close()
            options.pop("compat_mode", None)
            reader = PosixReader(path, direct=True, expected_size=expected_size, **options)
            reader.mode_reason = f"auto: {why}; {reader.mode_reason}"
            return reader
        mode = "posix-direct"
    if mode == "kvikio":
        return KvikioReader(path, expected_size=expected_size, **options)
    options.pop("compat_mode", None)  # a kvikio setting; meaningless for POSIX reads
    return PosixReader(path, direct=(mode == "posix-direct"), expected_size=expected_size, **options)
