"""bench_decode.py's GPU branch, run on the CPU: a host-memory stand-in for CuPy and a decoder that
decodes what the real kernel would be given (the packed descriptors' pointers) with the CPU decoder.

GPU sessions are short and rare, and a benchmark that fails on its GPU branch costs one of them
its measurement (it happened once: an argument the real ``GpuItem.from_arrays`` refused). So the
benchmark's own code runs here for real: its GPU items through ``GpuItem.from_arrays`` and
``pack_descriptors`` (every check the GPU path makes before a launch), its verification of each
kernel's output, the interleaved timing of the kernel, the compared kernel and the copy, and its
JSON. Only the device is pretended: arrays are host memory, events count calls, the kernel is the
CPU decoder reading through the descriptors' pointers. Kernel speed itself is measured on a GPU
host (bench/gpu_check.sh).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from host_crc import host_bytes as _host
from host_cupy import fake_cupy

from endor_gds.codec.bitmap import WORD_BITS, num_tiles
from endor_gds.codec.expdict import Streams
from endor_gds.codec.exphuff import CHUNKS_PER_TILE, HuffStreams
from endor_gds.decode import gpu as kernels
from endor_gds.decode.cpu import CpuDecoder

REPO = Path(__file__).resolve().parents[2]


class HostDecoder:
    """Stands in for GpuDecoder: tables through the real descriptor checks, launches decoded by
    the CPU decoder from the memory the descriptors point at. ``corrupt`` flips a bit of the
    output, as a wrong kernel would."""

    made: list[HostDecoder] = []

    def __init__(self, device: int = 0, source: str | None = None):
        self.source, self.launches, self.corrupt = source, 0, False
        HostDecoder.made.append(self)

    def make_table(self, items):
        kernels.pack_descriptors(items)  # every argument check of the real make_table
        return list(items)

    def launch(self, table, stream):
        self.launches += 1
        cpu = CpuDecoder(1)
        for it in table:
            words, tiles = -(-it.n // WORD_BITS), num_tiles(it.n)
            bits = "<u2" if it.elem_bytes == 2 else "<u4"
            bitmap = None if it.dense else _host(it.bitmap_ptr, 4 * words).view("<u4")
            offsets = None if it.dense else _host(it.tile_offsets_ptr, 4 * (tiles + 1)).view("<u4")
            out = _host(it.out_ptr, it.n * it.elem_bytes).view(bits)
            if it.exphuff is not None:
                h = it.exphuff
                values = HuffStreams.from_bytes(h.params, {
                    "residuals": _host(it.values_ptr, it.nnz * h.params.layout.residual_bytes),
                    "bits": _host(h.bits_ptr, -(-h.params.nbits // 8)),
                    "tile_bits": _host(h.tile_bits_ptr, 4 * (tiles + 1)),
                    "chunk_bits": _host(h.chunk_bits_ptr, 2 * (CHUNKS_PER_TILE - 1) * tiles)})
            elif it.expdict is None:
                values = _host(it.values_ptr, it.values_capacity).view(bits)[: it.nnz]
            else:
                e, layout = it.expdict, it.expdict.params.layout
                values = Streams.from_bytes(e.params, {
                    "residuals": _host(it.values_ptr, it.nnz * layout.residual_bytes),
                    "codes": _host(e.codes_ptr, e.codes_capacity),
                    "escape_offsets": _host(e.escape_offsets_ptr, 4 * (tiles + 1)),
                    "escape_positions": _host(e.escape_positions_ptr, 2 * e.params.escapes),
                    "escape_values": _host(e.escape_values_ptr, it.elem_bytes * e.params.escapes)})
            cpu.decode([(bitmap, values, offsets, out)])
            if self.corrupt:
                out[0] ^= 1
        cpu.close()

    def check(self, table):
        pass


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    monkeypatch.setattr(kernels, "GpuDecoder", HostDecoder)
    HostDecoder.made = []
    spec = importlib.util.spec_from_file_location("bench_decode_gpu_branch",
                                                  REPO / "bench" / "bench_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ARGS = ["--shapes", "64x64,33x4097", "--sparsity", "0.5", "--repeats", "3", "--warmup", "1",
        "--storage-bytes", "4MiB", "--json", "--compare-source", str(REPO / "cuda" / kernels.KERNEL_FILE)]


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_gpu_branch_times_both_kernels_and_the_copy(bench, tmp_path, capsys, dtype):
    assert bench.main([*ARGS, "--dtype", dtype, "--storage-dir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu"] == "host stand-in" and out["cache"]["gpu_l2"] == "flushed"
    kernel, compare = HostDecoder.made
    assert kernel.source is None and compare.source == (REPO / "cuda" / kernels.KERNEL_FILE).read_text()
    # per case: one checked launch, then warm-up + timed runs, for each kernel
    assert kernel.launches == compare.launches == 4 * (1 + 1 + 3)
    assert [c["codec"] for c in out["cases"]] == ["raw", "expdict"] * 2
    for c in out["cases"]:
        g = c["gpu"]
        assert g["traffic_bytes"] == c["stored_bytes"] + c["dense_bytes"]
        # every span is 1 ms, so kernel, compared kernel and copy all take 1 ms a run
        assert g["kernel"]["median_s"] == g["compare"]["median_s"] == g["d2d"]["median_s"] == \
            pytest.approx(1e-3)
        assert g["speedup_vs_compare"] == pytest.approx(1.0)
        assert g["ratio"] == pytest.approx(g["traffic_bytes"] / (g["traffic_bytes"] // 2 * 2))
    for r in out["codecs"].values():
        assert r["gpu_speedup_vs_compare"] == pytest.approx(1.0) and r["gpu_ratio_to_d2d"] == 1.0
    assert out["gpu_ratio_to_d2d"] == out["codecs"]["raw"]["gpu_ratio_to_d2d"]


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_gpu_branch_times_exphuff_dense_and_pruned(bench, tmp_path, capsys, dtype):
    """Codec exphuff beside the others: unpruned weights as a dense exphuff tensor (no bitmap, no
    tile offsets), 50 %-pruned ones under a bitmap; both kernels timed (the compared file knows
    exphuff), the fused product timed for both forms."""
    args = [*ARGS, "--sparsity", "0,0.5", "--codecs", "raw,expdict,exphuff", "--dtype", dtype,
            "--storage-dir", str(tmp_path)]
    assert bench.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    kernel, compare = HostDecoder.made
    assert kernel.launches == compare.launches == 2 * 2 * 3 * (1 + 1 + 3)  # shapes x sparsities x codecs
    huff = [c for c in out["cases"] if c["codec"] == "exphuff"]
    assert [c["dense_codec"] for c in huff] == [True, False, True, False]
    assert all(c["exphuff"]["code_lengths"] and c["fused"]["1"]["gbps_in"] > 0 for c in huff)
    assert all(not c["dense_codec"] for c in out["cases"] if c["codec"] != "exphuff")
    for c in huff:
        assert c["gpu"]["traffic_bytes"] == c["stored_bytes"] + c["dense_bytes"]
        assert c["gpu"]["speedup_vs_compare"] == pytest.approx(1.0)
    r = out["codecs"]["exphuff"]
    assert r["gpu_ratio_to_d2d"] == 1.0 and r["gpu_speedup_vs_compare"] == pytest.approx(1.0)
    assert r["fused"] and out["codecs"]["raw"]["fused"]


def test_gpu_branch_compares_exphuff_only_with_a_kernel_that_has_it(bench, tmp_path, capsys):
    old = tmp_path / "old.cu"  # a kernel file from before codec exphuff
    old.write_text((REPO / "cuda" / kernels.KERNEL_FILE).read_text().replace("kExpHuff", "kOther"))
    args = [a if a != ARGS[-1] else str(old) for a in ARGS]
    storage = tmp_path / "storage"
    storage.mkdir()
    assert bench.main([*args, "--sparsity", "0.5", "--codecs", "expdict,exphuff", "--dtype", "BF16",
                       "--storage-dir", str(storage)]) == 0
    out = json.loads(capsys.readouterr().out)
    kernel, compare = HostDecoder.made
    assert compare.launches == 2 * (1 + 1 + 3) and kernel.launches == 4 * (1 + 1 + 3)
    assert all((c["gpu"]["compare"] is None) == (c["codec"] == "exphuff") for c in out["cases"])
    assert out["codecs"]["exphuff"]["gpu_speedup_vs_compare"] is None


def test_gpu_branch_refuses_to_time_a_wrong_kernel(bench, tmp_path, monkeypatch):
    real_init = HostDecoder.__init__

    def init(self, device=0, source=None):
        real_init(self, device, source)
        self.corrupt = source is not None  # the compared kernel decodes wrongly

    monkeypatch.setattr(HostDecoder, "__init__", init)
    with pytest.raises(SystemExit, match=r"GPU decode \(compare\) differs from the CPU decoder"):
        bench.main([*ARGS, "--dtype", "F16", "--storage-dir", str(tmp_path)])
