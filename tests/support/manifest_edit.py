"""Packed files with their manifest changed and every checksum made consistent again: what a buggy
or hostile writer produces, for the reader's checks of manifest fields."""

from __future__ import annotations

import json


def manifest_edit(path, edit, tmp_path):
    """A copy of ``path`` with its manifest edited by ``edit(manifest)`` and all CRCs fixed."""
    from endor_gds.fuzz import fuzzlib  # noqa: PLC0415 - the fuzzer's file surgery

    base = fuzzlib.load_base(path)
    m = json.loads(base.manifest_text)
    edit(m)
    out = tmp_path / "edited.endor"
    out.write_bytes(fuzzlib.with_manifest(base, fuzzlib.dump(m)))
    return out
