"""bench_crc_gpu.py, run on the CPU: the host stand-in for CuPy (host_cupy) and for the GPU check
(host_crc.HostCrc: the real table checks, crc32c through the segments' pointers), so the
benchmark's own code (segment layouts, verification, the flipped bit, timing loop, JSON) runs
here and a GPU session never loses its measurement to it. Kernel speed is measured on a GPU host
(bench/gpu_check.sh, section crc).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from host_crc import HostCrc
from host_cupy import fake_cupy

from endor_gds.decode import gpu_crc

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    monkeypatch.setattr(gpu_crc, "GpuCrc", HostCrc)
    HostCrc.made = []
    spec = importlib.util.spec_from_file_location("bench_crc_gpu", REPO / "bench" / "bench_crc_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_layouts_verified_and_timed(bench, capsys):
    args = ["--segment-bytes", "4KiB,20KiB,1MiB", "--nbytes", "3MiB", "--repeats", "3", "--warmup", "1", "--json"]
    assert bench.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu"] == "host stand-in" and out["piece_bytes"] == gpu_crc.PIECE_BYTES
    # sizes in turn while they fit: 4K, 20K, 1M, 4K, 20K, 1M, 4K, 20K (the next 1M would not)
    assert out["segments"] == 8 and out["bytes"] == 3 * 24 * 1024 + 2 * 1024 * 1024
    (crc,) = HostCrc.made
    for name, layout in out["layouts"].items():
        assert layout["segments"] == out["segments"]
        assert layout["crc"]["runs"] == layout["d2d"]["runs"] == 3
        assert layout["vs_d2d"] == pytest.approx(layout["bytes_checked"] / out["bytes"])  # 1 ms each
    assert out["layouts"]["odd"]["bytes_checked"] < out["layouts"]["aligned"]["bytes_checked"] == out["bytes"]
    # per layout: a table verified (intact, then a flipped bit), then one timed: 2 + 4 launches
    assert len(crc.tables) == 4 and len(crc.launches) == 2 * (2 + 1 + 3)


def test_a_wrong_kernel_is_not_timed(bench, monkeypatch):
    monkeypatch.setattr(HostCrc, "result", lambda self, table: None)  # never names the flipped bit
    with pytest.raises(SystemExit, match="names None for a bit flipped in segment"):
        bench.main(["--segment-bytes", "8KiB", "--nbytes", "16KiB", "--repeats", "1", "--warmup", "0"])


def test_default_segments_are_a_layer():
    spec = importlib.util.spec_from_file_location("bench_crc_gpu_layers", REPO / "bench" / "bench_crc_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sizes = module.layer_segments("llama-70b")
    assert len(sizes) == 7 * 3 + 2 and all(s % 4096 == 0 for s in sizes)
    assert 0.9e9 < sum(sizes) < 1.1e9  # one Llama-70B layer at 50 %, fp16: ~1 GB
