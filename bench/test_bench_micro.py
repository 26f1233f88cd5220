"""Decoder micro-benchmarks (pytest-benchmark), so a regression shows in a comparison:

    pytest bench/ --benchmark-only --benchmark-autosave          # record
    pytest bench/ --benchmark-only --benchmark-compare           # compare with the last record

One Llama-7B attention matrix (4096 x 4096) per case, values raw (format v1) or, for bf16, in the
expdict codec (format v2). extra_info carries the bytes, so GB/s is
dense_bytes / time (CPU) or traffic_bytes / time (GPU). The GPU case needs CuPy and a GPU
(marker ``gpu``); bench_decode.py is the CLI with storage and D2D baselines.
"""

from __future__ import annotations

import numpy as np
import pytest
from bench_decode import codec_values, make_encoded

from endor_gds.decode import gpu as kernels
from endor_gds.decode.cpu import CpuDecoder

ROWS, COLS = 4096, 4096


@pytest.fixture(scope="module", params=[("F16", 0.5, "raw"), ("F16", 0.7, "raw"),
                                        ("F32", 0.5, "raw"), ("BF16", 0.5, "expdict")],
                ids=["fp16-50%", "fp16-70%", "fp32-50%", "bf16-50%-expdict"])
def case(request):
    dtype, sparsity, codec = request.param
    n = ROWS * COLS
    bitmap, raw, offsets = make_encoded(np.random.default_rng(0), n, sparsity, dtype)
    out = np.empty(n, dtype=raw.dtype)
    return bitmap, codec_values(codec, raw, offsets, n, dtype), offsets, out, raw.size


@pytest.mark.parametrize("threads, simd", [(1, True), (None, True), (1, False)],
                         ids=["1thread-simd", "allthreads-simd", "1thread-scalar"])
def test_cpu_decode(benchmark, case, threads, simd):
    bitmap, values, offsets, out, nnz = case
    benchmark.extra_info["dense_bytes"] = out.nbytes
    with CpuDecoder(threads, simd=simd) as dec:
        benchmark.extra_info["threads"] = dec.threads
        out.fill(0)
        benchmark(dec.decode, [(bitmap, values, offsets, out)])
    assert np.count_nonzero(out) == nnz  # it decoded (bit-exactness: tests/)


@pytest.mark.gpu
def test_gpu_kernel(benchmark, case):
    ok, why = kernels.gpu_available()
    if not ok:
        pytest.skip(why)
    import cupy as cp  # noqa: PLC0415
    from bench_decode import gpu_item, stored_bytes  # noqa: PLC0415

    bitmap, values, offsets, out, nnz = case
    d_out = cp.zeros(out.size, dtype=out.dtype)
    item, _keep = gpu_item(cp, bitmap, values, offsets, d_out)
    dec = kernels.GpuDecoder(0)
    table = dec.make_table([item])
    stream = cp.cuda.Stream(non_blocking=True)
    benchmark.extra_info["traffic_bytes"] = stored_bytes(bitmap, values, offsets) + d_out.nbytes

    def launch_and_wait():
        dec.launch(table, stream)
        stream.synchronize()

    benchmark(launch_and_wait)
    dec.check(table)
    assert int(cp.count_nonzero(d_out)) == nnz
