"""The end-to-end benchmark (endor_gds.e2e, bench/bench_e2e.py) at the tiny config: it runs, packs
format v1 and v2 variants of the same pruned model, and reports the v2 comparison."""

from __future__ import annotations

import endor_gds
from endor_gds import e2e


def test_e2e_tiny_with_v2_variant(tmp_path):
    rep = e2e.run_e2e("tiny", "bfloat16", tokens=2, prompt_len=4, accelerate=False, cold=False,
                      root=tmp_path, progress=False, log=lambda m: None)
    names = [v["name"] for v in rep["variants"]]
    assert names == ["endor-dense", "endor-pruned", "endor-pruned-v2"]
    files = {k: v["path"] for k, v in rep["files"].items()}
    versions = {}
    for kind, path in files.items():
        with endor_gds.open(path) as f:
            versions[kind] = (f.format_version, sorted({e.codec for e in f.tensors.values()
                                                        if e.encoding == "bitmap"}))
    assert versions == {"dense": (1, []), "pruned": (1, ["raw"]), "pruned-v2": (2, ["expdict"])}
    by = {v["name"]: v for v in rep["variants"]}
    assert rep["byte_ratio_v2"] == by["endor-pruned"]["bytes_per_token"] / by["endor-pruned-v2"]["bytes_per_token"]
    assert rep["byte_ratio_v2"] > 1.25  # bf16 at 50 %: 9 against about 6 bits per sparse weight
    assert rep["speedup_v2_vs_v1"] > 0
    assert "speedup_v2_vs_v1 >= 0.95 * byte_ratio_v2" in rep["targets"]
    assert "format v2 (expdict) vs v1" in e2e.format_report(rep)
