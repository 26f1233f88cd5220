"""``endor-gds split``: one tensor-parallel file → one file per rank, for per-node (or per-drive) storage.

Rank ``r``'s file holds the resident extent, rank ``r``'s shard of every layer and the embedded
files, segment for segment as they are in the source (each checked against its CRC-32C as it is
read, written with a fresh one); its manifest is the source's, with ``tensor_parallel.ranks =
[r]``, so its fingerprint, and its ``pack_id``, stay those of the pack. Each file is written like a
pack: a temporary file, fsync, rename; an error leaves no file behind.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from endor_gds.container import EndorFile, Writer
from endor_gds.errors import ArgumentError, PackError
from endor_gds.packing.packer import fsync_dir

__all__ = ["split"]


def _copy_extent(src: EndorFile, w: Writer, name: str, entries: dict[str, dict], out: list[dict]) -> None:
    ext = src.extents[name]
    w.begin_extent(ext.name, ext.kind, layer=ext.layer, expert=ext.expert, rank=ext.rank)
    for tname in ext.tensors:
        entry = src.tensors[tname]
        segs = [w.write_segment(s.kind, src.read_segment(s, verify=True, label=f"{tname}:{s.kind}"))
                for s in entry.segments.values()]
        out.append(dict(entries[tname], segments=[s.as_dict() for s in segs]))
    w.end_extent()


def split(src, out_dir=None) -> list[Path]:
    """Write ``<stem>.rank<r>.endor`` for every rank ``src`` holds, into ``out_dir`` (default: beside
    ``src``); returns the paths in rank order."""
    with EndorFile(src, verify_reads=True) as ef:
        spec = ef.tensor_parallel
        if spec is None:
            raise ArgumentError(f"{ef.path} is not a tensor-parallel file (pack it with --tp N): nothing to split")
        folder = Path(out_dir) if out_dir is not None else Path(ef.path).parent
        folder.mkdir(parents=True, exist_ok=True)
        stem = Path(ef.path).name.removesuffix(".endor")
        entries = {t["name"]: t for t in ef.manifest["tensors"]}
        written = []
        for r in spec["ranks"]:
            dst = folder / f"{stem}.rank{r}.endor"
            if dst.resolve() == Path(ef.path).resolve():
                raise PackError(f"split would overwrite its source {dst}")
            tmp = folder / f".{dst.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
            try:
                with open(tmp, "wb") as f:
                    w = Writer(f)
                    tensors: list[dict] = []
                    if ef.resident is not None:
                        _copy_extent(ef, w, "resident", entries, tensors)
                    for ext in ef.layer_extents(r):
                        _copy_extent(ef, w, ext.name, entries, tensors)
                    files = []
                    if ef.files:
                        w.begin_extent("files", "files")
                        for fname, seg in ef.files.items():
                            new = w.write_segment("file", ef.read_segment(seg, verify=True, label=f"file {fname}"))
                            files.append(dict(new.as_dict(), name=fname))
                        w.end_extent()
                    manifest = {k: v for k, v in ef.manifest.items() if k != "extents"}
                    manifest.update(tensors=tensors, files=files, tensor_parallel=dict(spec, ranks=[r]))
                    w.finish(manifest)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, dst)
            except BaseException as exc:
                tmp.unlink(missing_ok=True)
                if isinstance(exc, OSError):
                    raise PackError(f"splitting {ef.path} into {dst} failed: {exc}; nothing was written at "
                                    f"{dst}") from exc
                raise
            written.append(dst)
        fsync_dir(folder)
    return written
