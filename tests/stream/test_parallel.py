"""Tensor parallelism on torch.distributed (gloo): ranks started by ``torchrun`` each stream only
their shard of every layer, and together compute the single-process model: the same greedy tokens,
logits within 1e-5 relative (the row-parallel sums add in another order), each rank reading 1/N
of the layers' bytes. Bad starts (a missing file, a file of another pack or for another rank
count) and a rank dying mid-generation are named errors on every rank, never a hang.

The error cases start the ranks by hand (RANK, WORLD_SIZE, MASTER_ADDR/PORT, as torchrun sets
them): torchrun stops the surviving ranks as soon as one fails, which is right for users but hides
what each rank said."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support.reference import BATCH, BATCH_MASK, PROMPT, reference_model

import endor_gds
from endor_gds.errors import UnsupportedModelError

WORKER = Path(__file__).resolve().parent.parent / "support" / "tp_worker.py"
PAGE = 4096


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", ENDOR_DECODE_THREADS="1", ENDOR_TP_TIMEOUT="60")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _torchrun(n: int, path, out: Path, *args, fused: bool = True) -> None:
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           str(WORKER), str(path), str(out), *args]
    proc = subprocess.run(cmd, env=_env(ENDOR_FUSED=int(fused)), capture_output=True, text=True, timeout=300)
    errors = {p.name: p.read_text() for p in out.glob("rank*.json")}
    assert proc.returncode == 0, f"{errors}\n{proc.stderr[-3000:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _by_hand(n: int, path, out: Path, *args, timeout: float = 120, **env) -> list[int]:
    """The ranks as separate processes (the bit-identical path: fused=False); their exit codes, in
    rank order."""
    out.mkdir(exist_ok=True)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(path), str(out), *args],
                              env=_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=n, MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, ENDOR_FUSED=0, **env),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(n)]
    codes = []
    try:
        for p in procs:
            p.wait(timeout=timeout)
            codes.append(p.returncode)
    finally:
        for p in procs:
            p.kill()
    return codes


def _said(out: Path, rank: int) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-5, f"logits differ by {rel:.3g} relative"


def _segments(ef, extents) -> int:
    return sum(len(ef.tensors[n].segments) for ext in extents for n in ext.tensors)


@pytest.mark.parametrize("family, n, tier, fused", [
    ("llama", 2, "ssd", True), ("llama", 4, "ram", False),
    ("qwen2", 2, "ram", True), ("qwen2", 4, "ssd", False),
    ("mistral", 2, "ssd", False), ("mistral", 4, "ssd", True),
])
def test_ranks_compute_the_single_process_model(model_dir, packed, tmp_path, family, n, tier, fused):
    """fp32 models with 4 query and 2 key/value heads (2 ranks divide them, 4 replicate them),
    Qwen2's q/k/v biases split with their rows; batch 1 and a padded batch of 2; fused CPU
    product on and off."""
    single = packed(family, torch.float32)
    path = tmp_path / "tp.endor"
    endor_gds.pack(model_dir(family, torch.float32), path, prune="magnitude", progress=False, tp=n)
    _torchrun(n, path, tmp_path / "out", "--tier", tier, fused=fused)

    ref = reference_model(single)
    with torch.no_grad():
        want_logits = ref(PROMPT).logits
        want = ref.generate(PROMPT, max_new_tokens=4, do_sample=False, pad_token_id=0,
                            output_logits=True, return_dict_in_generate=True)
        want_batch = ref.generate(BATCH, attention_mask=BATCH_MASK, max_new_tokens=4, do_sample=False,
                                  pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with endor_gds.open(single) as one, endor_gds.open(path) as tp:
        single_bytes = sum(e.length for e in one.layers)
        for r in range(n):
            got = torch.load(tmp_path / "out" / f"rank{r}.pt", weights_only=False)
            assert torch.equal(got["seq"], want.sequences) and torch.equal(got["batch_seq"], want_batch.sequences)
            _close(got["logits"], want_logits)
            _close(got["gen_logits"], torch.stack(want.logits))
            _close(got["batch_logits"], torch.stack(want_batch.logits))
            # every step streams every layer: this rank's shard extents, and nothing else
            stats = got["summary"]
            mine = tp.layer_extents(r)
            assert stats["per_token"]["bytes_read"] == got["extent_bytes"] == sum(e.length for e in mine)
            # 1/N of the single file's layers, within page padding and the tensors every rank holds
            whole = sum(e.stored_nbytes for ext in mine for name in ext.tensors
                        if (e := tp.tensors[name]).shape == one.tensors[name.split(".", 2)[2]].shape)
            slack = PAGE * _segments(tp, mine) + whole
            assert abs(got["extent_bytes"] - single_bytes / n) <= slack
            ranks = stats["tensor_parallel"]["ranks"]
            assert [x["bytes_read"] for x in ranks] == [sum(e.length for e in tp.layer_extents(k)) for k in range(n)]
            assert stats["tensor_parallel"]["size"] == n and stats["tensor_parallel"]["backend"] == "gloo"
            assert all(x["collective_s"] > 0 for x in ranks)


def test_per_rank_files_on_their_own_drives(model_dir, packed, tmp_path):
    """`endor-gds split`'s per-rank files, each in a folder of its own, named by one path with
    {rank} in it: the same tokens as the single-process model."""
    src = tmp_path / "tp.endor"
    endor_gds.pack(model_dir("llama", torch.float32), src, prune="magnitude", progress=False, tp=2)
    from endor_gds.packing.split import split  # noqa: PLC0415

    for r, part in enumerate(split(src, tmp_path / "parts")):
        (tmp_path / f"drive{r}").mkdir()
        shutil.move(part, tmp_path / f"drive{r}" / "model.endor")
    _torchrun(2, tmp_path / "drive{rank}" / "model.endor", tmp_path / "out")
    ref = reference_model(packed("llama", torch.float32))
    with torch.no_grad():
        want = ref.generate(PROMPT, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for r in range(2):
        got = torch.load(tmp_path / "out" / f"rank{r}.pt", weights_only=False)
        assert torch.equal(got["seq"], want)
        assert got["summary"]["tensor_parallel"]["ranks"][r]["file"] == str(tmp_path / f"drive{r}" / "model.endor")


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """Two tensor-parallel packs of one checkpoint (two pack ids), split per rank."""
    from endor_gds.benchmarks.models import build_model  # noqa: PLC0415
    from endor_gds.packing.split import split  # noqa: PLC0415

    root = tmp_path_factory.mktemp("tp2")
    src = build_model(root / "llama", "llama", torch.float32)
    files = {}
    for name, n in (("a", 2), ("b", 2), ("four", 4)):
        endor_gds.pack(src, root / f"{name}.endor", progress=False, tp=n)
        files[name] = root / f"{name}.endor"
    split(root / "a.endor", root / "a")
    split(root / "b.endor", root / "b")
    endor_gds.pack(src, root / "plain.endor", progress=False)
    files["plain"] = root / "plain.endor"
    return root, files


def test_a_missing_rank_file_is_named_on_every_rank(tp2, tmp_path):
    root, _ = tp2
    (tmp_path / "d0").mkdir()
    shutil.copy(root / "a" / "a.rank0.endor", tmp_path / "d0" / "m.endor")
    codes = _by_hand(2, tmp_path / "d{rank}" / "m.endor", tmp_path / "out")
    assert codes == [3, 3]
    assert _said(tmp_path / "out", 1)["type"] == "FileNotFoundError"
    said = _said(tmp_path / "out", 0)
    assert said["type"] == "TensorParallelError"
    assert "opening the file failed on other ranks: rank 1: FileNotFoundError" in said["message"]


def test_files_of_another_pack_are_named(tp2, tmp_path):
    root, _ = tp2
    for r, pack_ in enumerate("ab"):  # rank 0 of one pack, rank 1 of another
        (tmp_path / f"d{r}").mkdir()
        shutil.copy(root / pack_ / f"{pack_}.rank{r}.endor", tmp_path / f"d{r}" / "m.endor")
    assert _by_hand(2, tmp_path / "d{rank}" / "m.endor", tmp_path / "out") == [3, 3]
    for r in range(2):
        said = _said(tmp_path / "out", r)
        assert said["type"] == "TensorParallelError" and "not of one pack" in said["message"]


@pytest.mark.parametrize("which, match", [
    ("four", "packed for 4 tensor-parallel rank\\(s\\), this run has 2: run it with `torchrun --nproc-per-node 4`"),
    ("plain", "is not packed for tensor parallelism, and this is rank . of 2: pack it with `endor-gds pack "
              "SRC OUT --tp 2`"),
])
def test_a_file_for_another_rank_count_is_named(tp2, tmp_path, which, match):
    _, files = tp2
    assert _by_hand(2, files[which], tmp_path / "out") == [3, 3]
    for r in range(2):
        said = _said(tmp_path / "out", r)
        assert said["type"] == "UnsupportedModelError"
        assert __import__("re").search(match, said["message"]), said["message"]


def test_a_rank_file_of_another_rank_is_named(tp2, tmp_path):
    root, _ = tp2
    assert _by_hand(2, root / "a" / "a.rank0.endor", tmp_path / "out") == [3, 3]
    said = _said(tmp_path / "out", 1)
    assert said["type"] == "UnsupportedModelError"
    assert "holds the shards of rank(s) [0], not of rank 1" in said["message"]


def test_a_rank_dying_mid_generation_stops_the_others(tp2, tmp_path):
    """Rank 1 exits abruptly at its third step: rank 0's next all-reduce fails by name, well within
    the process group's timeout (ENDOR_TP_TIMEOUT=60 here), instead of hanging."""
    _, files = tp2
    t0 = time.monotonic()
    codes = _by_hand(2, files["a"], tmp_path / "out", "--die-rank", "1", "--die-step", "2")
    assert codes == [3, 17]
    said = _said(tmp_path / "out", 0)
    assert said["type"] == "TensorParallelError" and "an all-reduce failed" in said["message"]
    assert time.monotonic() - t0 < 100


def test_a_process_group_for_something_else(tp2, packed, tmp_path):
    """process_group=None: in a group of 2 (data-parallel copies, say), each process runs the whole
    unsplit file alone, bit-identical to the model held in memory."""
    _, files = tp2
    # torch's CPU matmul sums in an order that depends on its thread count: the test's
    threads = torch.get_num_threads()
    assert _by_hand(2, files["plain"], tmp_path / "out", "--alone", OMP_NUM_THREADS=threads) == [0, 0]
    ref = reference_model(files["plain"])
    with torch.no_grad():
        want = ref(PROMPT).logits
    for r in range(2):
        got = torch.load(tmp_path / "out" / f"rank{r}.pt", weights_only=False)
        assert torch.equal(got["logits"], want) and got["summary"]["tensor_parallel"] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_without_a_process_group(tp2, model_dir, packed, tmp_path, dtype):
    """A file packed for 2 ranks, opened by one process, says how to start it; one packed for 1
    rank runs alone in the checkpoint's dtype, bit-identical to the model held in memory (no
    collective, no reordering)."""
    _, files = tp2
    with pytest.raises(UnsupportedModelError, match="run it with `torchrun --nproc-per-node 2`"):
        endor_gds.from_pretrained(files["a"], device="cpu")
    with pytest.raises(endor_gds.ArgumentError, match="process_group must be 'auto', None or a torch"):
        endor_gds.from_pretrained(files["a"], device="cpu", process_group="default")
    from support.reference import assert_same  # noqa: PLC0415

    endor_gds.pack(model_dir("llama", dtype), tmp_path / "one.endor", prune="magnitude", progress=False, tp=1)
    model = endor_gds.from_pretrained(tmp_path / "one.endor", device="cpu")
    try:
        assert model.endor.rank == 0 and model.endor.tp is None and model.dtype == dtype
        assert_same(model, reference_model(packed("llama", dtype)))
    finally:
        model.endor.close()


@pytest.mark.gpu
def test_nccl_one_rank_matches_the_plain_path(packed):
    """On a GPU host: torchrun with one rank starts NCCL, streams a --tp 1 file on cuda through the
    all-reduce path, and generates the tokens of the plain file run without a process group."""
    args = ["--prompt", "w5 w9 w22", "--max-new-tokens", "6", "--device", "cuda", "--json"]
    plain = subprocess.run([sys.executable, "-m", "endor_gds", "run", str(packed("llama", torch.float16)), *args],
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                          "-m", "endor_gds", "run", str(packed("llama", torch.float16, tp=1)), *args],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    got, want = json.loads(one.stdout), json.loads(plain.stdout)
    assert got["tokens"] == want["tokens"]
    tp = got["stats"]["tensor_parallel"]
    assert tp["size"] == 1 and tp["backend"] == "nccl" and tp["ranks"][0]["collective_s"] > 0
