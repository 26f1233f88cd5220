"""Decoder micro-benchmarks (pytest-benchmark), so a regression shows in a comparison:

    pytest bench/ --benchmark-only --benchmark-autosave          # record
    pytest bench/ --benchmark-only --benchmark-compare           # compare with the last record

One Llama-7B attention matrix (4096 x 4096) per case. extra_info carries the bytes, so GB/s is
dense_bytes / time (CPU) or traffic_bytes / time (GPU). The GPU case needs CuPy and a GPU
(marker ``gpu``); bench_decode.py is the CLI with storage and D2D baselines.
"""

from __future__ import annotations

import numpy as np
import pytest
from bench_decode import make_encoded

from endor_gds import kernels
from endor_gds.cpu_decode import CpuDecoder

ROWS, COLS = 4096, 4096


@pytest.fixture(scope="module", params=[(2, 0.5), (2, 0.7), (4, 0.5)],
                ids=["fp16-50%", "fp16-70%", "fp32-50%"])
def case(request):
    itemsize, sparsity = request.param
    n = ROWS * COLS
    bitmap, values, offsets = make_encoded(np.random.default_rng(0), n, sparsity, itemsize)
    out = np.empty(n, dtype=np.uint16 if itemsize == 2 else np.uint32)
    return bitmap, values, offsets, out


@pytest.mark.parametrize("threads, simd", [(1, True), (None, True), (1, False)],
                         ids=["1thread-simd", "allthreads-simd", "1thread-scalar"])
def test_cpu_decode(benchmark, case, threads, simd):
    bitmap, values, offsets, out = case
    benchmark.extra_info["dense_bytes"] = out.nbytes
    with CpuDecoder(threads, simd=simd) as dec:
        benchmark.extra_info["threads"] = dec.threads
        out.fill(0)
        benchmark(dec.decode, [(bitmap, values, offsets, out)])
    assert np.count_nonzero(out) == values.size  # it decoded (bit-exactness: tests/)


@pytest.mark.gpu
def test_gpu_kernel(benchmark, case):
    ok, why = kernels.gpu_available()
    if not ok:
        pytest.skip(why)
    import cupy as cp  # noqa: PLC0415

    bitmap, values, offsets, out = case
    b, v, o = (cp.asarray(a) for a in (bitmap, values, offsets))
    d_out = cp.zeros(out.size, dtype=out.dtype)
    dec = kernels.GpuDecoder(0)
    table = dec.make_table([kernels.GpuItem.from_arrays(b, v, o, d_out, label="bench")])
    stream = cp.cuda.Stream(non_blocking=True)
    benchmark.extra_info["traffic_bytes"] = b.nbytes + v.nbytes + o.nbytes + d_out.nbytes

    def launch_and_wait():
        dec.launch(table, stream)
        stream.synchronize()

    benchmark(launch_and_wait)
    dec.check(table)
    assert int(cp.count_nonzero(d_out)) == values.size
