"""Locating nvcc and building with the run-time options (shared by the CUDA compile/emulation tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from endor_gds.kernels import NVRTC_OPTIONS, nvcc_options

REPO = Path(__file__).resolve().parent.parent
CUDA_DIR = REPO / "cuda"
# nvcc's own warnings, ptxas warnings (spills and local memory included) and host-compiler
# warnings all fail the build.
STRICT = ["-Werror", "all-warnings", "-Xptxas", "-warn-spills,-warn-lmem-usage,-Werror"]


def find_nvcc() -> str | None:
    """``$NVCC``, nvcc on PATH, or the default CUDA install; None when there is none."""
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_nvcc() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set NVCC or put the CUDA toolkit on PATH)")
    return nvcc


def run_nvcc(nvcc: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """nvcc with the run-time options (kernels.NVRTC_OPTIONS, nvcc spelling) + ``args``."""
    cmd = [nvcc, *nvcc_options(NVRTC_OPTIONS), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
