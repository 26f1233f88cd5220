"""bench_tp on the ``tiny`` config, 2 ranks: both runs happen cold, every rank reads its own file,
and the model's table is printed. The figures are not judged here (timings are for bench/)."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_tp.py"


def test_bench_tp_smoke(tmp_path):
    out = tmp_path / "tp.json"
    r = subprocess.run([sys.executable, str(BENCH), "--config", "tiny", "--tokens", "3", "--ranks", "2",
                        "--dirs", str(tmp_path / "drive{rank}"), "--json", str(out)],
                       env=dict(os.environ, ENDOR_CACHE_DIR=str(tmp_path / "cache")),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert [x["file"] for x in rep["n2"]["ranks"]] == [str(tmp_path / f"drive{k}" / "model.endor") for k in range(2)]
    assert all(x["bytes_read"] > 0 and x["collective_s"] > 0 for x in rep["n2"]["ranks"])
    one = rep["n1"]["ranks"][0]["bytes_read"]
    assert all(x["bytes_read"] < 0.75 * one for x in rep["n2"]["ranks"])  # each reads about half
    assert rep["n2"]["allreduce_s"] > 0 and rep["n1"]["cached_after_evict"] <= 0.05
    assert set(rep["model_nodes"]) == {"1", "2", "4", "8"}
    assert "model, each rank on a node of its own" in r.stdout
