"""Faults during a pack (issue 7): a full disk, a failing disk, Ctrl-C, two packs at once.

The promise (endor_gds/packer.py): the destination is either the old file, untouched, or the
new whole file, never a mix; no temporary file is left behind; the source is only read. Faults
are injected at every kind of write the packer makes (the temporary file's writes, its fsync,
the rename, the source reads), at several points of the file; two tests use real processes: a
kernel write error from RLIMIT_FSIZE and a real SIGINT, and two packers racing for one name.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import endor_gds
from endor_gds.errors import EndorError, PackError, ReadError

REPO = Path(__file__).resolve().parents[2]


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def src(model_dir):
    return model_dir("llama", torch.float16)


@pytest.fixture(scope="module")
def good_bytes(packed):
    """A valid packed file, used as a pre-existing destination that must survive."""
    return packed("llama", torch.float16, prune="magnitude").read_bytes()


class _Faults:
    """Wraps ``open`` so that the packer's temporary file fails at its ``fail_at``-th write
    (after writing half of that buffer, as a real short write before ENOSPC would)."""

    def __init__(self, folder: Path, fail_at: int | None, exc: BaseException):
        self.folder, self.fail_at, self.exc, self.writes = folder, fail_at, exc, 0
        self._open = builtins.open

    def open(self, file, mode="r", *args, **kwargs):
        f = self._open(file, mode, *args, **kwargs)
        if "w" in mode and Path(os.fspath(file)).parent == self.folder:
            return _FaultyFile(f, self)
        return f


class _FaultyFile:
    def __init__(self, f, faults: _Faults):
        self._f, self._faults = f, faults

    def write(self, data):
        faults = self._faults
        faults.writes += 1
        if faults.writes == faults.fail_at:
            view = memoryview(data).cast("B")
            self._f.write(view[: len(view) // 2])
            raise faults.exc
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False


def _count_writes(src, tmp_path, monkeypatch) -> int:
    faults = _Faults(tmp_path, None, OSError())
    monkeypatch.setattr(builtins, "open", faults.open)
    endor_gds.pack(src, tmp_path / "count.endor", prune="magnitude", progress=False)
    monkeypatch.setattr(builtins, "open", faults._open)
    (tmp_path / "count.endor").unlink()
    return faults.writes


def _setup_dst(tmp_path, good_bytes, existing: bool) -> Path:
    dst = tmp_path / "model.endor"
    if existing:
        dst.write_bytes(good_bytes)
    return dst


def _assert_clean(tmp_path, dst, good_bytes, existing, src, src_before):
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == (["model.endor"] if existing else []), f"left behind: {left}"
    if existing:
        assert dst.read_bytes() == good_bytes, "the existing destination was changed"
    assert tree_hash(src) == src_before, "the source was changed"


WRITE_ERRORS = [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EIO, "Input/output error")]


@pytest.mark.parametrize("existing", [False, True], ids=["no-dst", "existing-dst"])
@pytest.mark.parametrize("exc", WRITE_ERRORS, ids=["ENOSPC", "EIO"])
def test_write_errors_at_every_stage(src, tmp_path, monkeypatch, good_bytes, exc, existing):
    """The temporary file's writes fail: first (header page), second (first segment), middle,
    the manifest (next to last) and the final header rewrite (last)."""
    src_before = tree_hash(src)
    n = _count_writes(src, tmp_path, monkeypatch)
    assert n > 10
    for fail_at in (1, 2, n // 2, n - 1, n):
        dst = _setup_dst(tmp_path, good_bytes, existing)
        faults = _Faults(tmp_path, fail_at, exc)
        monkeypatch.setattr(builtins, "open", faults.open)
        with pytest.raises(PackError, match=rf"{os.strerror(exc.errno)}.*Nothing was written at "
                                            rf"{dst}; the source is untouched"):
            endor_gds.pack(src, dst, prune="magnitude", progress=False)
        monkeypatch.setattr(builtins, "open", faults._open)
        assert faults.writes == fail_at
        _assert_clean(tmp_path, dst, good_bytes, existing, src, src_before)


@pytest.mark.parametrize("existing", [False, True], ids=["no-dst", "existing-dst"])
def test_interrupt_at_every_stage(src, tmp_path, monkeypatch, good_bytes, existing):
    """Ctrl-C (KeyboardInterrupt) while writing: it propagates as itself; nothing is left."""
    src_before = tree_hash(src)
    n = _count_writes(src, tmp_path, monkeypatch)
    for fail_at in (1, n // 3, n - 1, n):
        dst = _setup_dst(tmp_path, good_bytes, existing)
        faults = _Faults(tmp_path, fail_at, KeyboardInterrupt())
        monkeypatch.setattr(builtins, "open", faults.open)
        with pytest.raises(KeyboardInterrupt):
            endor_gds.pack(src, dst, prune="magnitude", progress=False)
        monkeypatch.setattr(builtins, "open", faults._open)
        _assert_clean(tmp_path, dst, good_bytes, existing, src, src_before)


@pytest.mark.parametrize("existing", [False, True], ids=["no-dst", "existing-dst"])
@pytest.mark.parametrize("where, exc, match", [
    ("fsync", OSError(errno.EIO, "Input/output error"), "Input/output error"),
    ("fsync", KeyboardInterrupt(), None),
    ("replace", OSError(errno.EIO, "Input/output error"), "Input/output error"),
    ("replace", OSError(errno.EXDEV, "Invalid cross-device link"), "cross-device"),
    ("replace", KeyboardInterrupt(), None),
    ("open", OSError(errno.ENOSPC, "No space left on device"), "No space left"),
], ids=["fsync-EIO", "fsync-ctrl-c", "replace-EIO", "replace-EXDEV", "replace-ctrl-c", "create-ENOSPC"])
def test_faults_in_fsync_rename_and_create(src, tmp_path, monkeypatch, good_bytes, where, exc, match, existing):
    src_before = tree_hash(src)
    dst = _setup_dst(tmp_path, good_bytes, existing)
    calls = []

    def fail(*args, **kwargs):
        calls.append(args)
        raise exc

    if where == "open":  # creating the temporary file fails
        real_open = builtins.open

        def failing_open(file, mode="r", *a, **k):
            if "w" in mode and Path(os.fspath(file)).parent == tmp_path:
                return fail(file)
            return real_open(file, mode, *a, **k)

        monkeypatch.setattr(builtins, "open", failing_open)
    else:
        monkeypatch.setattr(os, where, fail)  # the first fsync is the file's, before the rename
    expected = KeyboardInterrupt if isinstance(exc, KeyboardInterrupt) else PackError
    with pytest.raises(expected, match=match and rf"{match}.*Nothing was written at {dst}"):
        endor_gds.pack(src, dst, prune="magnitude", progress=False)
    monkeypatch.undo()
    assert len(calls) == 1
    _assert_clean(tmp_path, dst, good_bytes, existing, src, src_before)


def test_folder_fsync_failure_after_rename_is_reported_truthfully(src, tmp_path, monkeypatch, good_bytes):
    dst = _setup_dst(tmp_path, good_bytes, True)
    real = os.fsync
    calls = []

    def second_fails(fd):
        calls.append(fd)
        if len(calls) == 2:  # the folder's fsync, after the rename
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fsync", second_fails)
    with pytest.raises(PackError) as info:
        endor_gds.pack(src, dst, prune="none", progress=False)
    monkeypatch.undo()
    with endor_gds.open(dst) as f:
        assert not list(f.verify())
        replaced = f.manifest["prune"]["method"] == "none"
    assert replaced, "the new file is at the destination"
    assert "Nothing was written" not in str(info.value) and "written whole" in str(info.value)


def _src_read_faults(monkeypatch, src: Path, failures: int):
    """``os.preadv`` on the source's files fails with EIO ``failures`` times (then works)."""
    real = os.preadv
    state = {"left": failures, "seen": 0}
    root = str(src.resolve())

    def preadv(fd, buffers, offset, *rest):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(root):
            state["seen"] += 1
            if state["left"] > 0:
                state["left"] -= 1
                raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset, *rest)

    monkeypatch.setattr(os, "preadv", preadv)
    return state


@pytest.mark.parametrize("existing", [False, True], ids=["no-dst", "existing-dst"])
def test_failing_source_reads(src, tmp_path, monkeypatch, good_bytes, existing):
    """A source read that keeps failing: retried, then an error naming the source file, offset
    and errno; nothing at the destination, no temporary file."""
    src_before = tree_hash(src)
    dst = _setup_dst(tmp_path, good_bytes, existing)
    state = _src_read_faults(monkeypatch, src, failures=10**9)
    with pytest.raises(EndorError, match=r"reading .*model\.safetensors failed at offset \d+ .* after 3 "
                                         r"retries: Input/output error") as info:
        endor_gds.pack(src, dst, prune="magnitude", progress=False)
    monkeypatch.undo()
    assert isinstance(info.value, (ReadError, PackError)) and state["seen"] == 4  # 1 try + 3 retries
    _assert_clean(tmp_path, dst, good_bytes, existing, src, src_before)


def test_failing_source_reads_are_a_pack_error(src, tmp_path, monkeypatch):
    _src_read_faults(monkeypatch, src, failures=10**9)
    with pytest.raises(PackError, match="Input/output error.*Nothing was written"):
        endor_gds.pack(src, tmp_path / "model.endor", prune="magnitude", progress=False)


def test_transient_source_read_errors_are_retried(src, tmp_path, monkeypatch, packed):
    state = _src_read_faults(monkeypatch, src, failures=2)
    dst = tmp_path / "model.endor"
    endor_gds.pack(src, dst, prune="magnitude", progress=False)
    monkeypatch.undo()
    assert state["left"] == 0
    assert dst.read_bytes() == packed("llama", torch.float16, prune="magnitude").read_bytes()


# ---------------------------------------------------------------------------------------------
# Real processes: a kernel write error, a real SIGINT, two packers racing.

_CHILD = textwrap.dedent("""
    import os, resource, signal, sys, time
    import endor_gds, endor_gds.container as layout
    src, dst, mode, arg = sys.argv[1:5]
    if mode == "fsize":  # the kernel refuses writes past this size: EFBIG, a real write error
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(arg), int(arg)))
    if mode == "slow":
        # Ctrl-C as a terminal delivers it, whatever this process inherited: a job started in
        # the background of a non-interactive shell (nohup, `&` in a CI script) inherits SIGINT
        # ignored, and Python then installs no KeyboardInterrupt handler at all.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if mode in ("slow", "race"):  # slow writes, so that a signal or the other packer lands mid-pack
        real = layout.Writer.write_segment
        def slow(self, kind, data):
            open(dst + f".writing-{os.getpid()}", "w").close() if mode == "slow" else None
            time.sleep(0.02)
            return real(self, kind, data)
        layout.Writer.write_segment = slow
    if mode == "race":  # say we are ready, then wait for the start signal
        open(f"{arg}.ready-{os.getpid()}", "w").close()
        while not os.path.exists(arg):
            time.sleep(0.005)
    t0 = time.time()
    endor_gds.pack(src, dst, prune="magnitude", sparsity=float(os.environ.get("SPARSITY", 0.5)),
                   progress=False)
    print(f"{t0} {time.time()}")
""")


def _child(src, dst, mode, arg, **env):
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(src), str(dst), mode, str(arg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **env))


def test_real_write_error_from_the_kernel(src, tmp_path, good_bytes):
    src_before = tree_hash(src)
    dst = _setup_dst(tmp_path, good_bytes, True)  # an existing file larger than the limit
    p = _child(src, dst, "fsize", 64 << 10)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1 and "PackError" in err and "File too large" in err, err[-2000:]
    _assert_clean(tmp_path, dst, good_bytes, True, src, src_before)


def test_real_sigint_mid_pack(src, tmp_path, good_bytes):
    src_before = tree_hash(src)
    dst = _setup_dst(tmp_path, good_bytes, True)
    p = _child(src, dst, "slow", 0)
    deadline = time.time() + 120
    while not list(tmp_path.glob("model.endor.writing-*")):  # it has started writing segments
        assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else ""
        time.sleep(0.01)
    assert list(tmp_path.glob(".model.endor.*.tmp")), "the temporary file exists while it writes"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]
    for marker in tmp_path.glob("model.endor.writing-*"):
        marker.unlink()
    _assert_clean(tmp_path, dst, good_bytes, True, src, src_before)


def test_two_packs_to_one_destination(src, tmp_path, packed):
    """Two processes pack the same checkpoint at different sparsities to one name, at the same
    time: the destination is exactly one of the two complete files, never a mix."""
    expected = {s: packed("llama", torch.float16, prune="magnitude", sparsity=s).read_bytes()
                for s in (0.3, 0.7)}
    dst, go = tmp_path / "model.endor", tmp_path / "go"
    for _round in range(2):
        procs = [_child(src, dst, "race", go, SPARSITY=str(s)) for s in (0.3, 0.7)]
        deadline = time.time() + 300
        while len(list(tmp_path.glob("go.ready-*"))) < 2:  # both imported and waiting
            assert time.time() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.01)
        go.touch()
        spans = []
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-2000:]
            spans.append(tuple(map(float, out.split())))
        go.unlink()
        for ready in tmp_path.glob("go.ready-*"):
            ready.unlink()
        (a0, a1), (b0, b1) = spans
        assert a0 < b1 and b0 < a1, f"the two packs did not overlap in time: {spans}"
        data = dst.read_bytes()
        assert data in expected.values(), "the destination is not one of the two whole files"
        with endor_gds.open(dst) as f:
            assert not list(f.verify())
            assert f.manifest["prune"]["sparsity"] in expected
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.endor"]
