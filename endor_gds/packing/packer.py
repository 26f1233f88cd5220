"""checkpoint folder → one .endor file, one tensor at a time, atomically.

The packer reads each tensor with ``pread`` (never mapping a whole shard), optionally prunes it,
encodes it (per linear weight the smallest of dense, bitmap + raw values and bitmap + expdict
values, or exphuff where clearly smaller: ``policy.choose_storage``; 1-D tensors dense), writes
its page-aligned segments and drops it before reading the next, so peak memory stays near the
largest tensor, not the model.
The file is the lowest format version that holds its codecs: 1 (raw), 2 (expdict), 3 (exphuff).

Atomicity: everything is written to a temporary file beside the destination, flushed and
``fsync``-ed, then renamed over the destination (``os.replace`` is atomic on POSIX) and the
folder is ``fsync``-ed. On any error or interrupt the temporary file is removed: the destination
is either the old file, untouched, or the new whole file, never a mix; the source is only read.

Wanda is the one exception to "one tensor at a time": its scores need the activations entering a
layer, so a *layer pruner* (:class:`LayerPruner`, :mod:`endor_gds.packing.wanda`) receives all of layer
``i``'s tensors at once (a mixture-of-experts layer's expert slices included: an expert's inputs
are known only by running the layer's router), layers in order, and peak memory is one layer plus
the calibration activations. ``none`` and ``magnitude`` still stream tensor by tensor.
"""

from __future__ import annotations

import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from endor_gds._version import __version__
from endor_gds.codec import expdict, exphuff
from endor_gds.codec.bitmap import TILE_ELEMS, bits_view, dtype_of, encode_bitmap
from endor_gds.container import Writer, format_version_for, shard_prefix
from endor_gds.errors import ArgumentError, CalibrationError, PackError, ReadError
from endor_gds.modeling import check_tensors, model_dtype, model_for
from endor_gds.packing.checkpoint import Checkpoint
from endor_gds.packing.policy import CODECS, Storage, choose_storage
from endor_gds.packing.prune import magnitude_prune
from endor_gds.recipes import recipe_for
from endor_gds.shards import shard_plan

__all__ = ["pack", "PackReport", "PRUNE_METHODS", "LayerPruner", "fsync_dir"]

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


class LayerPruner(Protocol):
    """Prunes whole decoder layers, called for layers 0, 1, 2, ... in order.

    ``pruner(i, tensors)`` gets layer ``i``'s checkpoint tensors (full name → tensor; its experts'
    slices too, ``plan.layer_tensors(i)``) and returns a dict with the same names (it may replace
    entries in place); ``summary()`` is merged into the manifest's ``prune`` entry after the last
    layer.
    """

    def __call__(self, index: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def summary(self) -> dict: ...


class _ZeroCount:
    """Zeros already present in the linear weights of a ``prune="none"`` pack."""

    def __init__(self):
        self.zeros = self.numel = self.negative_zeros = 0
        self.per_tensor: list[float] = []

    def add(self, t: torch.Tensor, entry: dict) -> None:
        numel = t.numel()
        # -0.0 is a zero value but not the all-zero bit pattern, so the bitmap keeps it (the
        # round trip is bit-exact); count it apart to tell the user why such zeros cost space.
        # (a dense exphuff tensor stores its zeros too: its nnz counts every element)
        neg, nonzero = 0, entry["nnz"]
        if t.is_floating_point():
            bits = bits_view(t)
            neg = int(np.count_nonzero(bits == bits.dtype.type(1 << (8 * bits.itemsize - 1))))
            nonzero = int(np.count_nonzero(bits))
        zeros = numel - nonzero + neg
        self.zeros += zeros
        self.numel += numel
        self.negative_zeros += neg
        self.per_tensor.append(zeros / numel if numel else 0.0)

    def summary(self) -> dict:
        """``detected_sparsity``: fraction of linear-weight entries equal to zero (±0.0)."""
        if not self.numel:  # no linear weights (a model with no layers)
            return {"detected_sparsity": None}
        return {
            "detected_sparsity": round(self.zeros / self.numel, 6),
            "detected_sparsity_range": [round(min(self.per_tensor), 6), round(max(self.per_tensor), 6)],
            "negative_zeros": self.negative_zeros,
        }


def _one_ahead(pool: ThreadPoolExecutor, prepare, names):
    """``(name, prepare(name))`` in order, the next one prepared on ``pool`` while this one is used.

    Packing is CPU-bound (a TinyLlama-shaped pack: pruning 42 % of the time, bitmap encoding 20 %,
    reading 7 %) and ran on 1.2 of 2 cores one tensor after another; reading and pruning the next
    tensor (torch's top-k releases the GIL) while this one is encoded and written overlaps the two.
    At most two tensors are in memory; the order is unchanged, so the file is byte-identical.
    """
    pending = None
    for name in names:
        job = pool.submit(prepare, name)
        if pending is not None:
            yield pending[0], pending[1].result()
        pending = (name, job)
    if pending is not None:
        yield pending[0], pending[1].result()


def _write_tensor(w: Writer, name: str, t: torch.Tensor, extent: str, linear: bool,
                  codec: str) -> dict:
    """One tensor's segments and manifest entry. A linear weight takes the codec asked for; any
    other matrix (embeddings, lm_head) the smallest lossless storage under ``codec="auto"``
    (dense, or exphuff for unpruned bf16/fp16 weights: they are read once, at load) and dense
    under a forced codec; 1-D tensors stay dense (choose_storage)."""
    d = dtype_of(t.dtype)
    bits = bits_view(t)
    shape = tuple(int(s) for s in t.shape)
    store = choose_storage(d, shape, bits, codec) if linear or codec == "auto" else Storage("dense")
    entry = {"name": name, "shape": list(shape), "dtype": d.name, "encoding": store.encoding,
             "codec": store.codec}
    if store.encoding == "dense" and store.exphuff is None:
        arrays = {"data": bits}
        entry["nnz"] = int(np.count_nonzero(bits))
    elif store.encoding == "dense":  # every element a value, tiles of TILE_ELEMS elements
        arrays = exphuff.encode_values(bits, exphuff.dense_tile_offsets(bits.size), store.exphuff).segments()
        entry["nnz"] = int(bits.size)
    else:
        enc = encode_bitmap(bits)
        arrays = enc.segments()
        if store.expdict is not None:  # the codec's streams replace the raw values
            arrays = {"bitmap": enc.bitmap, "tile_offsets": enc.tile_offsets,
                      **expdict.encode_values(enc.values, enc.tile_offsets, store.expdict).segments()}
        elif store.exphuff is not None:
            arrays = {"bitmap": enc.bitmap, "tile_offsets": enc.tile_offsets,
                      **exphuff.encode_values(enc.values, enc.tile_offsets, store.exphuff).segments()}
        entry["nnz"] = enc.nnz
    if store.params is not None:
        entry[store.codec] = store.params.manifest()
    segments = [w.write_segment(kind, arr) for kind, arr in arrays.items()]
    entry.update(extent=extent, segments=[s.as_dict() for s in segments])
    return entry


def _check_against_config(ckpt: Checkpoint, recipe, plan, src) -> None:
    """The tensors fit the model their config builds, as the reader will check them (shapes; one
    dtype), so that no pack makes a file that ``from_pretrained`` refuses. The model is built on
    ``meta`` (0.17 s for a Llama-2-70B config), before anything is read or written."""
    tensors = {}
    for name in [*plan.resident, *(n for i in range(plan.num_layers) for n in plan.layer_tensors(i))]:
        infos = [ckpt.tensors[s] for s in plan.sources_of(name)]
        shape = infos[0].shape  # a scalar too; several sources stack by rows
        if len(infos) > 1:
            if any(not t.shape or t.shape[1:] != shape[1:] or t.dtype != infos[0].dtype for t in infos):
                raise PackError(f"{src}: {name} is made of {', '.join(t.name for t in infos)}, whose "
                                f"shapes or dtypes do not stack by rows")
            shape = (sum(t.shape[0] for t in infos), *shape[1:])
        tensors[name] = (shape, dtype_of(infos[0].dtype).torch)
    slices = {n: where for n in tensors if (where := recipe.expert_slice(n)) is not None}
    model = model_for(ckpt.config, model_dtype(recipe, ((n, d) for n, (_, d) in tensors.items())),
                      src, recipe.family)
    check_tensors(model, tensors, plan.tied, src, "the checkpoint", slices)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune_entry(prune: str, sparsity: float, layer_pruner, found: _ZeroCount | None) -> dict:
    entry = {"method": prune, "sparsity": sparsity if prune != "none" else None}
    if layer_pruner is not None:
        entry.update(layer_pruner.summary())
    if found is not None:
        entry.update(found.summary())
    return entry


def pack(
    src,
    dst,
    *,
    prune: str = "none",
    sparsity: float = 0.5,
    progress: bool = True,
    calib=None,
    calib_samples: int = 128,
    calib_seqlen: int = 2048,
    calib_device="cpu",
    pruner: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    extra_manifest: dict | None = None,
    codec: str = "auto",
    tp: int | None = None,
) -> PackReport:
    """Pack the Hugging Face checkpoint folder ``src`` into the single file ``dst``.

    ``prune``: ``none`` keeps the weights (zeros already present are still bitmap-encoded, and
    their fraction is recorded as ``detected_sparsity``), ``magnitude`` zeroes the ``sparsity``
    fraction of lowest-|w| entries of every output row of each linear weight named by the model's
    recipe, ``wanda`` the lowest ``|w| * ||X_j||`` ones, with activations from ``calib_samples``
    sequences of ``calib_seqlen`` tokens of the file ``calib`` (text, or token ids in a ``.ids``
    file), computed layer by layer on ``calib_device`` (see :mod:`endor_gds.packing.wanda`; in a
    mixture-of-experts layer each expert by the norms of the tokens routed to it, an expert no
    calibration token reaches by magnitude). Embeddings, norms, biases, routers and lm_head are
    never pruned.

    ``codec``: how the linear weights' values are stored, all lossless. ``auto`` takes per linear
    weight the smallest of dense, bitmap + ``raw`` values (format v1) and bitmap + ``expdict`` values
    (format v2: exponent dictionary), or ``exphuff`` (format v3: Huffman-coded exponents, dense or
    bitmap) where it saves 5 % more; ``raw`` uses neither codec (a version-1 file); ``expdict`` and
    ``exphuff`` use that codec for every linear weight (see ``policy.choose_storage``).

    ``tp``: pack for tensor parallelism over ``tp`` ranks (format v5): each layer becomes one
    extent per rank holding that rank's shard of each tensor (the model's own
    ``base_model_tp_plan``, see :mod:`endor_gds.shards`), each encoded like any linear weight, so a
    rank reads and decodes only its own. Weights are pruned whole, then split: the ranks together
    compute the same pruned model as a file packed without ``tp``.
    """
    t0 = time.perf_counter()
    if prune not in PRUNE_METHODS:
        raise ArgumentError(f"prune must be one of {', '.join(PRUNE_METHODS)}, got {prune!r}")
    if prune == "wanda" and calib is None:
        raise CalibrationError("prune='wanda' needs calibration data: pass calib='file.txt' (or a "
                               ".ids file of token ids); on the command line, --calib FILE")
    if prune != "wanda" and calib is not None:
        raise CalibrationError(f"calib={str(calib)!r} is only used by prune='wanda', not {prune!r}")
    if prune == "wanda" and pruner is not None:
        raise ArgumentError("pruner= is a per-tensor hook; Wanda prunes whole layers from calib=")
    if codec not in CODECS:
        raise ArgumentError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ArgumentError(f"sparsity must be a fraction in [0, 1) (0.5 zeroes half of each row), "
                            f"got {sparsity!r}")
    ckpt = Checkpoint(src)
    generation_config = ckpt.generation_config()  # checked now, not after minutes of packing
    recipe = recipe_for(ckpt.config)
    plan = recipe.plan(ckpt.names(), ckpt.config)
    shards = None
    if tp is not None:
        if plan.experts:
            raise ArgumentError(f"tp={tp}: tensor-parallel packing does not split mixture-of-experts layers "
                                f"yet ({recipe.family}); pack without tp")
        shards = shard_plan(ckpt.config, recipe, tp)
    _check_against_config(ckpt, recipe, plan, src)
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

    layer_pruner: LayerPruner | None = None
    if prune == "wanda":  # reads and checks the calibration file before anything is written
        from endor_gds.packing.wanda import make_pruner  # noqa: PLC0415 - Wanda pulls in calibration and tokenizer code; only --prune wanda needs it

        layer_pruner = make_pruner(ckpt, recipe, plan, calib=calib, samples=calib_samples,
                                   seqlen=calib_seqlen, sparsity=sparsity, device=calib_device,
                                   progress=progress)
    found = _ZeroCount() if prune == "none" else None

    entries: list[dict] = []
    replaced = False
    ahead = ThreadPoolExecutor(1, thread_name_prefix="endor-pack-read")
    bar = tqdm(total=ckpt.nbytes(), unit="B", unit_scale=True, desc=f"pack {dst.name}",
               disable=not progress)
    try:
        with open(tmp, "wb") as f:
            w = Writer(f)

            def read(name: str) -> torch.Tensor:
                """A tensor of the file: a checkpoint tensor, or several stacked by rows (an
                expert's gate and up projections, one slice of the fused gate_up_proj)."""
                parts = [ckpt.read(s) for s in plan.sources_of(name)]
                t = parts[0] if len(parts) == 1 else torch.cat(parts)
                bar.update(t.numel() * t.element_size())
                return t

            def write(name: str, t: torch.Tensor, extent: str, stored: str | None = None) -> None:
                """``stored``: the name in the file, where not the model's (a rank's shard)."""
                linear = recipe.is_linear_weight(name)
                entries.append(_write_tensor(w, stored or name, t, extent, linear, codec))
                if found is not None and linear:
                    found.add(t, entries[-1])

            prepared = _one_ahead(ahead, lambda name: pruner(name, read(name)) if pruner is not None else read(name),
                                  [name for i in range(plan.num_layers) for name in plan.layer_tensors(i)]) \
                if layer_pruner is None else None
            w.begin_extent("resident", "resident")
            for name in plan.resident:
                write(name, read(name), "resident")
            w.end_extent()
            for i, names in enumerate(plan.layers):
                if shards is not None:  # the whole layer (pruned), then each rank's shard of it
                    whole = dict(next(prepared) for _ in names) if prepared is not None else \
                        layer_pruner(i, {name: read(name) for name in names})
                    prefix = f"{recipe.layers}.{i}."
                    for r in range(shards.size):
                        extent = f"layer.{i}.rank.{r}"
                        w.begin_extent(extent, "shard", layer=i, rank=r)
                        for name in names:
                            write(name, shards.take(name[len(prefix):], whole[name], r), extent,
                                  stored=shard_prefix(r) + name)
                        w.end_extent()
                    del whole
                    continue
                extent = f"layer.{i}"
                w.begin_extent(extent, "layer", layer=i)
                if prepared is not None:
                    for _ in names:  # the layers' tensors, in order: two in memory at most
                        write(*next(prepared), extent)
                else:  # the whole layer, its experts included, pruned at once
                    out = layer_pruner(i, {name: read(name) for name in plan.layer_tensors(i)})
                    for name in names:
                        write(name, out.pop(name), extent)  # pop: each is freed once written
                w.end_extent()
                # a mixture-of-experts layer: each expert an extent of its own, right after its layer
                for e, expert_names in enumerate(plan.experts.get(i, [])):
                    w.begin_extent(f"{extent}.expert.{e}", "expert", layer=i, expert=e)
                    for name in expert_names:
                        write(*(next(prepared) if prepared is not None else (name, out.pop(name))),
                              f"{extent}.expert.{e}")
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
                "format_version": format_version_for((e["codec"] for e in entries), experts=bool(plan.experts),
                                                     shards=shards is not None),
                "tile_elems": TILE_ELEMS,
                "checksum": "crc32c",
                "architecture": recipe.family,
                "config": ckpt.config,
                "generation_config": generation_config,
                "tied": plan.tied,
                "prune": _prune_entry(prune, sparsity, layer_pruner, found),
                "created_by": f"endor_gds {__version__}",
                "source": {"folder": Path(src).name, "shards": [Path(s).name for s in ckpt.shards]},
                "tensors": entries,
                "files": files,
            }
            if shards is not None:  # pack_id: the ranks' files of one pack recognise each other
                manifest["tensor_parallel"] = dict(shards.manifest(), ranks=list(range(shards.size)),
                                                   pack_id=secrets.token_hex(8))
            if extra_manifest:
                manifest.update(extra_manifest)
            file_bytes = w.finish(manifest)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        replaced = True
        fsync_dir(dst.parent)
    except BaseException as exc:
        ahead.shutdown(wait=True, cancel_futures=True)  # nothing reads the source after we return
        bar.close()
        if replaced:  # the whole new file is in place; only the folder's sync failed
            if isinstance(exc, OSError):
                raise PackError(
                    f"{dst} was written whole, but syncing its folder failed ({exc}): after a power "
                    f"loss the old file may reappear; check with `endor-gds verify {dst}`") from exc
            raise
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        # Disk errors on either side (writing dst, or reading the source after retries) say the
        # same thing: this pack failed and left nothing behind.
        if isinstance(exc, (OSError, ReadError)):
            raise PackError(
                f"packing {src} into {dst} failed: {exc}. Nothing was written at {dst}; the source "
                f"is untouched"
            ) from exc
        raise
    ahead.shutdown(wait=True)
    bar.close()
    return PackReport(str(dst), time.perf_counter() - t0, ckpt.nbytes(), file_bytes,
                      len(entries), plan.num_layers)
