"""Fuzzing the packer with mutated source checkpoints (endor_gds/fuzz/ckptfuzz.py).

A fixed seed runs a few hundred cases in CI (every op at least twenty times) and must find no
escape; the oracle's checks are each shown to fire when the packer misbehaves; the bench script
for long runs is run end to end. ``ENDOR_CKPT_FUZZ_CASES`` raises the count.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import endor_gds
from endor_gds.benchmarks.models import build_model
from endor_gds.errors import FormatError
from endor_gds.fuzz import ckptfuzz

REPO = Path(__file__).resolve().parents[2]
CASES = int(os.environ.get("ENDOR_CKPT_FUZZ_CASES", str(20 * len(ckptfuzz.OPS))))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return ckptfuzz.build_bases(tmp_path_factory.mktemp("ckpt-bases"), build_model)


def test_no_escape(bases, tmp_path):
    outcomes = collections.Counter()
    ops = collections.Counter()
    escapes = []
    for i in range(CASES):
        case = ckptfuzz.make_case(bases, 20261127, i, tmp_path / "case")
        r = ckptfuzz.run_case(tmp_path / "case", tmp_path / "work")
        ops[case.op] += 1
        outcomes[r.outcome.split(" (")[0]] += 1
        if r.escape:
            escapes.append(f"case {i} {case.op} {case.detail}: {r.escape}")
    assert escapes == []
    assert set(ops) == set(ckptfuzz.OPS)
    # both halves of the oracle ran: packs that load and run, and refusals of each kind
    assert outcomes["packed"] > 0 and outcomes["refused: FormatError"] > 0
    assert outcomes["refused: UnsupportedModelError"] > 0


def test_unmutated_bases_pack_and_match_safetensors(bases, tmp_path):
    for base in bases:
        assert ckptfuzz.run_case(base, tmp_path / "work").outcome == "packed"


@pytest.mark.parametrize("metadata, outcome", [
    (None, "packed"),  # null is allowed by safetensors (found by the fuzzer: we refused it)
    ({}, "packed"),
    ({"format": "pt", "note": ""}, "packed"),
    ([], "refused: FormatError (safetensors refuses too)"),
    ("", "refused: FormatError (safetensors refuses too)"),
    ({"format": 1}, "refused: FormatError (safetensors refuses too)"),
])
def test_metadata_block_as_safetensors_reads_it(bases, tmp_path, metadata, outcome):
    folder = tmp_path / "case"
    shutil.copytree(bases[0], folder)
    shard = ckptfuzz._shards(folder)[0]
    header, data = ckptfuzz._read_header(shard)
    ckptfuzz._write_header(shard, {**header, "__metadata__": metadata}, data)
    assert ckptfuzz.run_case(folder, tmp_path / "work").outcome == outcome


def test_oracle_flags_a_pack_that_raises_another_error(bases, tmp_path, monkeypatch):
    def broken(*a, **kw):
        raise TypeError("unhashable type: 'list'")
    monkeypatch.setattr(endor_gds, "pack", broken)
    r = ckptfuzz.run_case(bases[0], tmp_path / "work")
    assert r.outcome == "ESCAPE pack" and "TypeError" in r.escape


def test_oracle_flags_a_refusal_that_leaves_a_file(bases, tmp_path, monkeypatch):
    def leaky(src, dst, **kw):
        Path(dst).write_bytes(b"half")
        raise FormatError("refused")
    monkeypatch.setattr(endor_gds, "pack", leaky)
    assert ckptfuzz.run_case(bases[0], tmp_path / "work").outcome == "ESCAPE files left"


def test_oracle_flags_accepting_what_safetensors_refuses(bases, tmp_path, monkeypatch):
    monkeypatch.setattr(ckptfuzz, "reference", lambda folder: (None, "SafetensorError: invalid offset"))
    assert ckptfuzz.run_case(bases[0], tmp_path / "work").outcome == "ESCAPE accepted"


def test_oracle_flags_a_tensor_other_than_safetensors_reads(bases, tmp_path, monkeypatch):
    real = ckptfuzz.reference

    def off_by_one(folder):
        tensors, why = real(folder)
        name = next(n for n in sorted(tensors) if tensors[n].dtype == torch.float16)
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] += 1
        return tensors, why
    monkeypatch.setattr(ckptfuzz, "reference", off_by_one)
    assert ckptfuzz.run_case(bases[0], tmp_path / "work").outcome == "ESCAPE tensor"


def test_oracle_flags_a_pack_that_does_not_load(bases, tmp_path, monkeypatch):
    """The packer's check against the config switched off: a config that disagrees with its
    tensors then packs, and the load (which checks the same) is what fails."""
    from endor_gds.packing import packer  # noqa: PLC0415

    monkeypatch.setattr(packer, "_check_against_config", lambda *a: None)
    folder = tmp_path / "case"
    shutil.copytree(bases[0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 1}))
    r = ckptfuzz.run_case(folder, tmp_path / "work")
    assert r.outcome == "ESCAPE load" and "the config disagrees with the weights" in r.escape


def test_bench_smoke(bases, tmp_path):
    """bench/fuzz_checkpoint.py end to end: histogram, exit status, JSON summary, replay."""
    out = tmp_path / "summary.json"
    script = str(REPO / "bench" / "fuzz_checkpoint.py")
    common = ["--seed", "3", "--bases", str(bases[0].parent)]
    r = subprocess.run([sys.executable, script, "--cases", "12", *common, "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "# fuzz_checkpoint: endor_gds" in r.stdout
    assert "12 cases in" in r.stdout and "0 escapes" in r.stdout
    summary = json.loads(out.read_text())
    assert summary["escapes"] == [] and sum(sum(v.values()) for v in summary["by_op"].values()) == 12
    r = subprocess.run([sys.executable, script, "--case", "5", *common, "--save", str(tmp_path / "c5")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "case 5: " in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "c5" / "config.json").is_file()
