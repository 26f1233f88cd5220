"""Locating nvcc and NVRTC and building with the run-time options (shared by the CUDA
compile/emulation tests)."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from endor_gds.decode.gpu import NVRTC_OPTIONS, nvcc_options

REPO = Path(__file__).resolve().parents[2]
CUDA_DIR = REPO / "cuda"
# nvcc's own warnings, ptxas warnings (spills and local memory included) and host-compiler
# warnings all fail the build.
STRICT = ["-Werror", "all-warnings", "-Xptxas", "-warn-spills,-warn-lmem-usage,-Werror"]
# The undefined-behaviour sanitizer, fatal on the first report. What x86 forgives and a GPU does
# not: a misaligned access works on the CPU and faults on the GPU ("misaligned address"), and a
# shift by >= 32 bits is taken mod 32 by x86 but clamped by PTX, so the emulation and the kernel
# would disagree. The sanitizer makes both a test failure in the emulation harnesses.
UBSAN = ["-fsanitize=undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all"]


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


def build_emulator(nvcc: str, src: Path, exe: Path) -> None:
    """A kernel emulation harness (tests/support/*_emulate.cu): the kernel's host functions, with
    the run-time options, warnings as errors and the undefined-behaviour sanitizer."""
    res = run_nvcc(nvcc, ["-DENDOR_EMULATE", "-O2", "-g", "-arch=sm_80", *STRICT, "-Xcompiler",
                          "-Wall,-Wextra,-Werror,-Wno-unknown-pragmas,-fno-strict-aliasing,"
                          + ",".join(UBSAN), "-lubsan", "-o", str(exe), str(src)])
    assert res.returncode == 0, f"building the emulation harness {src.name} failed:\n{res.stderr}"


def require_nvrtc() -> ctypes.CDLL:
    """libnvrtc, the compiler CuPy runs on a GPU host: the nvidia-cuda-nvrtc wheel of the test
    extra, else the system's; skips when there is none. Needs no GPU and no driver."""
    candidates = []
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(Path(base).glob("cu*/lib/libnvrtc.so*"))
    system = ctypes.util.find_library("nvrtc")
    if system:
        candidates.append(system)
    for lib in candidates:
        try:
            return ctypes.CDLL(str(lib))
        except OSError:
            continue
    pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc, part of the test extra)")


def nvrtc_compile(lib: ctypes.CDLL, source: str, name: str, options: list[str]) -> tuple[bool, str]:
    """Compile ``source`` with NVRTC and ``options`` exactly; (success, compiler log)."""
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        status = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        return status == 0, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
