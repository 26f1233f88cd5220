"""bench/bench_wanda_rss.py runs end to end at a tiny size and reports what docs/performance.md quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import endor_gds

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_wanda_rss.py"


@pytest.mark.slow
def test_bench_wanda_rss_smoke(tmp_path):
    out_json = tmp_path / "rss.json"
    res = subprocess.run([sys.executable, str(BENCH), "--smoke", "--dir", str(tmp_path / "work"),
                          "--json", str(out_json)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("building ") and "# bench_wanda_rss: " in res.stdout
    for line in ("baseline (wanda, tiny model)", "pack --prune magnitude", "pack --prune wanda",
                 "one layer ", "wanda peak - baseline = ", "x its largest extent"):
        assert line in res.stdout, line
    out = json.loads(out_json.read_text())
    assert set(out["runs"]) == {"baseline (magnitude, tiny model)", "pack --prune magnitude",
                                "pack --prune none", "baseline (wanda, tiny model)", "pack --prune wanda"}
    for r in out["runs"].values():
        assert r["peak"] > 50 << 20 and r["seconds"] > 0 and len(r["quarters"]) == 4
    for kind in ("magnitude", "none"):
        r = out["runs"][f"pack --prune {kind}"]
        with endor_gds.open(tmp_path / "work" / f"{kind}.endor") as f:
            assert r["largest_extent"] == max(x.length for x in [*f.layers, f.resident])
        assert r["mb_per_s"] > 0
    # smoke shapes: 2 layers of hidden 128, 2 x 16 calibration tokens in fp16
    assert out["activation_bytes"] == 2 * 16 * 128 * 2 and out["layers"] == 2
    with endor_gds.open(tmp_path / "work" / "wanda.endor") as f:
        assert f.manifest["prune"]["calibration"]["tokens"] == 2 * 16
