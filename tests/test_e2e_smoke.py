"""bench_e2e on the ``tiny`` config: every variant runs, cold means cold, the report adds up.

The figures themselves are not judged here (timings are for bench/, on a quiet machine).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from endor_gds import e2e
from endor_gds.layout import EndorFile

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_e2e.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    out, png = root / "rep.json", root / "rep.png"
    r = subprocess.run([sys.executable, str(BENCH), "--config", "tiny", "--tokens", "3", "--rounds", "2",
                        "--cache-dir", str(root), "--json", str(out), "--plot", str(png), "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout, png


def test_every_variant_ran_cold(report):
    rep, text, _ = report
    by = {v["name"]: v for v in rep["variants"]}
    assert set(by) == {"accelerate-disk", "endor-dense", "endor-pruned"}
    for v in by.values():
        # 2 rounds x 2 timed steps (3 new tokens: the prefill makes the first, and is not timed)
        assert len(v["token_s"]) == 2 * 2 and all(t > 0 for t in v["token_s"])
        # eviction checked with mincore after every step: Accelerate's mmapped checkpoint too
        assert v["cached_after_evict"] <= 0.05, (v["name"], v["cached_after_evict"])
    assert "WARNING" not in text
    for name in ("endor-dense", "endor-pruned"):
        assert by[name]["stats"]["reader_mode"] in ("posix-direct", "posix-buffered")
        assert len(by[name]["read_gbps"]) == 2 and by[name]["time_over_read_floor"] > 0


def test_report_adds_up(report):
    rep, text, png = report
    by = {v["name"]: v for v in rep["variants"]}
    for kind in ("dense", "pruned"):
        with EndorFile(rep["files"][kind]["path"]) as f:
            streamed = sum(x.length for x in f.layers)
        assert by[f"endor-{kind}"]["bytes_per_token"] == streamed
    assert rep["byte_ratio"] == pytest.approx(by["endor-dense"]["bytes_per_token"]
                                              / by["endor-pruned"]["bytes_per_token"])
    assert 1.5 < rep["byte_ratio"] < 1.78  # 50 % at fp16: 9 bits of 16, less page padding
    assert rep["speedup_vs_accelerate"] == pytest.approx(
        by["accelerate-disk"]["s_per_token_median"] / by["endor-pruned"]["s_per_token_median"])
    assert set(rep["targets"]) >= {"speedup_vs_accelerate >= 2.5", "time_over_best_floor <= 1.10"}
    assert "pruned vs accelerate" in text and e2e.format_report(rep).splitlines()[0] in text
    assert png.stat().st_size > 1000
