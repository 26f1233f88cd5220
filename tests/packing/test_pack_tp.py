"""``pack --tp N`` and ``split``: weights pruned whole, then cut into each rank's shard extent; per-rank
files that keep the pack's segments, fingerprint and id; the command line, torchrun included."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import endor_gds
from endor_gds.cli.main import main as cli_main
from endor_gds.errors import ArgumentError, UnsupportedModelError
from endor_gds.packing.split import split
from endor_gds.recipes import recipes
from endor_gds.shards import shard_plan


@pytest.mark.parametrize("family, n", [("llama", 2), ("qwen2", 4), ("qwen3", 2)])
def test_each_rank_holds_its_block_of_the_pruned_tensor(packed, family, n):
    """The tensor-parallel file's shard of every tensor is the block of the same tensor in the file
    packed whole (magnitude-pruned per output row before the split, bit for bit); resident
    tensors are stored once."""
    with endor_gds.open(packed(family, torch.float16)) as one, \
            endor_gds.open(packed(family, torch.float16, tp=n)) as tp:
        plan = shard_plan(tp.config, recipes()[family], n)
        assert tp.tensor_parallel["size"] == n and tp.tensor_parallel["ranks"] == list(range(n))
        for r in range(n):
            for name, entry in tp.model_tensors(r).items():
                whole = one.read_tensor(name)
                got = tp.read_tensor(entry.name)
                if entry.extent == "resident":
                    assert torch.equal(got.view(torch.int16), whole.view(torch.int16)), name
                    continue
                rel = name.split(".", 3)[3]
                assert torch.equal(got.view(torch.int16), plan.take(rel, whole, r).view(torch.int16)), name
        assert {e.extent for e in tp.tensors.values() if not e.name.startswith("rank.")} == {"resident"}


def test_what_cannot_be_split_is_refused_before_writing(model_dir, tmp_path):
    dst = tmp_path / "m.endor"
    with pytest.raises(UnsupportedModelError, match="num_attention_heads=4 does not divide among 3 ranks"):
        endor_gds.pack(model_dir("llama", torch.float32), dst, progress=False, tp=3)
    with pytest.raises(ArgumentError, match="does not split mixture-of-experts layers"):
        endor_gds.pack(model_dir("qwen3_moe", torch.float32), dst, progress=False, tp=2)
    with pytest.raises(UnsupportedModelError, match="opt recipe has no \\[tensor_parallel\\]"):
        endor_gds.pack(model_dir("opt", torch.float32), dst, progress=False, tp=2)
    assert list(tmp_path.iterdir()) == []


def test_split_writes_one_whole_file_per_rank(packed, tmp_path):
    src = packed("llama", torch.float32, tp=2)
    parts = split(src, tmp_path)
    assert [p.name for p in parts] == [f"{src.stem}.rank0.endor", f"{src.stem}.rank1.endor"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in parts]  # no temporary left
    with endor_gds.open(src) as whole:
        for r, part in enumerate(parts):
            with endor_gds.open(part, verify_reads=True) as f:
                assert f.tensor_parallel == dict(whole.tensor_parallel, ranks=[r])
                assert f.fingerprint() == whole.fingerprint()
                assert set(f.model_tensors(r)) == set(whole.model_tensors(r))
                for name, entry in f.model_tensors(r).items():
                    assert torch.equal(f.read_tensor(entry.name), whole.read_tensor(entry.name)), name
                assert sorted(f.files) == sorted(whole.files)
                assert not list(f.verify())
    with pytest.raises(ArgumentError, match="not a tensor-parallel file"):
        split(packed("llama", torch.float32), tmp_path / "x")


def test_the_command_line(model_dir, packed, tmp_path, capsys):
    """pack --tp, inspect (a rank column), split; and run under torchrun: rank 0 prints the tokens
    the single-process run prints, with every rank's statistics."""
    src, dst = model_dir("llama", torch.float32), tmp_path / "m.endor"
    assert cli_main(["pack", str(src), str(dst), "--prune", "magnitude", "--tp", "2", "-q"]) == 0
    assert "split over 2 tensor-parallel ranks" in capsys.readouterr().out
    assert cli_main(["inspect", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "format v5, llama, 3 layers" in out and "tensor parallel: packed for 2 ranks, holds rank(s) [0, 1]" in out
    assert "layer rank" in out
    assert cli_main(["split", str(dst), "--out-dir", str(tmp_path / "parts")]) == 0
    assert capsys.readouterr().out.count("wrote ") == 2

    single = packed("llama", torch.float32)
    args = ["--prompt", "w5 w9 w22", "--max-new-tokens", "4", "--device", "cpu", "--json"]
    assert cli_main(["run", str(single), *args]) == 0
    want = json.loads(capsys.readouterr().out)["tokens"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "endor_gds", "run", str(tmp_path / "parts" / "m.rank{rank}.endor"), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)  # rank 0's output only: one JSON document
    assert got["tokens"] == want
    ranks = got["stats"]["tensor_parallel"]["ranks"]
    assert [x["file"] for x in ranks] == [str(tmp_path / "parts" / f"m.rank{r}.endor") for r in range(2)]
    assert all(x["bytes_read"] > 0 and x["collective_s"] > 0 for x in ranks)

