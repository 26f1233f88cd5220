"""defaults: env vars, set() globally and as a restoring block, validation, docs in step with code."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from endor_gds import defaults


def test_get_set_restore():
    before = defaults.get("io_threads")
    with defaults.set("io_threads", before + 3):
        assert defaults.get("io_threads") == before + 3
        with defaults.set(io="posix-buffered", chunk_bytes="1MiB"):
            assert defaults.get("io") == "posix-buffered" and defaults.get("chunk_bytes") == 1 << 20
        assert defaults.get("io") == "auto"
    assert defaults.get("io_threads") == before
    defaults.set({"prefetch_depth": 3})
    try:
        assert defaults.get("prefetch_depth") == 3
    finally:
        defaults.set(prefetch_depth=2)


@pytest.mark.parametrize("name, value, match", [
    ("io", "nvme-magic", "expected one of auto, kvikio"),
    ("chunk_bytes", "1000", "multiple of 4096"),
    ("io_threads", 0, ">= 1"),
    ("verify_reads", "maybe", "boolean"),
])
def test_bad_values_change_nothing(name, value, match):
    before = defaults.get(name)
    with pytest.raises(ValueError, match=match):
        defaults.set({name: value, "io_retries": 9})
    assert defaults.get(name) == before and defaults.get("io_retries") == 3


def test_unknown_option_is_key_error():
    with pytest.raises(KeyError, match="unknown endor_gds option 'threads'"):
        defaults.get("threads")
    with pytest.raises(KeyError):
        defaults.set(threads=2)


def test_environment_variables_are_read_and_checked():
    code = "import endor_gds; print(endor_gds.defaults.get('io_threads'), endor_gds.defaults.get('verify_reads'))"
    env = {"ENDOR_IO_THREADS": "7", "ENDOR_VERIFY_READS": "no", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["7", "False"]
    bad = subprocess.run([sys.executable, "-c", "import endor_gds"], env=dict(env, ENDOR_IO="fast"),
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "ENDOR_IO" in bad.stderr


def test_design_doc_table_matches_code():
    doc = (Path(__file__).parents[1] / "docs" / "design.md").read_text()
    table = re.search(r"<!-- defaults-table -->\n(.*?)<!-- /defaults-table -->", doc, re.S)
    assert table, "docs/design.md lost its defaults table markers"
    assert table.group(1).strip() == defaults.describe().strip(), \
        "docs/design.md's tunables table differs from endor_gds.defaults: paste defaults.describe()"
