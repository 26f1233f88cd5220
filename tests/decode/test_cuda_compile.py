"""Every cuda/*.cu builds with nvcc for sm_80 and sm_90 with the run-time options, warning-free.

The options are endor_gds.decode.gpu.NVRTC_OPTIONS translated to nvcc (kernels.nvcc_options), so a
kernel that would not compile, or would compile differently, on a GPU host never lands. nvcc and
ptxas warnings are errors, register spills and local memory included. Needs nvcc only, no GPU.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile

import pytest
from nvcc_tools import CUDA_DIR, REPO, STRICT, nvrtc_compile, require_nvcc, require_nvrtc, run_nvcc

from endor_gds._resources import data_dir
from endor_gds.decode import gpu as kernels
from endor_gds.decode import gpu_crc

SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")  # A100, H100/H200


def test_every_kernel_is_among_the_sources():
    """The decoder and the GPU check: both compiled by every test below."""
    assert {kernels.KERNEL_FILE, gpu_crc.KERNEL_FILE} <= {p.name for p in SOURCES}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", SOURCES, ids=[p.name for p in SOURCES])
def test_compiles_without_warnings(src, arch, tmp_path):
    nvcc = require_nvcc()
    res = run_nvcc(nvcc, [f"-arch={arch}", "-cubin", *STRICT, "--resource-usage",
                          "-o", str(tmp_path / f"{src.stem}.cubin"), str(src)])
    log = res.stdout + res.stderr
    assert res.returncode == 0, f"nvcc failed for {src.name} ({arch}):\n{log}"
    assert "warning" not in log.lower(), f"nvcc warned for {src.name} ({arch}):\n{log}"
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", log)
    assert spills and all(s == "0" for s in spills), log


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", SOURCES, ids=[p.name for p in SOURCES])
def test_nvrtc_compiles_with_the_run_time_options(src, arch):
    """NVRTC, with exactly kernels.NVRTC_OPTIONS, is what builds the kernel on a GPU host. It has
    none of the headers nvcc includes implicitly, so a kernel nvcc accepts can still fail there
    (see the next test); this proves it on a machine without a GPU."""
    ok, log = nvrtc_compile(require_nvrtc(), src.read_text(), src.name,
                            [*kernels.NVRTC_OPTIONS, f"--gpu-architecture={arch}"])
    assert ok, f"NVRTC failed for {src.name} ({arch}):\n{log}"
    assert "warning" not in log.lower(), log


def test_nvrtc_refuses_what_nvcc_accepts(tmp_path):
    """The check above can fail: INT_MAX comes from a header nvcc includes and NVRTC does not."""
    lib, nvcc = require_nvrtc(), require_nvcc()
    src = tmp_path / "limits.cu"
    src.write_text('extern "C" __global__ void k(int* p) { p[0] = INT_MAX; }\n')
    built = run_nvcc(nvcc, ["-arch=sm_90", "-cubin", "-o", str(tmp_path / "k.cubin"), str(src)])
    assert built.returncode == 0, built.stderr
    ok, log = nvrtc_compile(lib, src.read_text(), src.name,
                            [*kernels.NVRTC_OPTIONS, "--gpu-architecture=sm_90"])
    assert not ok and 'identifier "INT_MAX" is undefined' in log, log


@pytest.mark.parametrize("src", SOURCES, ids=[p.name for p in SOURCES])
def test_includes_nothing_nvrtc_lacks(src):
    """NVRTC has no system headers: a kernel may include only files of cuda/ itself."""
    for line in src.read_text().splitlines():
        m = re.match(r"\s*#\s*include\s*([<\"])([^>\"]+)", line)
        if m:
            assert m.group(1) == '"' and (CUDA_DIR / m.group(2)).is_file(), line


def test_decode_kernel_keeps_its_memory_access_pattern(tmp_path):
    """The design's coalescing shows in the PTX: 16-byte read-once loads, 16-byte global stores."""
    nvcc = require_nvcc()
    ptx = tmp_path / "decode.ptx"
    res = run_nvcc(nvcc, ["-arch=sm_90", "-ptx", "-o", str(ptx), str(CUDA_DIR / kernels.KERNEL_FILE)])
    assert res.returncode == 0, res.stderr
    text = ptx.read_text()
    assert f".entry {kernels.KERNEL_NAME}(" in text  # extern "C": the name kernels.py looks up
    assert "ld.global.nc.L1::no_allocate.v4.u32" in text
    assert "st.global.v4.u32" in text
    assert "atom.global.min.u64" in text


def test_crc_kernel_keeps_its_memory_access_pattern(tmp_path):
    """The check's design in the PTX: coalesced read-once word loads, its 16 KB of bank-private
    tables, the accumulators' XOR reductions, the verdict's warp butterfly and error word; and in
    ptxas' report, no more than 32 registers (8 blocks of 256 threads per SM)."""
    nvcc = require_nvcc()
    ptx = tmp_path / "crc.ptx"
    src = CUDA_DIR / gpu_crc.KERNEL_FILE
    res = run_nvcc(nvcc, ["-arch=sm_90", "-ptx", "-o", str(ptx), str(src)])
    assert res.returncode == 0, res.stderr
    text = ptx.read_text()
    for name in (gpu_crc.PIECES_KERNEL, gpu_crc.VERDICT_KERNEL):
        assert f".entry {name}(" in text  # extern "C": the names gpu_crc.py looks up
    assert "ld.global.nc.L1::no_allocate.u32" in text
    assert re.search(r"\.shared \.align \d+ \.b8 \S+\[16384\]", text)
    assert re.search(r"(atom|red)\.global\.xor\.b32", text)
    assert "shfl.sync.bfly.b32" in text and "atom.global.min.u64" in text
    res = run_nvcc(nvcc, ["-arch=sm_90", "-cubin", "--resource-usage", "-o", str(tmp_path / "crc.cubin"), str(src)])
    pieces = res.stdout + res.stderr
    pieces = pieces[pieces.index(f"Compiling entry function '{gpu_crc.PIECES_KERNEL}'"):]
    used = re.search(r"Used (\d+) registers, used 1 barriers, 16384 bytes smem", pieces)
    assert used and int(used.group(1)) <= 32, pieces


def test_nvcc_spelling_of_every_nvrtc_option():
    opts = kernels.nvcc_options()
    assert len(opts) == len(kernels.NVRTC_OPTIONS)
    assert "-DENDOR_TILE_ELEMS=4096" in opts
    with pytest.raises(ValueError, match="no nvcc spelling known for NVRTC option '--fmad=false'"):
        kernels.nvcc_options(("--fmad=false",))


def test_kernel_source_is_found_where_the_package_looks():
    for file in (kernels.KERNEL_FILE, gpu_crc.KERNEL_FILE):
        assert data_dir("cuda").joinpath(file).is_file()
        assert 'extern "C" __global__' in kernels.kernel_source(file)


@pytest.mark.slow
def test_wheel_ships_the_kernel_source(tmp_path):
    """An installed wheel has no cuda/ folder: the sources ship as endor_gds/_cuda."""
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path), str(REPO)], capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr
    (wheel,) = tmp_path.glob("endor_gds-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for src in SOURCES:
        assert f"endor_gds/_cuda/{src.name}" in names
