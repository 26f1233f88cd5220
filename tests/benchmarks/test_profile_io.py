"""``endor-gds profile-io`` smoke tests at a tiny size (so the tool never rots), and telemetry."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import types

import pytest

from endor_gds import cli
from endor_gds.benchmarks import fio, profile_io, system, telemetry
from endor_gds.read import buffers

KiB, MiB = 1 << 10, 1 << 20
HAS_FIO = shutil.which("fio") is not None


class _FakeNvml(types.ModuleType):
    """The pynvml calls telemetry makes, returning constant PCIe RX 2e6 KB/s and TX 1e3 KB/s."""

    NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = 0, 1
    NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2

    class NVMLError(Exception):
        pass

    def __init__(self, fail_init: bool = False):
        super().__init__("pynvml")
        self.fail_init = fail_init
        self.live = 0  # nvmlInit minus nvmlShutdown: every init must be shut down

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")
        self.live += 1

    def nvmlShutdown(self):
        self.live -= 1

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"gpu{i}"

    def nvmlDeviceGetName(self, h):
        return b"Fake H100"

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h):
        return 5

    def nvmlDeviceGetCurrPcieLinkWidth(self, h):
        return 16

    def nvmlSystemGetDriverVersion(self):
        return "580.0"

    def nvmlDeviceGetPcieThroughput(self, h, counter):
        return 2_000_000 if counter == self.NVML_PCIE_UTIL_RX_BYTES else 1_000

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=123 * MiB, total=80 << 30)

    def nvmlDeviceGetClockInfo(self, h, which):
        return 1980 if which == self.NVML_CLOCK_SM else 2619


def _args(folder, *extra):
    return ["profile-io", str(folder), "--size", "2MiB", "--threads", "1,2", "--chunk",
            "256KiB,1MiB", "--repeats", "2", "--extent", "1MiB", "--quiet", *extra]


def _cold_supported(path) -> bool:
    return system.fs_info(path).get("fstype") not in ("tmpfs", "ramfs", "overlay", None)


@pytest.mark.skipif(not HAS_FIO, reason="fio is not installed")
def test_profile_io_smoke_with_fio(tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    assert cli.main(_args(tmp_path, "--json", str(out_json), "--plot", str(out_png))) == 0
    text = capsys.readouterr().out
    rep = json.loads(out_json.read_text())

    assert text.index("machine") < text.index("GB/s")  # the header comes first
    for word in ("cpu", "gpu", "file system", "COLD cache", "posix-direct -> posix-direct",
                 "fio-psync", "fio-libaio", "our best / fio best"):
        assert word in text
    assert len(rep["measurements"]) == 2 * 2 * 2  # modes x threads x chunks
    for m in rep["measurements"]:
        assert {"mode", "threads", "chunk_bytes", "gbps_median"} <= set(m)
        assert m["mode"] in ("posix-direct", "posix-buffered") and m["actual_mode"] == m["mode"]
        assert len(m["gbps_runs"]) == 2 and min(m["gbps_runs"]) > 0
        assert m["gbps_min"] <= m["gbps_median"] <= m["gbps_max"]
        if _cold_supported(tmp_path):
            assert m["page_cache_resident_max"] < 0.1  # eviction happened before every run
        if profile_io._disk_reads(os.path.basename(rep["system"]["file_system"]["source"])):
            assert m["request_kib_median"] >= 4  # at least one page per device request
    assert rep["fio"]["error"] is None
    assert sorted((r["mode"], r["threads"], r["chunk_bytes"]) for r in rep["fio"]["runs"]) == sorted(
        (f"fio-{e}", t, c) for e in ("libaio", "psync") for t in (1, 2) for c in (256 * KiB, MiB))
    assert rep["fio_gbps"] == max(r["gbps_median"] for r in rep["fio"]["runs"])
    best = max(m["gbps_median"] for m in rep["measurements"])
    assert rep["best_ratio_to_fio"] == pytest.approx(best / rep["fio_gbps"], rel=1e-3)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / profile_io.TEST_FILE).exists()  # the test file it wrote is gone


def test_profile_io_without_fio_and_with_nvml(tmp_path, capsys, monkeypatch):
    """No fio: fio_gbps is null and the output says why. A (fake) NVML adds the PCIe column."""
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(profile_io.shutil, "which", lambda name: None)
    out_json = tmp_path / "r.json"
    assert cli.main(_args(tmp_path, "--modes", "posix-direct", "--json", str(out_json),
                          "--keep")) == 0
    text = capsys.readouterr().out
    rep = json.loads(out_json.read_text())
    assert rep["fio_gbps"] is None and rep["best_ratio_to_fio"] is None
    assert rep["fio"]["error"] == "fio not installed"
    assert "fio baseline: none (fio not installed)" in text
    assert "Fake H100 (PCIe gen5 x16)" in text and "PCIe RX" in text
    assert [m["mode"] for m in rep["measurements"]] == ["posix-direct"] * 4
    assert rep["measurements"][0]["pcie_rx_gbps_median"] == pytest.approx(2e6 * 1024 / 1e9)
    assert fake.live == 0
    # --keep left the file; a second run reuses it instead of writing it again
    kept = tmp_path / profile_io.TEST_FILE
    assert kept.stat().st_size == 2 * MiB
    mtime = kept.stat().st_mtime_ns
    assert cli.main(_args(tmp_path, "--modes", "posix-buffered", "--repeats", "1")) == 0
    assert kept.stat().st_mtime_ns == mtime


def test_profile_io_on_an_existing_file(tmp_path, capsys):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"\x01" * (3 * MiB + 123))  # the tail that is not a whole page is left out
    assert profile_io.main([str(f), "--modes", "posix-direct", "--threads", "2", "--chunk",
                            "1MiB", "--repeats", "1", "--no-fio", "--quiet"]) == 0
    assert f"{f} (3 MiB read per measurement)" in capsys.readouterr().out
    assert f.exists()


def test_profile_io_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(_args(tmp_path, "--chunk", "1000"))
    assert "chunk sizes must be positive multiples of 4096" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(_args(tmp_path, "--modes", "nvme"))
    assert "unknown mode(s) nvme" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(_args(tmp_path, "--threads", "0"))
    assert "thread counts must be >= 1" in capsys.readouterr().err
    assert cli.main(["profile-io", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "neither a folder" in capsys.readouterr().err
    if not buffers.cuda_available():
        assert cli.main(_args(tmp_path, "--modes", "kvikio")) == 2
        assert "this machine has no CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_FIO, reason="fio is not installed")
def test_run_fio_reads_the_asked_bytes(tmp_path):
    f = tmp_path / "a:b.bin"  # fio splits --filename on ':'; the name must survive
    f.write_bytes(b"\x02" * (2 * MiB))
    fio_bin = shutil.which("fio")
    assert fio.run_fio(fio_bin, str(f), 1 * MiB, 256 * KiB, 2, "libaio") > 0
    assert fio.run_fio(fio_bin, str(f), 1 * MiB, 256 * KiB, 3, "psync") > 0  # 3 slices of 256 KiB
    # a size that is no multiple of the block (a whole packed file read with bs=1MiB): whole blocks
    assert fio.run_fio(fio_bin, str(f), 1 * MiB - 4 * KiB, 256 * KiB, 2, "libaio") > 0
    with pytest.raises(fio.FioError, match="fio"):
        fio.run_fio(shutil.which("fio"), str(tmp_path / "nope.bin"), MiB, 256 * KiB, 1)


# -- telemetry --------------------------------------------------------------------------------


def test_telemetry_without_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    p = telemetry.probe()
    assert not p.available and "nvidia-ml-py is not installed" in p.reason
    with telemetry.Sampler() as s:
        pass
    assert s.summary() == {"available": False, "reason": p.reason}


def test_telemetry_without_driver(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(fail_init=True))
    assert telemetry.probe().reason == "NVML unavailable: Driver Not Loaded"
    with telemetry.Sampler() as s:
        pass
    assert s.summary()["available"] is False


def test_telemetry_samples(monkeypatch):
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    p = telemetry.probe()
    assert (p.available, p.devices, p.pcie, p.driver) == (True, ("Fake H100",), ("gen5 x16",), "580.0")
    with telemetry.Sampler(interval_s=0.01) as s:
        time.sleep(0.1)
    summary = s.summary()
    assert summary["available"] and summary["samples"] >= 2
    assert summary["pcie_rx_gbps_mean"] == pytest.approx(2e6 * 1024 / 1e9)
    assert summary["pcie_tx_gbps_max"] == pytest.approx(1e3 * 1024 / 1e9)
    assert summary["mem_used_bytes_max"] == 123 * MiB and summary["sm_clock_mhz_max"] == 1980
    assert len(s.as_records()) == summary["samples"]
    assert fake.live == 0


def test_bench_io_smoke(tmp_path):
    """bench/bench_io.py (the profiler under the benchmarks folder) runs end to end at a tiny size."""
    import subprocess  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    script = Path(__file__).resolve().parents[2] / "bench" / "bench_io.py"
    out = tmp_path / "io.json"
    r = subprocess.run([sys.executable, str(script), str(tmp_path), "--size", "8MiB", "--threads", "1,2",
                        "--chunk", "1MiB", "--repeats", "1", "--no-fio", "--modes", "posix-direct",
                        "--json", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    best = rep["best"]["posix-direct"]
    assert best["gbps_median"] > 0 and best["threads"] in (1, 2) and best["chunk_bytes"] == 1 << 20
