"""A newcomer's mistakes on the command line, each in a subprocess as they would type it: one line
on stderr that names the error and the value given, exit status 2, no traceback (``--debug`` shows
it). The same arguments through the Python API: tests/stream/test_arguments.py."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from endor_gds.benchmarks.models import build_model

NO_CUDA = not torch.cuda.is_available()

# (argv with {file} = a packed .endor, {ckpt} = its checkpoint folder, {shard} = a safetensors file
#  of it, {new} = a path that does not exist yet; what stderr's one line must contain)
ROWS = {
    "device gpu": (["run", "{file}", "--prompt", "1 2", "--device", "gpu"],
                   "ArgumentError: device must be 'auto', 'cpu', 'cuda' or 'cuda:N'", "got 'gpu'"),
    "device cuda, no CUDA": (["run", "{file}", "--prompt", "1 2", "--device", "cuda"],
                             "ArgumentError: device='cuda' was asked for", "use device='cpu'"),
    "device cuda:1, no GPU": (["run", "{file}", "--prompt", "1 2", "--device", "cuda:1"],
                              "ArgumentError: device='cuda:1' was asked for", "use device='cpu'"),
    "prefetch depth 0": (["run", "{file}", "--prompt", "1 2", "--prefetch-depth", "0"],
                         "ArgumentError: prefetch_depth must be a whole number >= 1", "got 0"),
    "prefetch depth two": (["run", "{file}", "--prompt", "1 2", "--prefetch-depth", "two"],
                           "endor-gds run: argument --prefetch-depth: invalid int value", "'two'"),
    "max memory words": (["run", "{file}", "--prompt", "1 2", "--max-memory", "lots"],
                         "ArgumentError: max_memory: cannot read a byte size", "'lots'"),
    "max memory too small": (["run", "{file}", "--prompt", "1 2", "--device", "cpu", "--max-memory", "4KiB"],
                             "BudgetError: max_memory=4096 bytes for cpu cannot hold", "4096"),
    "tier nvme": (["run", "{file}", "--prompt", "1 2", "--tier", "nvme"],
                  "endor-gds run: argument --tier: invalid choice", "'nvme'"),
    "io nvme": (["run", "{file}", "--prompt", "1 2", "--io", "nvme"],
                "endor-gds run: argument --io: invalid choice", "'nvme'"),
    "run the checkpoint folder": (["run", "{ckpt}", "--prompt", "1 2", "--device", "cpu"],
                                  "ArgumentError: ", "is a checkpoint folder, not an .endor file: pack it first"),
    "run a safetensors file": (["run", "{shard}", "--prompt", "1 2", "--device", "cpu"],
                               "FormatError: ", "(a safetensors file: pack its checkpoint folder first"),
    "run a missing file": (["run", "{new}", "--prompt", "1 2", "--device", "cpu"],
                           "FileNotFoundError: ", "no-such.endor"),
    "prompt text without tokenizer": (["run", "{file}", "--prompt", "hello world", "--device", "cpu"],
                                      "PromptError: this file embeds no tokenizer", "give --tokenizer DIR"),
    "sparsity 1.5": (["pack", "{ckpt}", "{new}", "--sparsity", "1.5"],
                     "ArgumentError: --sparsity 1.5 prunes only with --prune magnitude", "1.5"),
    "sparsity 1.5 pruned": (["pack", "{ckpt}", "{new}", "--prune", "magnitude", "--sparsity", "1.5"],
                            "ArgumentError: sparsity must be a fraction in [0, 1)", "got 1.5"),
    "sparsity half": (["pack", "{ckpt}", "{new}", "--prune", "magnitude", "--sparsity", "half"],
                      "endor-gds pack: argument --sparsity: invalid float value", "'half'"),
    "codec zstd": (["pack", "{ckpt}", "{new}", "--codec", "zstd"],
                   "endor-gds pack: argument --codec: invalid choice", "'zstd'"),
    "pack a missing folder": (["pack", "{new}", "{new}.endor"],
                              "ArgumentError: ", "does not exist (expected a Hugging Face model folder)"),
    "pack into a folder": (["pack", "{ckpt}", "{ckpt}"],
                           "PackError: destination", "is a folder; give a file name"),
    "wanda without calibration": (["pack", "{ckpt}", "{new}", "--prune", "wanda"],
                                  "CalibrationError: prune='wanda' needs calibration data", "--calib FILE"),
    "inspect the checkpoint folder": (["inspect", "{ckpt}"], "ArgumentError: ", "is a checkpoint folder"),
    "verify a safetensors file": (["verify", "{shard}"], "FormatError: ", "a safetensors file"),
    "no command": ([], "endor-gds: the following arguments are required: command", "--help"),
    "unknown command": (["serve-all"], "endor-gds: argument command: invalid choice", "'serve-all'"),
}
NEEDS_NO_CUDA = {"device cuda, no CUDA", "device cuda:1, no GPU"}


def _endor_gds(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "endor_gds", *argv], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every row run once, four processes at a time (each is mostly Python's start-up)."""
    root = tmp_path_factory.mktemp("mistakes")
    ckpt = build_model(root / "ckpt", "llama", torch.float16, tokenizer=False)
    file = root / "m.endor"
    assert _endor_gds(["pack", str(ckpt), str(file), "-q"]).returncode == 0
    paths = dict(file=file, ckpt=ckpt, shard=next(ckpt.glob("*.safetensors")), new=root / "no-such.endor")
    argvs = {name: [a.format(**paths) for a in row[0]] for name, row in ROWS.items()}
    with ThreadPoolExecutor(4) as pool:
        done = dict(zip(argvs, pool.map(_endor_gds, argvs.values())))
    done["_paths"] = paths
    return done


@pytest.mark.parametrize("name", sorted(ROWS))
def test_one_line_exit_2_no_traceback(results, name):
    if name in NEEDS_NO_CUDA and not NO_CUDA:
        pytest.skip("a CUDA GPU is present")
    _, what, given = ROWS[name]
    r = results[name]
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("endor-gds"), lines[0]
    assert what in lines[0] and given in lines[0], lines[0]
    assert not (results["_paths"]["new"]).exists()  # nothing was written by a refused command


def test_debug_shows_the_traceback(results):
    r = _endor_gds(["--debug", "inspect", str(results["_paths"]["ckpt"])])
    assert r.returncode != 0 and "Traceback" in r.stderr and "ArgumentError" in r.stderr
