"""KvikIO reader and pinned host buffers on a real GPU (every test carries the ``gpu`` marker).

Reads land in CuPy and torch device buffers and are compared bit for bit with the file; the
mode the reader reports must be one KvikIO can give (``gds`` or ``kvikio-compat``), and forcing
compat mode must report ``kvikio-compat``.
"""

from __future__ import annotations

import numpy as np
import pytest
from bitgen import random_file

from endor_gds.errors import ReadError
from endor_gds.read import buffers, readers

pytestmark = pytest.mark.gpu

A = buffers.ALIGN
FILE_BYTES = 16 * 1024 * 1024 + 5 * A


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return random_file(tmp_path_factory.mktemp("kvikio"), FILE_BYTES, seed=11)


def _device_buffer(kind: str, nbytes: int):
    if kind == "cupy":
        cupy = pytest.importorskip("cupy")
        return cupy.empty(nbytes, dtype=cupy.uint8), lambda b: cupy.asnumpy(b)
    import torch  # noqa: PLC0415

    return torch.empty(nbytes, dtype=torch.uint8, device="cuda"), lambda b: b.cpu().numpy()


@pytest.mark.parametrize("kind", ["cupy", "torch"])
@pytest.mark.parametrize("compat", ["auto", "on"])
def test_kvikio_reads_into_device_memory_exact(data_file, kind, compat, rng):
    path, data = data_file
    with readers.open_reader(path, mode="kvikio", compat_mode=compat, threads=4,
                         chunk_bytes=1 << 20) as r:
        assert r.mode in ("gds", "kvikio-compat") and r.mode_reason
        if compat == "on":
            assert r.mode == "kvikio-compat"
        cases = [(0, A), (A, 3 * A), (0, FILE_BYTES // A * A)]
        for _ in range(10):
            pages = int(rng.integers(1, 1024))
            cases.append((int(rng.integers(0, FILE_BYTES // A - pages)) * A, pages * A))
        for offset, length in cases:
            buf, to_host = _device_buffer(kind, length)
            fut = r.pread((offset, length), buf)
            assert fut.get() == length
            assert np.array_equal(to_host(buf), data[offset:offset + length]), (offset, length)


def test_kvikio_many_futures_in_flight(data_file):
    import torch  # noqa: PLC0415

    path, data = data_file
    n, size = 16, 256 * A
    bufs = [torch.empty(size, dtype=torch.uint8, device="cuda") for _ in range(n)]
    with readers.open_reader(path, mode="kvikio") as r:
        futs = [r.pread((i * size, size), b) for i, b in enumerate(bufs)]
        assert sum(f.get() for f in futs) == n * size
    for i, b in enumerate(bufs):
        assert np.array_equal(b.cpu().numpy(), data[i * size:(i + 1) * size])


def test_auto_on_a_gpu_destination_takes_gds_or_posix_direct(data_file):
    path, _ = data_file
    with readers.open_reader(path, device="cuda") as r:
        assert r.mode == "gds" or (r.mode == "posix-direct" and "compat mode" in r.mode_reason), \
            (r.mode, r.mode_reason)


def test_kvikio_errors_name_the_request(data_file):
    import torch  # noqa: PLC0415

    path, _ = data_file
    with readers.open_reader(path, mode="kvikio") as r:
        with pytest.raises(ValueError, match="destination holds 4096 bytes, request is 8192"):
            r.pread((0, 2 * A), torch.empty(A, dtype=torch.uint8, device="cuda"))
        with pytest.raises(ReadError, match="runs past the end"):
            r.pread((FILE_BYTES, A), torch.empty(A, dtype=torch.uint8, device="cuda"))


def test_pinned_host_buffer_async_copy(data_file):
    import torch  # noqa: PLC0415

    path, data = data_file
    for pinned in (None, True):
        buf = buffers.host_buffer(64 * A + 7, pinned=pinned)
        assert buf.ctypes.data % A == 0 and buf.nbytes == 64 * A + 7
        assert torch.from_numpy(buf).is_pinned()
    buf = buffers.host_buffer(64 * A)
    with readers.open_reader(path, mode="posix-direct") as r:
        r.read((A, 64 * A), buf)
    dev = torch.empty(64 * A, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        dev.copy_(torch.from_numpy(buf), non_blocking=True)
    stream.synchronize()
    assert np.array_equal(dev.cpu().numpy(), data[A:65 * A])
    del buf  # unregisters before unmapping; a crash here would mean the wrong order
    torch.cuda.synchronize()
