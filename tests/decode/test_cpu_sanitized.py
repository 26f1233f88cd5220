"""The C decoder's own tests again, on a build with the undefined-behaviour sanitizer.

csrc/endor_cpu.c parses file data. The fenced buffers of test_fuzz.py catch an out-of-bounds
access, the comparisons with the reference a wrong value; neither sees undefined behaviour that
happens to work today (a shift by the type's width, signed overflow, a misaligned typed access)
and that another compiler version may turn into a wrong result. Here the library is rebuilt with
``-fsanitize=undefined`` (fatal on the first report) and tests/decode/test_cpu.py (the decoders) and
test_fused.py (the fused product) run on it, every SIMD path included, in a child process that
loads it in place of the installed one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UBSAN = ["-fsanitize=undefined", "-fno-sanitize-recover=all"]

# The child: the sanitized library stands in for endor_gds.decode._endor_cpu (decode.cpu.library() loads
# the module's __file__), checked to be the one loaded, then the decoder tests run on it.
_CHILD = """
import sys, types
lib, tests = sys.argv[1], sys.argv[2:]
sys.modules["endor_gds.decode._endor_cpu"] = types.SimpleNamespace(__file__=lib)
from endor_gds.decode import cpu as cpu_decode
assert cpu_decode.library()._name == lib
import pytest
sys.exit(pytest.main(["-q", "-s", "-p", "no:cacheprovider", *tests]))  # -s: the report reaches stderr
"""


def _libubsan(cc: str) -> str:
    """The sanitizer runtime, preloaded: the interpreter itself is not built with it."""
    path = subprocess.run([cc, "-print-file-name=libubsan.so"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path):  # gcc prints the bare name when it has no such file
        pytest.skip(f"{cc} has no libubsan")
    return path


@pytest.fixture(scope="module")
def sanitized_library(tmp_path_factory):
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    lib = tmp_path_factory.mktemp("ubsan") / "endor_cpu_ubsan.so"
    res = subprocess.run([cc, "-O2", "-g", "-std=c11", "-Wall", "-Wextra", "-Werror", "-fPIC",
                          "-shared", *UBSAN, f"-I{sysconfig.get_paths()['include']}",
                          str(REPO / "csrc" / "endor_cpu.c"), "-o", str(lib), "-lubsan"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"building the sanitized decoder failed:\n{res.stderr}"
    return lib, _libubsan(cc)


def test_decoder_tests_pass_under_ubsan(sanitized_library, tmp_path):
    lib, runtime = sanitized_library
    env = {**os.environ, "LD_PRELOAD": runtime}
    res = subprocess.run([sys.executable, "-c", _CHILD, str(lib), "tests/decode/test_cpu.py",
                          "tests/decode/test_fused.py"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    report = res.stdout[-3000:] + res.stderr[-3000:]
    assert res.returncode == 0, f"decoder tests failed on the sanitized build:\n{report}"
    assert " passed" in res.stdout and "runtime error" not in report, report
