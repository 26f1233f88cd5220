"""Bad arguments to from_pretrained and pack are named errors that say what was given and what is
allowed, raised before any file is opened or written (the CLI side: tests/cli/test_mistakes.py)."""

from __future__ import annotations

import shutil

import pytest
import torch

import endor_gds
from endor_gds import ArgumentError, BudgetError, ClosedError, FormatError

BAD = [
    (dict(device="gpu"), r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'.*got 'gpu'"),
    (dict(device=3.5), r"device must be .* got 3\.5"),
    (dict(device="meta"), r"device must be .* got 'meta'"),
    (dict(prefetch_depth=0), r"prefetch_depth must be a whole number >= 1 .* got 0"),
    (dict(prefetch_depth=-1), r"prefetch_depth must be .* got -1"),
    (dict(prefetch_depth="2"), r"prefetch_depth must be .* got '2'"),
    (dict(prefetch_depth=True), r"prefetch_depth must be .* got True"),
    (dict(tier="nvme"), r"tier must be one of 'ssd', 'ram', got 'nvme'"),
    (dict(io="nvme"), r"io \(the reader mode\) must be one of auto, kvikio, .* got 'nvme'"),
    (dict(io=3), r"io \(the reader mode\) must be one of .* got 3"),
    (dict(verify_reads="yes"), r"verify_reads must be True, False or None .* got 'yes'"),
    (dict(max_memory="twenty GB"), r"max_memory: cannot read a byte size from 'twenty GB' \(try 4096"),
    (dict(max_memory="nan"), r"max_memory: cannot read a byte size from 'nan'"),
    (dict(max_memory=-1), r"max_memory: a byte size cannot be negative, got -1"),
    (dict(max_memory=True), r"max_memory: cannot read a byte size from True"),
    (dict(max_memory={"cpu": [1]}), r"max_memory: cannot read a byte size from \[1\]"),
]


@pytest.mark.parametrize("kwargs, match", BAD)
def test_bad_arguments_are_named_before_the_file_is_read(tmp_path, kwargs, match):
    missing = tmp_path / "never-opened.endor"  # the argument is checked first: no ReadError here
    with pytest.raises(ArgumentError, match=match):
        endor_gds.from_pretrained(missing, device=kwargs.pop("device", "cpu"), **kwargs)


def test_a_budget_for_another_device_is_a_budget_error(tmp_path):
    with pytest.raises(BudgetError, match=r"max_memory \{'cuda': '1GiB'\} has no entry for device cpu"):
        endor_gds.from_pretrained(tmp_path / "x.endor", device="cpu", max_memory={"cuda": "1GiB"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_cuda_says_what_to_do(tmp_path):
    for device in ("cuda", "cuda:1", torch.device("cuda", 0)):
        with pytest.raises(ArgumentError, match=r"torch\.cuda\.is_available\(\) is False\): use device='cpu'"):
            endor_gds.from_pretrained(tmp_path / "x.endor", device=device)


def test_argument_error_is_an_endor_error_and_a_value_error():
    assert issubclass(ArgumentError, endor_gds.EndorError) and issubclass(ArgumentError, ValueError)
    assert issubclass(ClosedError, endor_gds.EndorError) and issubclass(ClosedError, RuntimeError)


def test_the_checkpoint_instead_of_the_packed_file(model_dir, tmp_path):
    ckpt = model_dir("llama", torch.float16)
    with pytest.raises(ArgumentError, match=rf"{ckpt} is a checkpoint folder, not an \.endor file: pack "
                                            rf"it first \(endor-gds pack {ckpt} model\.endor\)"):
        endor_gds.from_pretrained(ckpt, device="cpu")
    with pytest.raises(ArgumentError, match=r"is a folder, not an \.endor file"):
        endor_gds.open(tmp_path)
    with pytest.raises(ArgumentError, match=r"verify_reads must be True, False or None \(the default\), got 1"):
        endor_gds.open(tmp_path / "x.endor", verify_reads=1)
    shard = next(ckpt.glob("*.safetensors"))
    with pytest.raises(FormatError, match=r"bad magic .* \(a safetensors file: pack its checkpoint folder first"):
        endor_gds.from_pretrained(shard, device="cpu")


def test_generate_after_close_names_the_closed_model(packed):
    model = endor_gds.from_pretrained(packed("llama", torch.float16), device="cpu")
    ids = torch.tensor([[5, 9, 22]])
    first = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    model.endor.close()
    with pytest.raises(ClosedError, match=r"this model was closed \(model\.endor\.close\(\)\).*from_pretrained"):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    with pytest.raises(ClosedError):
        model(ids)
    assert first.shape == (1, 5)


PACK_BAD = [
    (dict(prune="magnitude", sparsity=1.5), r"sparsity must be a fraction in \[0, 1\) .* got 1\.5"),
    (dict(prune="magnitude", sparsity=-0.1), r"sparsity must be .* got -0\.1"),
    (dict(prune="magnitude", sparsity=float("nan")), r"sparsity must be .* got nan"),
    (dict(prune="magnitude", sparsity="half"), r"sparsity must be .* got 'half'"),
    (dict(prune="none", sparsity=2.0), r"sparsity must be .* got 2\.0"),
    (dict(prune="l1"), r"prune must be one of none, magnitude, wanda, got 'l1'"),
    (dict(codec="zstd"), r"codec must be one of auto, raw, expdict, exphuff, got 'zstd'"),
]


@pytest.mark.parametrize("kwargs, match", PACK_BAD)
def test_pack_arguments_are_named_before_anything_is_read_or_written(tmp_path, kwargs, match):
    dst = tmp_path / "out" / "m.endor"
    with pytest.raises(ArgumentError, match=match):
        endor_gds.pack(tmp_path / "no-such-checkpoint", dst, progress=False, **kwargs)
    assert not dst.parent.exists()


def test_pack_source_that_is_not_a_folder(model_dir, tmp_path):
    with pytest.raises(ArgumentError, match=r"no-such-folder does not exist \(expected a Hugging Face model folder\)"):
        endor_gds.pack(tmp_path / "no-such-folder", tmp_path / "m.endor", progress=False)
    one = tmp_path / "ckpt"
    shutil.copytree(model_dir("llama", torch.float16), one)
    with pytest.raises(ArgumentError, match=r"config\.json is a file; give the Hugging Face model folder"):
        endor_gds.pack(one / "config.json", tmp_path / "m.endor", progress=False)
    assert not (tmp_path / "m.endor").exists()
