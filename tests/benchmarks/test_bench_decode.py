"""bench/bench_decode.py runs end to end at a tiny size and its JSON holds what the docs quote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from endor_gds.decode.cpu import CpuDecoder
from endor_gds.decode.gpu import gpu_available

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "bench_decode.py"
KERNEL = REPO / "cuda" / "endor_decode.cu"


def test_bench_decode_smoke(tmp_path):
    res = subprocess.run(
        [sys.executable, str(BENCH), "--shapes", "64x64,33x4097", "--sparsity", "0.5,0.7", "--dtype", "BF16",
         "--repeats", "2", "--warmup", "1", "--storage-bytes", "4MiB", "--storage-dir",
         str(tmp_path), "--fused-rows", "1,3", "--compare-source", str(KERNEL), "--json"],
        capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert res.stderr.startswith("endor_gds decode benchmark\nmachine : ")
    assert out["decoder_path"] == CpuDecoder(1).simd_name  # every feature this CPU has
    for key in ("CPU     :", "GPU     :", f"decoder : CPU {out['decoder_path']}, ",
                "cache   : storage cold"):
        assert key in res.stderr, key
    assert len(out["cases"]) == 8  # 2 shapes x 2 sparsities x codecs raw and expdict
    assert {tuple(c["shape"]) for c in out["cases"]} == {(64, 64), (33, 4097)}
    assert [c["codec"] for c in out["cases"]] == ["raw", "expdict"] * 4
    for key in ("cpu_gbps", "storage_gbps", "cpu_ratio_to_storage"):
        assert out[key] > 0, key
    raw, ed = out["codecs"]["raw"], out["codecs"]["expdict"]
    assert raw["cpu_gbps"] == out["cpu_gbps"]  # the top-level figures are the first codec's
    assert ed["bits_per_element"] < raw["bits_per_element"]  # bf16 weights: fewer bytes
    for c in out["cases"]:
        want = c["cpu"]["gbps"] / (out["storage_gbps"] * c["dense_bytes"] / c["stored_bytes"])
        assert abs(c["cpu_headroom"] - want) < 1e-9
        assert (c["expdict"] is None) == (c["codec"] == "raw")
    assert "CPU decoder  expdict" in res.stderr and "headroom" in res.stderr
    # the fused product at 1 and 3 rows of x, beside torch's product and decode + that product
    assert out["fused_rows"] == [1, 3] and "CPU fused    raw      3 row(s) of x: " in res.stderr
    for c in out["cases"]:
        for m, f in c["fused"].items():
            assert f["rows"] == int(m) and f["gbps_in"] > 0 and f["gemv"]["gbps"] > 0
            want = (c["cpu"]["median_s"] + f["gemv"]["median_s"]) / f["fused"]["median_s"]
            assert abs(f["speedup"] - want) < 1e-9
    assert all(set(r["fused"]) == {"1", "3"} and all(f["gbps_in"] > 0 and f["speedup"] > 0 for f in r["fused"].values())
               for r in out["codecs"].values())
    assert out["storage"]["mode"] == "posix-direct" and out["cache"]["storage"] == "cold"
    assert abs(out["cpu_ratio_to_storage"] - out["cpu_gbps"] / out["storage_gbps"]) < 1e-9
    gpu_keys = ("gpu_gbps", "d2d_gbps", "gpu_ratio_to_d2d")
    assert out["compare_source"] == str(KERNEL)
    if gpu_available()[0]:  # the kernel compared with itself: both timed, both checked
        assert all(out[k] > 0 for k in gpu_keys) and out["gpu"]
        assert all(c["gpu"]["speedup_vs_compare"] > 0 and c["gpu"]["compare"]["gbps"] > 0
                   for c in out["cases"])
        assert all(r["gpu_speedup_vs_compare"] > 0 for r in out["codecs"].values())
        assert f"compared with {KERNEL}" in res.stderr and "x the compared kernel" in res.stderr
    else:
        assert all(out[k] is None for k in gpu_keys) and out["gpu"] is None
        assert all(r["gpu_speedup_vs_compare"] is None for r in out["codecs"].values())
    assert list(tmp_path.iterdir()) == []  # the storage file is removed
