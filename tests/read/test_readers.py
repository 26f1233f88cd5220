"""Readers (CPU): exactness, fault injection, mode selection, alignment rules, host buffers.

Every read is compared byte for byte against the file's contents. Faults are injected by
replacing ``os.preadv`` / ``os.open`` (the only calls the POSIX reader makes) with wrappers that
fail in controlled ways and otherwise call the real function.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from bitgen import random_file

from endor_gds import defaults
from endor_gds.errors import MissingDependencyError, ReadError
from endor_gds.read import buffers, pagecache, readers

A = buffers.ALIGN
FILE_BYTES = 4 * 1024 * 1024 + 3 * A  # not a power of two; every size rule gets exercised
_real_preadv = os.preadv
_real_open = os.open


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return random_file(tmp_path_factory.mktemp("io"), FILE_BYTES, seed=7)


@pytest.fixture(params=["posix-direct", "posix-buffered"])
def mode(request):
    return request.param


def _open(path, mode, **kw):
    kw.setdefault("threads", 4)
    kw.setdefault("chunk_bytes", 64 * 1024)
    return readers.open_reader(path, mode=mode, **kw)


def _is_direct(fd) -> bool:
    import fcntl  # noqa: PLC0415

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


# -- exactness --------------------------------------------------------------------------------


def test_mode_is_reported(data_file, mode):
    path, _ = data_file
    with _open(path, mode) as r:
        assert r.mode == mode
        assert r.mode_reason
        assert mode in repr(r)


@pytest.mark.parametrize("pages", [1, 2, 3, 16, 17, 199])
def test_aligned_extents_exact(data_file, mode, pages):
    path, data = data_file
    length = pages * A
    offset = (FILE_BYTES - length) // A * A  # the last whole page of the file included
    buf = buffers.aligned_empty(length)
    with _open(path, mode, chunk_bytes=3 * A) as r:  # chunk that splits every extent oddly
        assert r.read((offset, length), buf) == length
    assert np.array_equal(buf, data[offset:offset + length])


def test_random_extents_exact(data_file, mode, rng):
    path, data = data_file
    with _open(path, mode, chunk_bytes=5 * A) as r:
        for _ in range(40):
            pages = int(rng.integers(1, FILE_BYTES // A))
            offset = int(rng.integers(0, FILE_BYTES // A - pages + 1)) * A
            buf = buffers.aligned_empty(pages * A)
            r.read((offset, pages * A), buf)
            assert np.array_equal(buf, data[offset:offset + pages * A]), (offset, pages)


@pytest.mark.parametrize("offset,length", [(0, 1), (1, 4095), (4095, 4097), (12345, 1),
                                           (FILE_BYTES - 7, 7), (3, 70001), (0, FILE_BYTES)])
def test_buffered_odd_sizes_exact(data_file, offset, length):
    path, data = data_file
    buf = bytearray(length)
    with _open(path, "posix-buffered", chunk_bytes=A) as r:
        r.read((offset, length), buf)
    assert bytes(buf) == data[offset:offset + length].tobytes()


def test_extent_object_and_zero_length(data_file, mode):
    path, data = data_file
    extent = types.SimpleNamespace(offset=2 * A, length=5 * A)
    buf = buffers.aligned_empty(8 * A)  # larger than the request: only the first bytes are written
    buf[:] = 0xEE
    with _open(path, mode) as r:
        fut = r.pread(extent, buf)
        assert fut.get() == 5 * A and fut.get() == 5 * A  # get() repeats its result
        assert fut.done()
        assert r.read((0, 0), buf) == 0
    assert np.array_equal(buf[:5 * A], data[2 * A:7 * A])
    assert (buf[5 * A:] == 0xEE).all()


def test_many_concurrent_reads_exact(data_file, mode):
    """Eight caller threads share one reader; every one of their 25 reads must be exact."""
    path, data = data_file
    errors = []

    def worker(seed):
        g = np.random.default_rng(seed)
        try:
            for _ in range(25):
                pages = int(g.integers(1, 64))
                offset = int(g.integers(0, FILE_BYTES // A - pages + 1)) * A
                buf = buffers.aligned_empty(pages * A)
                r.read((offset, pages * A), buf)
                if not np.array_equal(buf, data[offset:offset + pages * A]):
                    errors.append((seed, offset, pages))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    with _open(path, mode, threads=3, chunk_bytes=2 * A) as r:
        ts = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert errors == []


def test_many_futures_in_flight_exact(data_file, mode):
    path, data = data_file
    bufs = [buffers.aligned_empty(16 * A) for _ in range(32)]
    with _open(path, mode, threads=2, chunk_bytes=A) as r:
        futs = [r.pread((i * 16 * A, 16 * A), b) for i, b in enumerate(bufs)]
        assert sum(f.get() for f in futs) == 32 * 16 * A
    for i, b in enumerate(bufs):
        assert np.array_equal(b, data[i * 16 * A:(i + 1) * 16 * A])


def test_torch_cpu_destination(data_file, mode):
    path, data = data_file
    t = torch.empty(8 * A // 2, dtype=torch.bfloat16)
    if mode == "posix-direct" and t.data_ptr() % A:
        t = torch.from_numpy(buffers.aligned_empty(8 * A)).view(torch.bfloat16)
    with _open(path, mode) as r:
        r.read((A, 8 * A), t)
    assert np.array_equal(t.view(torch.uint8).numpy(), data[A:9 * A])


def test_done_is_false_while_a_read_is_blocked(data_file, monkeypatch):
    path, _ = data_file
    gate = threading.Event()

    def slow_preadv(fd, bufs, offset, *flags):
        gate.wait(10)
        return _real_preadv(fd, bufs, offset, *flags)

    with _open(path, "posix-buffered") as r:
        monkeypatch.setattr(os, "preadv", slow_preadv)
        fut = r.pread((0, A), bytearray(A))
        assert not fut.done()
        assert "pending" in repr(fut)
        gate.set()
        assert fut.get() == A and fut.done()


# -- faults -----------------------------------------------------------------------------------


def _faulty(monkeypatch, fail):
    """Route preadv through ``fail(call_number, fd, bufs, offset)``; returns the call counter."""
    calls = {"n": 0}
    lock = threading.Lock()

    def preadv(fd, bufs, offset, *flags):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        return fail(n, fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    return calls


def test_short_reads_are_continued(data_file, mode, monkeypatch):
    """Every read reports a short count (direct: one page plus 100 bytes; buffered: 1000 bytes)."""
    path, data = data_file
    with _open(path, mode, threads=2, chunk_bytes=8 * A) as r:
        step = A + 100 if r.direct else 1000

        def short(n, fd, bufs, offset):
            # The kernel fills more than it reports; the unreported bytes are scribbled over so
            # a reader that trusted them would fail the comparison.
            got = min(step, _real_preadv(fd, bufs, offset))
            tail = np.frombuffer(bufs[0], dtype=np.uint8)[got:]
            tail[:] = 0xAB
            return got

        calls = _faulty(monkeypatch, short)
        buf = buffers.aligned_empty(64 * A)
        r.read((4 * A, 64 * A), buf)
    assert np.array_equal(buf, data[4 * A:68 * A])
    # direct: each call advances exactly one page; buffered: 1000 bytes. Unbroken reads: 8 calls.
    assert calls["n"] == (64 if mode == "posix-direct" else 8 * -(-8 * A // 1000))


def test_eintr_is_retried(data_file, mode, monkeypatch):
    path, data = data_file
    with _open(path, mode) as r:
        def eintr(n, fd, bufs, offset):
            if n % 2:
                raise InterruptedError(errno.EINTR, "Interrupted system call")
            return _real_preadv(fd, bufs, offset)

        calls = _faulty(monkeypatch, eintr)
        buf = buffers.aligned_empty(32 * A)
        r.read((0, 32 * A), buf)
    assert np.array_equal(buf, data[:32 * A])
    assert calls["n"] >= 2 * (32 * A // r.chunk_bytes)


@pytest.mark.parametrize("failures,retries,ok", [(2, 3, True), (3, 3, True), (4, 3, False),
                                                 (1, 0, False)])
def test_eio_retry_budget(data_file, mode, monkeypatch, failures, retries, ok):
    """EIO ``failures`` times, then success: passes iff failures <= retries."""
    path, data = data_file
    with _open(path, mode, threads=1, chunk_bytes=16 * A, retries=retries) as r:
        def eio_then_ok(n, fd, bufs, offset):
            if n <= failures:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return _real_preadv(fd, bufs, offset)

        _faulty(monkeypatch, eio_then_ok)
        buf = buffers.aligned_empty(16 * A)
        if ok:
            r.read((16 * A, 16 * A), buf)
            assert np.array_equal(buf, data[16 * A:32 * A])
        else:
            with pytest.raises(ReadError, match=rf"data\.bin failed at offset {16 * A} "
                                                rf"\(request offset={16 * A}, length={16 * A}\)"
                                                rf" after {retries} retr.*Input/output error"):
                r.read((16 * A, 16 * A), buf)


def test_eio_forever_names_file_offset_length(data_file, mode, monkeypatch):
    path, _ = data_file
    with _open(path, mode, chunk_bytes=4 * A, retries=2) as r:
        def always(n, fd, bufs, offset):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        _faulty(monkeypatch, always)
        with pytest.raises(ReadError, match=r"reading .*data\.bin failed .*length=") as info:
            r.read((8 * A, 12 * A), buffers.aligned_empty(12 * A))
    err = info.value
    assert err.path == str(path) and err.errno == errno.EIO
    assert err.offset in (8 * A, 12 * A, 16 * A) and err.length == 4 * A  # the failing chunk


def test_non_retryable_error_is_immediate(data_file, monkeypatch):
    path, _ = data_file
    with _open(path, "posix-buffered", retries=5) as r:
        calls = _faulty(monkeypatch, lambda n, *a: (_ for _ in ()).throw(
            OSError(errno.EBADF, os.strerror(errno.EBADF))))
        with pytest.raises(ReadError, match="after 0 retries: Bad file descriptor"):
            r.read((0, A), bytearray(A))
    assert calls["n"] == 1


def test_unexpected_eof_is_an_error(data_file, mode, monkeypatch):
    path, _ = data_file
    with _open(path, mode) as r:
        _faulty(monkeypatch, lambda *a: 0)
        with pytest.raises(ReadError, match=r"ends before offset 0: request offset=0, length=4096 "
                                            r"\(file truncated\?\)"):
            r.read((0, A), buffers.aligned_empty(A))


def test_direct_read_without_progress_gives_up(data_file, monkeypatch):
    path, _ = data_file
    with _open(path, "posix-direct", retries=3) as r:
        calls = _faulty(monkeypatch, lambda *a: 100)  # never a whole page
        with pytest.raises(ReadError, match="less than one page, repeatedly"):
            r.read((0, 2 * A), buffers.aligned_empty(2 * A))
    assert calls["n"] == 4  # the first try and 3 retries


def test_one_failed_chunk_fails_the_future_after_all_chunks(data_file, monkeypatch):
    """Chunk 3 fails at once, chunks 4..7 finish 0.3 s later: get() raises only after them."""
    path, _ = data_file
    finished = []
    gate = threading.Timer(0.3, lambda: None)
    gate.start()

    def one_bad(n, fd, bufs, offset):
        if offset == 3 * A:
            raise OSError(errno.EIO, "Input/output error")
        if offset > 3 * A:
            gate.join()
        got = _real_preadv(fd, bufs, offset)
        finished.append(offset)
        return got

    with _open(path, "posix-buffered", threads=8, chunk_bytes=A, retries=0) as r:
        _faulty(monkeypatch, one_bad)
        fut = r.pread((0, 8 * A), bytearray(8 * A))
        with pytest.raises(ReadError, match=f"offset={3 * A}"):
            fut.get()
        assert len(finished) == 7 and fut.done()
        with pytest.raises(ReadError):  # the same error again, not a hang or a new read
            fut.get()


# -- open-time checks, alignment, modes -------------------------------------------------------


def test_truncated_file_detected_at_open(data_file, mode):
    path, _ = data_file
    with pytest.raises(ReadError, match=rf"data\.bin is {FILE_BYTES} bytes but its header says "
                                        rf"{FILE_BYTES + A} \(truncated\? 4096 bytes missing\)"):
        readers.open_reader(path, mode=mode, expected_size=FILE_BYTES + A)
    readers.open_reader(path, mode=mode, expected_size=FILE_BYTES).close()


def test_read_past_end_is_an_error(data_file, mode):
    path, _ = data_file
    with _open(path, mode) as r:
        with pytest.raises(ReadError, match=rf"runs past the end of .*\({FILE_BYTES} bytes\)"):
            r.read((FILE_BYTES - A, 2 * A), buffers.aligned_empty(2 * A))
        with pytest.raises(ValueError, match="negative read request"):
            r.read((-A, A), buffers.aligned_empty(A))


@pytest.mark.parametrize("offset,length,shift,bad", [
    (100, A, 0, "offset=100"), (0, A + 1, 0, "length=4097"), (0, A, 8, "buffer address="),
])
def test_unaligned_direct_request_says_why(data_file, offset, length, shift, bad):
    path, _ = data_file
    buf = buffers.aligned_empty(3 * A)[shift:]
    with _open(path, "posix-direct") as r:
        with pytest.raises(ValueError, match=rf"posix-direct reads need offset, length and buffer "
                                             rf"address aligned to 4096 bytes \(O_DIRECT\); got {bad}"):
            r.pread((offset, length), buf)
    with _open(path, "posix-buffered") as r:  # the same request is fine through the page cache
        r.read((offset, length), buf)


def test_destination_checks(data_file, mode):
    path, _ = data_file
    with _open(path, mode) as r:
        with pytest.raises(ValueError, match="destination holds 4096 bytes, request is 8192"):
            r.read((0, 2 * A), buffers.aligned_empty(A))
        with pytest.raises(ValueError, match="read-only"):
            r.read((0, A), bytes(A))
        with pytest.raises(ValueError, match="C-contiguous"):
            r.read((0, A), np.zeros((4, 2 * A), np.uint8)[:, ::2])
    with pytest.raises(ValueError, match="is closed"):
        r.read((0, A), buffers.aligned_empty(A))


def test_bad_reader_settings(data_file):
    path, _ = data_file
    with pytest.raises(ValueError, match="chunk_bytes=1000 must be a positive multiple of 4096"):
        readers.open_reader(path, mode="posix-direct", chunk_bytes=1000)
    with pytest.raises(ValueError, match="at least 1 thread"):
        readers.open_reader(path, mode="posix-direct", threads=0)
    with pytest.raises(ValueError, match=r"io \(the reader mode\) must be one of auto, kvikio.*got 'nvme'"):
        readers.open_reader(path, mode="nvme")


def test_o_direct_refused_at_open_falls_back_with_warning(data_file, monkeypatch):
    path, data = data_file

    def no_direct(p, flags, *a, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return _real_open(p, flags, *a, **kw)

    monkeypatch.setattr(os, "open", no_direct)
    with pytest.warns(RuntimeWarning, match=r"refuses O_DIRECT \(open: Invalid argument\); reading "
                                            r"through the page cache \(mode posix-buffered\)"):
        r = readers.open_reader(path, mode="posix-direct")
    with r:
        assert r.mode == "posix-buffered" and not r.direct
        assert "O_DIRECT refused" in r.mode_reason
        buf = buffers.aligned_empty(4 * A)
        r.read((A, 4 * A), buf)
    assert np.array_equal(buf, data[A:5 * A])


def test_o_direct_refused_at_first_read_falls_back(data_file, monkeypatch):
    """Some file systems take O_DIRECT at open and refuse the read: the open-time probe sees it."""
    path, _ = data_file

    def refuse_direct(fd, bufs, offset, *flags):
        if _is_direct(fd):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return _real_preadv(fd, bufs, offset, *flags)

    monkeypatch.setattr(os, "preadv", refuse_direct)
    with pytest.warns(RuntimeWarning, match=r"first read: Invalid argument"):
        with readers.open_reader(path, mode="posix-direct") as r:
            assert r.mode == "posix-buffered"


def test_mode_from_defaults_and_argument(data_file):
    path, _ = data_file
    with defaults.set(io="posix-buffered"):
        with readers.open_reader(path) as r:
            assert r.mode == "posix-buffered"
        with readers.open_reader(path, mode="posix-direct") as r:  # the argument wins
            assert r.mode == "posix-direct"
    with readers.open_reader(path) as r:  # auto on a CPU destination
        assert r.mode == "posix-direct"


def test_tunables_from_defaults(data_file):
    path, _ = data_file
    with defaults.set(io_threads=3, chunk_bytes="12KiB", io_retries=7):
        with readers.open_reader(path, mode="posix-buffered") as r:
            assert (r.threads, r.chunk_bytes, r.retries) == (3, 12 * 1024, 7)


def test_mode_from_environment(data_file):
    path, _ = data_file
    code = ("import endor_gds.read.readers as io; r = io.open_reader(__import__('sys').argv[1]); "
            "print(r.mode, r.threads); r.close()")
    env = dict(os.environ, ENDOR_IO="posix-buffered", ENDOR_IO_THREADS="5")
    out = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["posix-buffered", "5"]


def test_kvikio_missing_is_a_clear_error(data_file, monkeypatch):
    path, _ = data_file
    monkeypatch.setitem(sys.modules, "kvikio", None)  # import kvikio -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'endor_gds\[gpu\]' \(kvikio-cu13\)"):
        readers.open_reader(path, mode="kvikio")
    with readers.open_reader(path, mode="auto", device="cuda") as r:  # auto: POSIX, and says why
        assert r.mode == "posix-direct"
        assert r.mode_reason.startswith("auto: kvikio unavailable")


# -- KvikIO backend logic against a stand-in with KvikIO's 25.x/26.x Python API ----------------


class _FakeKvikio(types.ModuleType):
    """``CuFile(path, flags).pread(buf, size, file_offset, task_size) -> future``; ``defaults.set``
    as a restoring context; ``defaults.is_compat_mode_preferred()``; ``cufile_driver.get``."""

    def __init__(self, *, cufile_loads: bool, nvidia_fs: bool):
        super().__init__("kvikio")
        compat = types.SimpleNamespace(AUTO="AUTO", ON="ON", OFF="OFF")
        state = {"compat_mode": "AUTO", "num_threads": 1}
        opened = []

        class _Set:
            def __init__(self, key, value):
                self.old = {key: state[key]}
                state[key] = value

            def __enter__(self):
                return None

            def __exit__(self, *exc):
                state.update(self.old)

        class _Future:
            def __init__(self, n):
                self.n = n

            def get(self):
                return self.n

            def done(self):
                return True

        class CuFile:
            def __init__(self, path, flags="r"):
                self.fd = os.open(path, os.O_RDONLY)
                opened.append(state["compat_mode"])

            def pread(self, buf, size=None, file_offset=0, task_size=None):
                return _Future(os.preadv(self.fd, [memoryview(buf).cast("B")[:size]], file_offset))

            def close(self):
                os.close(self.fd)

        self.CompatMode, self.CuFile, self.state, self.opened = compat, CuFile, state, opened
        self.defaults = types.SimpleNamespace(
            set=_Set, get=lambda key: state[key],
            is_compat_mode_preferred=lambda: state["compat_mode"] == "ON" or
            (state["compat_mode"] == "AUTO" and not cufile_loads))
        if nvidia_fs is not None:  # None: a KvikIO whose cufile_driver did not import
            self.cufile_driver = types.SimpleNamespace(
                get=lambda key: {"is_gds_available": nvidia_fs}[key])


@pytest.mark.parametrize("cufile_loads,nvidia_fs,expect", [
    (True, True, ("gds", "cuFile with nvidia-fs")),
    (True, None, ("gds", "nvidia-fs state unknown")),
    (True, False, ("posix-direct", "auto: KvikIO would run in compat mode (cuFile without")),
    (False, False, ("posix-direct", "auto: KvikIO would run in compat mode (cuFile unavailable")),
])
def test_auto_on_a_gpu_takes_kvikio_only_for_gds(data_file, monkeypatch, cufile_loads, nvidia_fs,
                                                 expect):
    path, data = data_file
    fake = _FakeKvikio(cufile_loads=cufile_loads, nvidia_fs=nvidia_fs)
    monkeypatch.setattr(readers, "import_kvikio", lambda: fake)
    with readers.open_reader(path, mode="auto", device="cuda") as r:
        assert r.mode == expect[0] and expect[1] in r.mode_reason, (r.mode, r.mode_reason)
        buf = buffers.aligned_empty(2 * A)
        assert r.read((A, 2 * A), buf) == 2 * A
    assert np.array_equal(buf, data[A:3 * A])


@pytest.mark.parametrize("cufile_loads,nvidia_fs,compat,o_direct,expect", [
    (False, False, "auto", True, ("kvikio-compat", "cuFile unavailable")),
    (True, False, "auto", True, ("kvikio-compat", "without the nvidia-fs driver")),
    (True, True, "auto", True, ("gds", "cuFile with nvidia-fs")),
    (True, True, "auto", False, ("kvikio-compat", "the file system refuses O_DIRECT")),
    (True, None, "auto", True, ("gds", "nvidia-fs state unknown")),
    (True, True, "on", True, ("kvikio-compat", "compat mode forced on")),
])
def test_kvikio_mode_decision(data_file, monkeypatch, cufile_loads, nvidia_fs, compat, o_direct,
                              expect):
    path, data = data_file
    fake = _FakeKvikio(cufile_loads=cufile_loads, nvidia_fs=nvidia_fs)
    monkeypatch.setattr(readers, "import_kvikio", lambda: fake)
    if not o_direct:
        def no_direct(p, flags, *a, **kw):
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return _real_open(p, flags, *a, **kw)

        monkeypatch.setattr(os, "open", no_direct)
    with readers.open_reader(path, mode="kvikio", compat_mode=compat, threads=6, chunk_bytes=2 * A) as r:
        assert r.mode == expect[0] and expect[1] in r.mode_reason, (r.mode, r.mode_reason)
        buf = buffers.aligned_empty(4 * A)
        fut = r.pread((A, 4 * A), buf)
        assert fut.done() and fut.get() == 4 * A
        with pytest.raises(ValueError, match="destination holds 4096 bytes, request is 8192"):
            r.pread((0, 2 * A), buffers.aligned_empty(A))
    assert np.array_equal(buf, data[A:5 * A])
    assert fake.opened == [compat.upper()]          # the file was opened under the asked mode
    assert fake.state["compat_mode"] == "AUTO"      # and KvikIO's global setting was restored
    assert fake.state["num_threads"] == 6 and r.task_size == 2 * A


def test_kvikio_mode_names_map_to_compat_setting(data_file, monkeypatch):
    path, _ = data_file
    fake = _FakeKvikio(cufile_loads=True, nvidia_fs=True)
    monkeypatch.setattr(readers, "import_kvikio", lambda: fake)
    with readers.open_reader(path, mode="kvikio-compat") as r:
        assert r.mode == "kvikio-compat"
    with readers.open_reader(path, mode="gds") as r:
        assert r.mode == "gds"
    assert fake.opened == ["ON", "OFF"]


@pytest.mark.parametrize("failures,ok", [(2, True), (3, False)])
def test_kvikio_io_errors_are_retried_then_named(data_file, monkeypatch, failures, ok):
    path, data = data_file
    fake = _FakeKvikio(cufile_loads=True, nvidia_fs=True)
    monkeypatch.setattr(readers, "import_kvikio", lambda: fake)
    with readers.open_reader(path, mode="kvikio", retries=2) as r:
        real, calls = r._file.pread, []

        def flaky(buf, size, off, task):
            calls.append(off)
            if len(calls) <= failures:
                return types.SimpleNamespace(get=lambda: (_ for _ in ()).throw(
                    RuntimeError("POSIX error: Input/output error")), done=lambda: True)
            return real(buf, size, off, task)

        r._file.pread = flaky
        buf = buffers.aligned_empty(A)
        if ok:
            assert r.read((3 * A, A), buf) == A
            assert np.array_equal(buf, data[3 * A:4 * A])
        else:
            with pytest.raises(ReadError, match=r"data\.bin failed \(offset=12288, length=4096, "
                                                r"mode gds\) after 2 retries: RuntimeError"):
                r.read((3 * A, A), buf)
    assert len(calls) == min(failures, 2) + 1


def test_kvikio_short_read_is_an_error(data_file, monkeypatch):
    path, _ = data_file
    fake = _FakeKvikio(cufile_loads=True, nvidia_fs=True)
    monkeypatch.setattr(readers, "import_kvikio", lambda: fake)
    with readers.open_reader(path, mode="kvikio") as r:
        r._file.pread = lambda buf, size, off, task: types.SimpleNamespace(
            get=lambda: size - 1, done=lambda: True)
        with pytest.raises(ReadError, match=r"returned 4095 of 4096 bytes at offset 8192"):
            r.read((2 * A, A), buffers.aligned_empty(A))


# -- host memory and the page cache -----------------------------------------------------------


@pytest.mark.parametrize("nbytes,align", [(0, A), (1, A), (A + 1, A), (5, 2 << 20), (100, 64)])
def test_aligned_empty(nbytes, align):
    buf = buffers.aligned_empty(nbytes, align)
    assert buf.dtype == np.uint8 and buf.nbytes == nbytes and buf.flags.writeable
    if nbytes:
        assert buf.ctypes.data % align == 0
    with pytest.raises(ValueError, match="power-of-two align"):
        buffers.aligned_empty(10, 3000)


def test_large_buffers_are_huge_page_aligned():
    """2 MiB alignment is what lets the kernel back a staging buffer with huge pages."""
    for nbytes in (2 << 20, 5 * (1 << 20) + 3):
        assert buffers.aligned_empty(nbytes).ctypes.data % (2 << 20) == 0


@pytest.mark.skipif(buffers.cuda_available(), reason="checks the behaviour without a GPU")
def test_host_buffer_without_gpu():
    buf = buffers.host_buffer(3 * A + 5)
    assert buf.ctypes.data % A == 0 and buf.nbytes == 3 * A + 5
    with pytest.raises(MissingDependencyError, match=r"pinned=True\) needs a CUDA GPU"):
        buffers.host_buffer(A, pinned=True)


def _fs_type(path: Path) -> str:
    from endor_gds.benchmarks.system import fs_info  # noqa: PLC0415

    return fs_info(path).get("fstype", "")


def test_evict_page_cache_really_evicts(tmp_path):
    path = tmp_path / "cache.bin"
    path.write_bytes(os.urandom(2 << 20))  # dirty pages: evict must flush them first
    if _fs_type(path) in ("tmpfs", "ramfs", "overlay", ""):
        pytest.skip(f"{_fs_type(path) or 'unknown'} file system: pages cannot be evicted")
    path.read_bytes()
    before = pagecache.page_cache_fraction(path)
    pagecache.evict_page_cache(path)
    after = pagecache.page_cache_fraction(path)
    assert before is not None and after is not None
    assert before > 0.9 and after < 0.1, (before, after)


def test_evict_page_cache_pages_out_own_mappings(tmp_path):
    """A file this process has mapped (safetensors, Accelerate's disk offload) keeps its pages
    under DONTNEED alone; ``mapped=True`` pages the mapping out, and the data reads back intact."""
    import mmap  # noqa: PLC0415

    path = tmp_path / "mapped.bin"
    data = os.urandom(2 << 20)
    path.write_bytes(data)
    if _fs_type(path) in ("tmpfs", "ramfs", "overlay", ""):
        pytest.skip(f"{_fs_type(path) or 'unknown'} file system: pages cannot be evicted")
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        assert m[:] == data  # faults every page in through the mapping
        pagecache.evict_page_cache(path)
        assert pagecache.page_cache_fraction(path) > 0.9  # mapped pages survive DONTNEED
        pagecache.evict_page_cache(path, mapped=True)
        assert pagecache.page_cache_fraction(path) < 0.1
        assert m[:] == data  # paged out, not lost
    finally:
        m.close()
