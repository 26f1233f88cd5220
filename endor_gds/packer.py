"""checkpoint folder → one .endor file, one tensor at a time, atomically.

The packer reads each tensor with ``pread`` (never mapping a whole shard), optionally prunes it,
encodes it (bitmap when that is smaller, dense otherwise), writes its page-aligned segments and
drops it before reading the next, so peak memory stays near the largest tensor, not the model.

Atomicity: everything is written to a temporary file beside the destination, flushed and
``fsync``-ed, then renamed over the destination (``os.replace`` is atomic on POSIX) and the
folder is ``fsync``-ed. On any error or interrupt the temporary file is removed: the destination
is either the old file, untouched, or the new whole file, never a mix; the source is only read.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import Checkpoint
from .errors import EndorError, PackError
from .format import TILE_ELEMS, bits_view, choose_encoding, dtype_of, encode_bitmap
from .layout import FORMAT_VERSION, Writer
from .prune import magnitude_prune
from .recipes import recipe_for

__all__ = ["pack", "PackReport", "PRUNE_METHODS"]

PRUNE_METHODS = ("none", "magnitude", "wanda")


@dataclass
class PackReport:
    dst: str
    seconds: float
    source_bytes: int
    file_bytes: int
    tensors: int
    layers: int

    @property
    def mb_per_s(self) -> float:
        return self.source_bytes / self.seconds / 1e6 if self.seconds else 0.0


def _write_tensor(w: Writer, name: str, t: torch.Tensor, extent: str, sparse_ok: bool) -> dict:
    d = dtype_of(t.dtype)
    bits = bits_view(t)
    nnz = int(np.count_nonzero(bits))
    shape = tuple(int(s) for s in t.shape)
    encoding = choose_encoding(d, shape, nnz) if sparse_ok else "dense"
    if encoding == "bitmap":
        enc = encode_bitmap(bits)
        segments = [w.write_segment(kind, arr) for kind, arr in enc.segments().items()]
    else:
        segments = [w.write_segment("data", bits)]
    return {
        "name": name, "shape": list(shape), "dtype": d.name, "encoding": encoding, "codec": "raw",
        "nnz": nnz, "extent": extent, "segments": [s.as_dict() for s in segments],
    }


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pack(
    src,
    dst,
    *,
    prune: str = "none",
    sparsity: float = 0.5,
    progress: bool = True,
    pruner: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    extra_manifest: dict | None = None,
) -> PackReport:
    """Pack the Hugging Face checkpoint folder ``src`` into the single file ``dst``.

    ``prune``: ``none`` keeps the weights (zeros already present are still bitmap-encoded),
    ``magnitude`` zeroes the ``sparsity`` fraction of lowest-|w| entries of every output row of
    each linear weight named by the model's recipe. Embeddings, norms and lm_head are never pruned.
    """
    t0 = time.perf_counter()
    if prune not in PRUNE_METHODS:
        raise ValueError(f"unknown prune method {prune!r}; choose one of {', '.join(PRUNE_METHODS)}")
    if prune == "wanda" and pruner is None:
        raise ValueError("prune='wanda' needs calibration data: use endor_gds.pack(..., calib=...)")
    if prune != "none" and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    ckpt = Checkpoint(src)
    recipe = recipe_for(ckpt.config)
    plan = recipe.plan(ckpt.names(), ckpt.config)
    dst = Path(dst)
    if dst.is_dir():
        raise PackError(f"destination {dst} is a folder; give a file name such as {dst / 'model.endor'}")
    if any(dst.resolve() == Path(s).resolve() for s in ckpt.shards):
        raise PackError(f"destination {dst} is one of the source checkpoint's files")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"

    if pruner is None and prune == "magnitude":
        def pruner(name, t):
            return magnitude_prune(t, sparsity) if recipe.is_linear_weight(name) else t

    entries: list[dict] = []
    bar = tqdm(total=ckpt.nbytes(), unit="B", unit_scale=True, desc=f"pack {dst.name}",
               disable=not progress)
    try:
        with open(tmp, "wb") as f:
            w = Writer(f)

            def put(name: str, extent: str, in_layer: bool) -> None:
                t = ckpt.read(name)
                bar.update(t.numel() * t.element_size())
                if in_layer and pruner is not None:
                    t = pruner(name, t)
                entries.append(_write_tensor(w, name, t, extent, recipe.is_linear_weight(name)))

            w.begin_extent("resident", "resident")
            for name in plan.resident:
                put(name, "resident", False)
            w.end_extent()
            for i, names in enumerate(plan.layers):
                w.begin_extent(f"layer.{i}", "layer", layer=i)
                for name in names:
                    put(name, f"layer.{i}", True)
                w.end_extent()
            files = []
            blobs = ckpt.tokenizer_files()
            if blobs:
                w.begin_extent("files", "files")
                for fname, data in blobs.items():
                    seg = w.write_segment("file", data)
                    files.append(dict(seg.as_dict(), name=fname))
                w.end_extent()
            manifest = {
                "format": "endor",
                "format_version": FORMAT_VERSION,
                "tile_elems": TILE_ELEMS,
                "checksum": "crc32c",
                "architecture": recipe.family,
                "config": ckpt.config,
                "generation_config": ckpt.generation_config(),
                "tied": plan.tied,
                "prune": {"method": prune, "sparsity": sparsity if prune != "none" else None},
                "created_by": f"endor_gds {__version__}",
                "source": {"folder": Path(src).name, "shards": [Path(s).name for s in ckpt.shards]},
                "tensors": entries,
                "files": files,
            }
            if extra_manifest:
                manifest.update(extra_manifest)
            file_bytes = w.finish(manifest)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    except BaseException as exc:
        bar.close()
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, EndorError):
            raise PackError(
                f"packing {src} into {dst} failed: {exc}. Nothing was written at {dst}; the source "
                f"is untouched"
            ) from exc
        raise
    bar.close()
    return PackReport(str(dst), time.perf_counter() - t0, ckpt.nbytes(), file_bytes,
                      len(entries), plan.num_layers)
