"""Integrity (issue 7): CRC-32C checks on every read when asked, the option's precedence, and
the tile offset tables checked at open."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.manifest_edit import manifest_edit

import endor_gds
from endor_gds import defaults
from endor_gds.container import EndorFile
from endor_gds.errors import ChecksumError, DecodeError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def damaged(packed, tmp_path_factory):
    """A packed file with one byte of one bitmap tensor's values changed (CRCs left as they were),
    plus the tensor's name, its true value, and the file's tile-offset segments."""
    src = packed("llama", torch.float16, prune="magnitude")
    with endor_gds.open(src) as f:
        name = next(n for n, e in f.tensors.items() if e.encoding == "bitmap")
        seg = f.tensors[name].segments["values"]
        good = f.read_tensor(name)
    data = bytearray(src.read_bytes())
    data[seg.offset + 10] ^= 0x40
    path = tmp_path_factory.mktemp("damaged") / "damaged.endor"
    path.write_bytes(data)
    return path, name, good


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_reads_verify_by_default_and_opting_out_does_not(damaged):
    path, name, good = damaged
    assert defaults.get("verify_reads") is True
    with EndorFile(path) as f:
        with pytest.raises(ChecksumError, match=f"{name}:values"):
            f.read_tensor(name)
    with EndorFile(path, verify_reads=False) as f:
        assert not _same(f.read_tensor(name), good)  # silently different: the check was turned off


def test_verify_reads_on_the_file(damaged):
    path, name, good = damaged
    with EndorFile(path, verify_reads=True) as f:
        with pytest.raises(ChecksumError, match=rf"segment {name}:values \(offset \d+, \d+ bytes\) "
                                                rf"fails its CRC-32C: stored 0x[0-9a-f]{{8}}") as info:
            f.read_tensor(name)
        assert info.value.segment == f"{name}:values"
        assert not _same(f.read_tensor(name, verify=False), good)  # the call's argument wins
        other = next(n for n in f.tensors if n != name)
        f.read_tensor(other)  # an intact tensor still reads


def test_global_option_is_followed_at_each_read(damaged):
    path, name, _ = damaged
    with defaults.set(verify_reads=False), EndorFile(path) as f:
        f.read_tensor(name)
        with defaults.set(verify_reads=True):
            with pytest.raises(ChecksumError, match=f"{name}:values"):
                f.read_tensor(name)
            with pytest.raises(ChecksumError, match=f"{name}:values"):
                f.read_tensor_bits(name)
        f.read_tensor(name)  # back to False on leaving the inner block
    with defaults.set(verify_reads=True), EndorFile(path, verify_reads=False) as f:
        f.read_tensor(name)  # the file's own setting beats the global one


def test_environment_variable_turns_it_off_and_on(damaged):
    path, name, _ = damaged
    code = (f"import endor_gds; f = endor_gds.open({str(path)!r}); "
            f"f.read_tensor({name!r})")
    env = dict(os.environ, ENDOR_VERIFY_READS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "ChecksumError" in r.stderr and f"{name}:values" in r.stderr
    off = subprocess.run([sys.executable, "-c", code], env=dict(env, ENDOR_VERIFY_READS="0"),
                         capture_output=True, text=True)
    assert off.returncode == 0, off.stderr


def test_verify_reads_checks_tile_offsets_at_open(packed, tmp_path):
    """With verification on, the tile offset tables validated at open are CRC-checked too: a
    table still self-consistent after damage (here: its padding) is not trusted."""
    src = packed("llama", torch.float16, prune="magnitude")
    with endor_gds.open(src) as f:
        name = next(n for n, e in f.tensors.items() if e.encoding == "bitmap")
        seg = f.tensors[name].segments["tile_offsets"]
    data = bytearray(src.read_bytes())
    data[seg.offset + seg.nbytes] = 1  # padding after the table
    path = tmp_path / "pad.endor"
    path.write_bytes(data)
    EndorFile(path, verify_reads=False).close()
    with pytest.raises(ChecksumError, match=f"{name}:tile_offsets"):
        EndorFile(path)


@pytest.mark.parametrize("entry, value, match", [
    (0, 1, "tile offsets must run from 0 to nnz"),
    (-1, 0, "tile offsets must run from 0 to nnz"),
    (1, 0xFFFFFFFF, "tile 0 claims 4294967295 values"),
    (1, 4097, "tile 0 claims 4097 values"),
])
def test_every_tile_offset_rule_is_checked_at_open(packed, tmp_path, entry, value, match):
    """Each rule of the table (first 0, last nnz, non-decreasing, at most 4096 per tile) refuses
    the file at open, with the CRC made to match so that only the rule itself can catch it."""
    from endor_gds.fuzz import fuzzlib  # noqa: PLC0415 - imports the whole fuzz corpus

    base = fuzzlib.load_base(packed("llama", torch.float16, prune="magnitude"))
    seg = next(s for s in base.segments if s.kind == "tile_offsets" and s.nbytes >= 12)
    buf = bytearray(base.data)
    at = seg.offset + 4 * (entry if entry >= 0 else seg.nbytes // 4 + entry)
    struct.pack_into("<I", buf, at, value)
    path = tmp_path / "t.endor"
    path.write_bytes(fuzzlib.with_segment_crc(base, bytes(buf), seg))
    with pytest.raises(DecodeError, match=match):
        EndorFile(path)
    with EndorFile(path, check_tiles=False) as f:  # deferred: then the first read refuses it
        name = seg.label.split(" ", 1)[1].rsplit(":", 1)[0]
        with pytest.raises(DecodeError, match=match):
            f.read_tensor(name)


def test_bench_verify_smoke(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "bench" / "bench_verify.py"), "--nbytes", "8MiB",
                        "--repeats", "2", "--dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "crc32c" in r.stdout and "verify_reads cost" in r.stdout
    assert list(tmp_path.iterdir()) == []  # its scratch files are removed


@pytest.mark.parametrize("edit,match", [
    (lambda m: next(e for e in m["extents"] if e["name"] == "layer.1.expert.3").update(name="layer.1.expert.03"),
     "extent layer.1.expert.03 of kind expert must be named 'layer.1.expert.3'"),
    (lambda m: next(e for e in m["extents"] if e["name"] == "layer.1.expert.3").update(expert="3"),
     "extent layer.1.expert.3 expert"),
    (lambda m: [e.update(layer=7, name=e["name"].replace("layer.2.", "layer.7."))
                for e in m["extents"] if e["name"].startswith("layer.2.expert.")]
     and [t.update(extent=t["extent"].replace("layer.2.", "layer.7."))
          for t in m["tensors"] if t["extent"].startswith("layer.2.expert.")],
     "expert extent layer.7.expert.0 belongs to layer 7, but the file has 3 layer extents"),
])
def test_expert_extents_are_checked_at_open(packed, tmp_path, edit, match):
    """Format v4's expert extents: named for their layer and expert, integers, of a layer the
    file has (the numbering 0..E-1 of a layer's experts: tests/stream/test_experts.py)."""
    path = manifest_edit(packed("qwen3_moe", torch.float32), edit, tmp_path)
    with pytest.raises(endor_gds.FormatError, match=match):
        EndorFile(path)


def _shard(m, name):
    return next(e for e in m["extents"] if e["name"] == name)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.pop("tensor_parallel"), "extent layer.0.rank.0 is a shard, but the manifest has no tensor_parallel"),
    (lambda m: m.update(format_version=4), "format_version"),
    (lambda m: _shard(m, "layer.1.rank.1").update(name="layer.1.rank.01"),
     "extent layer.1.rank.01 of kind shard must be named 'layer.1.rank.1'"),
    (lambda m: _shard(m, "layer.1.rank.1").update(rank=1024), "extent layer.1.rank.1 rank"),
    (lambda m: m["tensor_parallel"].update(size=0), "tensor_parallel size"),
    (lambda m: m["tensor_parallel"].update(ranks=[1, 0]), "distinct ranks in increasing order"),
    (lambda m: m["tensor_parallel"].update(ranks=[0, 2]), "tensor_parallel ranks"),
    (lambda m: m["tensor_parallel"].update(ranks=[0]),
     "layer 0 has shard extents of ranks \\[0, 1\\], the file holds ranks \\[0\\]"),
    (lambda m: m["tensor_parallel"]["plan"].update({"mlp.up_proj": "colwise_gather_output"}),
     "tensor_parallel plan of mlp.up_proj"),
    (lambda m: m["tensor_parallel"].update(pack_id=7), "tensor_parallel pack_id"),
    (lambda m: next(t for t in m["tensors"] if t["name"].startswith("rank.1.")).update(
        name="model.layers.9.self_attn.q_proj.weight"), "the tensors of rank r's shard extents, and only they"),
    (lambda m: next(t for t in m["tensors"] if t["name"].startswith("rank.1.")).update(
        name="rank.0.model.layers.9.self_attn.q_proj.weight"), "the tensors of rank r's shard extents"),
    (lambda m: m["extents"].append({"name": "layer.0", "kind": "layer", "layer": 0,
                                    "offset": _shard(m, "layer.0.rank.0")["offset"], "length": 0}),
     "holds its layers as shard extents only"),
])
def test_shard_extents_are_checked_at_open(packed, tmp_path, edit, match):
    """Format v5's tensor-parallel files: the manifest's tensor_parallel entry, one shard extent
    per layer and rank held, named for both, its tensors named for its rank."""
    path = manifest_edit(packed("llama", torch.float32, tp=2), edit, tmp_path)
    with pytest.raises(endor_gds.FormatError, match=match):
        EndorFile(path)


def test_a_tensor_parallel_file_reads_by_rank(packed):
    """Each rank's layers are its shard extents; its tensors are named as the model's parameters."""
    with EndorFile(packed("llama", torch.float32, tp=2)) as f:
        assert f.format_version == 5 and f.num_layers == 3 and f.layers == []
        assert [e.name for e in f.layer_extents(1)] == ["layer.0.rank.1", "layer.1.rank.1", "layer.2.rank.1"]
        t = f.model_tensors(1)
        assert t["model.layers.0.self_attn.q_proj.weight"].name == "rank.1.model.layers.0.self_attn.q_proj.weight"
        assert t["model.layers.0.self_attn.q_proj.weight"].shape == (64, 128)  # 2 of 4 heads of 32
        assert t["model.norm.weight"].name == "model.norm.weight"
        with pytest.raises(endor_gds.ArgumentError,
                           match="holds the shards of ranks \\[0, 1\\] of a 2-rank pack, not rank 2"):
            f.layer_extents(2)


def test_a_plan_other_than_the_models_is_refused_at_load(packed, tmp_path):
    """A file whose recorded tensor-parallel plan is not transformers' for the model (here down_proj
    cut by rows) opens, but the runtime refuses it before any read: it would compute with it
    wrongly."""
    path = manifest_edit(packed("llama", torch.float32, tp=1),
                         lambda m: m["tensor_parallel"]["plan"].update({"mlp.down_proj": "colwise"}), tmp_path)
    with pytest.raises(endor_gds.FormatError, match="split by the tensor-parallel plan \\{'mlp.down_proj': "
                                                    "'colwise'\\}, which is not this transformers'"):
        endor_gds.from_pretrained(path, device="cpu")
