"""Bad arguments to from_pretrained (and `endor-gds run`) are named errors that say what was given
and what is allowed, raised before the file is opened; the CLI prints one line and exits 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import endor_gds
from endor_gds import ArgumentError

BAD = [
    (dict(device="gpu"), r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'.*got 'gpu'"),
    (dict(device=3.5), r"device must be .* got 3\.5"),
    (dict(device="meta"), r"device must be .* got 'meta'"),
    (dict(prefetch_depth=0), r"prefetch_depth must be a whole number >= 1 .* got 0"),
    (dict(prefetch_depth=-1), r"prefetch_depth must be .* got -1"),
    (dict(prefetch_depth="2"), r"prefetch_depth must be .* got '2'"),
    (dict(prefetch_depth=True), r"prefetch_depth must be .* got True"),
    (dict(tier="nvme"), r"tier must be one of 'ssd', 'ram', got 'nvme'"),
]


@pytest.mark.parametrize("kwargs, match", BAD)
def test_bad_arguments_are_named_before_the_file_is_read(tmp_path, kwargs, match):
    missing = tmp_path / "never-opened.endor"  # the argument is checked first: no ReadError here
    with pytest.raises(ArgumentError, match=match):
        endor_gds.from_pretrained(missing, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_cuda_says_what_to_do(tmp_path):
    for device in ("cuda", "cuda:1", torch.device("cuda", 0)):
        with pytest.raises(ArgumentError, match=r"torch\.cuda\.is_available\(\) is False\): use device='cpu'"):
            endor_gds.from_pretrained(tmp_path / "x.endor", device=device)


def test_argument_error_is_an_endor_error_and_a_value_error():
    assert issubclass(ArgumentError, endor_gds.EndorError) and issubclass(ArgumentError, ValueError)


@pytest.mark.parametrize("args, given", [(["--device", "gpu"], "'gpu'"), (["--prefetch-depth", "0"], "got 0")])
def test_cli_prints_one_line_and_exits_2(packed, args, given):
    path = packed("llama", torch.float16)
    r = subprocess.run([sys.executable, "-m", "endor_gds", "run", str(path), "--prompt", "w1 w2", *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("endor-gds run: ArgumentError:") and given in lines[0], r.stderr
    assert "Traceback" not in r.stderr
