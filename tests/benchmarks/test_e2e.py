"""bench_e2e on the ``tiny`` config: every variant runs (Accelerate, format v1 dense and pruned,
format v2 pruned), cold means cold, the report adds up.

The figures themselves are not judged here (timings are for bench/, on a quiet machine).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import endor_gds
from endor_gds.benchmarks import e2e
from endor_gds.container import EndorFile

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_e2e.py"


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
    assert set(by) == {"accelerate-disk", "endor-dense", "endor-pruned", "endor-pruned-v2"}
    for v in by.values():
        # 2 rounds x 2 timed steps (3 new tokens: the prefill makes the first, and is not timed)
        assert len(v["token_s"]) == 2 * 2 and all(t > 0 for t in v["token_s"])
        # eviction checked with mincore after every step: Accelerate's mmapped checkpoint too
        assert v["cached_after_evict"] <= 0.05, (v["name"], v["cached_after_evict"])
    assert "WARNING" not in text
    for name in ("endor-dense", "endor-pruned", "endor-pruned-v2"):
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
    assert "every byte against its CRC-32C" in text
    assert png.stat().st_size > 1000


def test_report_says_in_words_what_the_run_shows(report):
    rep, text, _ = report
    # before anything is written: every file, built or reused, where, and the disk it takes
    assert "build  checkpoint (random weights, safetensors)" in text and "disk: writes ~" in text
    assert "the page cache emptied before every token" in text
    assert "Each token reads every streamed layer once: the dense file" in text
    assert "Streaming the pruned file took" in text and "Accelerate's disk offload" in text
    assert "vs disk alone: s/token / the time the disk alone" in text  # the columns explained
    for name, ok in rep["targets"].items():
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"target {name}:"))
        state, _, why = line.split(f"target {name}: ", 1)[1].partition(" - ")
        assert state == {True: "met", False: "MISSED", None: "n/a"}[ok], line
        assert ok is True or len(why) > 20, line  # a figure below its target says why


def test_the_plan_reuses_what_exists_and_checks_the_disk_first(tmp_path, monkeypatch):
    kinds = ("dense", "pruned", "pruned-v2")
    before = e2e.storage_plan("tiny", "float16", 0.5, kinds, root=tmp_path)
    assert [f.exists for f in before] == [False] * len(before)
    monkeypatch.setattr(e2e.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(endor_gds.DiskSpaceError, match=r"needs about .* free there: .*--cache-dir DIR"):
        e2e.describe_plan(before, kinds, 4, True, True)
    assert not (tmp_path / "models").exists()  # refused before anything was written
    monkeypatch.undo()
    ckpt = e2e.build_checkpoint("tiny", "float16", root=tmp_path, progress=False)
    files = e2e.packed_variants(ckpt, 0.5, progress=False, kinds=kinds)
    after = e2e.storage_plan("tiny", "float16", 0.5, kinds, root=tmp_path)
    assert all(f.exists for f in after if "fio" not in f.what)
    sizes = {f.path: f.bytes for f in after}
    for kind, path in files.items():
        assert sizes[path] == path.stat().st_size
        estimate = next(f.bytes for f in before if f.path == path)
        assert 0.95 * path.stat().st_size <= estimate <= 1.35 * path.stat().st_size, (kind, estimate)
    lines = e2e.describe_plan([f for f in after if "fio" not in f.what], kinds, 4, False, False)
    assert lines[1].startswith("  reuse  checkpoint") and "nothing is written" in "\n".join(lines)


def test_e2e_tiny_with_v2_and_v3_variants(tmp_path):
    rep = e2e.run_e2e("tiny", "bfloat16", tokens=2, prompt_len=4, accelerate=False, cold=False,
                      root=tmp_path, progress=False, log=lambda m: None, v3=True)
    names = [v["name"] for v in rep["variants"]]
    assert sorted(names) == ["endor-dense", "endor-dense-v3", "endor-pruned", "endor-pruned-v2"]
    files = {k: v["path"] for k, v in rep["files"].items()}
    versions = {}
    for kind, path in files.items():
        with endor_gds.open(path) as f:
            versions[kind] = (f.format_version, sorted({e.codec for e in f.tensors.values() if e.needs_decode}))
    assert versions == {"dense": (1, []), "pruned": (1, ["raw"]), "pruned-v2": (2, ["expdict"]),
                        "dense-v3": (3, ["exphuff"])}
    by = {v["name"]: v for v in rep["variants"]}
    assert rep["byte_ratio_v3"] == by["endor-dense"]["bytes_per_token"] / by["endor-dense-v3"]["bytes_per_token"]
    assert rep["byte_ratio_v3"] > 1.2 and rep["speedup_v3_vs_v1"] > 0  # bf16: ~10.6 against 16 bits at scale
    assert "speedup_v3_vs_v1 >= 0.95 * byte_ratio_v3 (unpruned)" in rep["targets"]
    assert "format v3 (exphuff) vs v1, same unpruned weights" in e2e.format_report(rep)
    by = {v["name"]: v for v in rep["variants"]}
    assert rep["byte_ratio_v2"] == by["endor-pruned"]["bytes_per_token"] / by["endor-pruned-v2"]["bytes_per_token"]
    assert rep["byte_ratio_v2"] > 1.25  # bf16 at 50 %: 9 against about 6 bits per sparse weight
    assert rep["speedup_v2_vs_v1"] > 0
    assert "speedup_v2_vs_v1 >= 0.95 * byte_ratio_v2" in rep["targets"]
    assert "format v2 (expdict) vs v1" in e2e.format_report(rep)


def test_an_interrupted_build_resumes_and_gives_the_same_checkpoint(tmp_path):
    whole = e2e.build_checkpoint("tiny", "float16", root=tmp_path / "a", shard_bytes=1 << 20, progress=False)
    shards = sorted(whole.glob("model-*.safetensors"))
    assert len(shards) >= 3
    # an earlier run stopped after the first shard, halfway into writing the second
    building = e2e.checkpoint_folder("tiny", "float16", tmp_path / "b").with_name("tiny-float16.building")
    building.mkdir(parents=True)
    (building / shards[0].name).write_bytes(shards[0].read_bytes())
    (building / (shards[1].name + ".part")).write_bytes(shards[1].read_bytes()[:1000])
    kept = (building / shards[0].name).stat().st_ino
    again = e2e.build_checkpoint("tiny", "float16", root=tmp_path / "b", shard_bytes=1 << 20, progress=False)
    assert (again / shards[0].name).stat().st_ino == kept  # the whole shard was not written again
    for s in shards:
        assert (again / s.name).read_bytes() == s.read_bytes()
    assert not list(again.glob("*.part")) and not building.exists()


def test_batch_sweep_and_peak_rss(tmp_path):
    rep = e2e.run_e2e("tiny", "float16", tokens=3, prompt_len=4, accelerate=False, cold=False, v2=False,
                      root=tmp_path, progress=False, log=lambda m: None, batches=(1, 3), unchecked=True)
    by = {v["name"]: v for v in rep["variants"]}
    base = {"endor-dense", "endor-dense-batch3", "endor-pruned", "endor-pruned-batch3"}
    assert set(by) == base | {f"{n}-unchecked" for n in base}
    assert by["endor-pruned-batch3-unchecked"]["batch"] == 3 and by["endor-pruned"]["batch"] == 1
    assert by["endor-pruned-batch3"]["bytes_per_token"] == by["endor-pruned"]["bytes_per_token"]  # one pass per step
    for v in by.values():
        st = v["stats"]
        assert st["peak_rss_bytes"] >= st["resident_bytes"] + st["buffer_bytes"] > 0
    text = e2e.format_report(rep)
    assert "batch sweep, tokens/s of generate (B sequences per step): endor-dense-batch3 " in text
    assert "endor-pruned-batch3-unchecked " in text  # a name with a suffix after the batch
    assert "peak RSS while streaming" in text


@pytest.mark.fused
def test_unfused_variants_measure_the_fused_product(tmp_path):
    """--unfused runs every pruned variant again with fused=False, interleaved: the report's
    fused_speedup is the unfused time over the fused one, and the steps say which path ran."""
    rep = e2e.run_e2e("tiny", "float16", tokens=3, prompt_len=4, accelerate=False, cold=False,
                      root=tmp_path, progress=False, log=lambda m: None, unfused=True)
    by = {v["name"]: v for v in rep["variants"]}
    assert set(by) == {"endor-dense", "endor-pruned", "endor-pruned-v2", "endor-pruned-unfused",
                       "endor-pruned-v2-unfused"}  # the dense file has no bitmap weights to fuse
    for name in ("endor-pruned", "endor-pruned-v2"):
        st = by[name]["stats"]  # every decode step fused all its streamed layers
        assert st["per_token"]["fused_layers"] == st["streamed_layers"] > 0
        assert by[name + "-unfused"]["stats"]["per_token"]["fused_layers"] == 0
        want = by[name + "-unfused"]["s_per_token_median"] / by[name]["s_per_token_median"]
        assert rep["fused_speedup"][name] == pytest.approx(want)
    text = e2e.format_report(rep)
    assert "fused product vs decoding to dense (fused=False), speed: endor-pruned " in text
    assert "fused product: on for steps of at most 16 rows (batch x sequence) (16 for torch.float16" in text


def test_e2e_tiny_moe_routed_against_all_experts(tmp_path):
    """A mixture-of-experts config: the checkpoint is written as Hugging Face checkpoints are
    (each expert's gate, up and down projections apart), Accelerate loads it, the packed files
    have one extent per expert, and --all-experts runs every variant again reading every expert,
    interleaved: routed_vs_all is the all-experts time and bytes over the routed ones."""
    rep = e2e.run_e2e("tiny-moe", "bfloat16", tokens=3, prompt_len=4, cold=False, v2=False,
                      root=tmp_path, progress=False, log=lambda m: None, all_experts=True)
    ckpt = e2e.checkpoint_folder("tiny-moe", "bfloat16", tmp_path)
    names = set(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.3.mlp.experts.15.up_proj.weight" in names
    assert not any(n.endswith("experts.gate_up_proj") for n in names)
    by = {v["name"]: v for v in rep["variants"]}
    assert set(by) == {"accelerate-disk", "endor-dense", "endor-pruned", "endor-dense-allexperts",
                       "endor-pruned-allexperts"}
    for kind in ("dense", "pruned"):
        with endor_gds.open(rep["files"][kind]["path"]) as f:
            assert f.format_version == 4 and {i: len(x) for i, x in f.experts.items()} == {i: 16 for i in range(4)}
            every = sum(x.length for exts in f.experts.values() for x in exts)
            dense = sum(x.length for x in f.layers)
        routed, every_run = by[f"endor-{kind}"], by[f"endor-{kind}-allexperts"]
        assert every_run["bytes_per_token"] == dense + every
        assert routed["bytes_per_token"] < every_run["bytes_per_token"]
        r = rep["routed_vs_all"][f"endor-{kind}"]
        assert r["byte_ratio"] == every_run["bytes_per_token"] / routed["bytes_per_token"]
        assert r["experts_routed_per_token"] <= 4 * 4  # 4 layers, 4 of 16 experts per token at batch 1
    assert "routed experts vs all: speedup >= 0.8 * byte_ratio" in rep["targets"]
    assert "routed experts vs every expert, endor-pruned: " in e2e.format_report(rep)


def test_the_plan_counts_fused_experts_as_pruned_weights(tmp_path):
    """The demo's size estimate of a mixture of experts prunes the fused experts parameters like
    any linear weight (OLMoE-1B-7B's shape: 13.8 GB dense, about 8 GB at 50 %)."""
    plan = {p.what: p.bytes for p in e2e.storage_plan("olmoe-7b", "bfloat16", 0.5, ("dense", "pruned"), tmp_path)}
    dense, pruned = plan["packed dense (not pruned, v1)"], plan["packed pruned (magnitude-pruned, v1)"]
    assert 13.5e9 < dense < 14e9 and 0.55 < pruned / dense < 0.62
