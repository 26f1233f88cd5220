"""The plan of one streamed layer: where each tensor's segments sit in its extent, where it decodes.

A :class:`LayerPlan` is computed once per layer at load and never changes; the pipeline and the
backends only read it. :func:`staging_views` turns a staged extent and its arena into the layer's
tensors (views, no copies).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from endor_gds.container import EndorFile, Extent, TensorEntry
from endor_gds.errors import EndorError

__all__ = ["ARENA_ALIGN", "Slot", "LayerPlan", "LayerTimes", "plan_layer", "staging_views"]

ARENA_ALIGN = 256  # start of every decoded tensor in the arena: CUDA vector stores, AVX loads


@dataclass(frozen=True)
class Slot:
    """One tensor of a streamed layer: where its segments sit inside the extent, where it decodes."""

    rel: str  # name relative to the layer module, e.g. "self_attn.q_proj.weight"
    entry: TensorEntry
    segments: dict[str, int]  # kind -> byte offset relative to the extent's start
    arena_offset: int | None  # tensors decoded: byte offset of the dense output in the arena


@dataclass(frozen=True)
class LayerPlan:
    index: int
    offset: int  # extent
    length: int
    slots: tuple[Slot, ...]
    arena_bytes: int
    extent: str = ""  # its name in the manifest ("layer.3", "resident"), for error messages
    label: str = ""  # how errors name it, where not "layer <index>" (an expert's extent)

    @property
    def where(self) -> str:
        return self.label or f"layer {self.index}"

    @property
    def needs_decode(self) -> bool:
        return any(s.arena_offset is not None for s in self.slots)

    @cached_property
    def segment_crcs(self) -> tuple[tuple[str, str, int, int, int], ...]:
        """``(tensor, kind, offset in extent, length, crc32c)`` of every segment, by offset (laid
        out once: the checked reads walk it for every layer of every token)."""
        return tuple(sorted(((s.entry.name, k, rel, s.entry.segments[k].length, s.entry.segments[k].crc32c)
                             for s in self.slots for k, rel in s.segments.items()), key=lambda seg: seg[2]))


def plan_layer(ef: EndorFile, extent: Extent, prefix: str) -> LayerPlan:
    """Lay out one layer: segment offsets inside its extent, arena offsets of the tensors it
    decodes (bitmap, or entropy-coded)."""
    slots, arena = [], 0
    for name in extent.tensors:
        entry = ef.tensors[name]
        if not name.startswith(prefix):
            raise EndorError(f"tensor {name} in extent {extent.name} is not under {prefix}")
        segs = {k: s.offset - extent.offset for k, s in entry.segments.items()}
        arena_offset = None
        if entry.needs_decode:
            arena_offset = arena
            arena += -(-entry.dense_nbytes // ARENA_ALIGN) * ARENA_ALIGN
        slots.append(Slot(name[len(prefix):], entry, segs, arena_offset))
    return LayerPlan(extent.layer, extent.offset, extent.length, tuple(slots), arena, extent.name)


@dataclass
class LayerTimes:
    """What one streamed layer cost: seconds in each stage, and how long the forward waited."""

    layer: int
    nbytes: int = 0
    read_s: float = 0.0
    decode_s: float = 0.0
    stall_s: float = 0.0
    compute_s: float = 0.0


def staging_views(staging: np.ndarray | torch.Tensor, plan: LayerPlan, arena) -> dict:
    """Typed, shaped views of a layer's tensors over its staging buffer and arena (no copies)."""
    out = {}
    for s in plan.slots:
        e = s.entry
        if s.arena_offset is None:
            off, nbytes, base = s.segments["data"], e.dense_nbytes, staging
        else:
            off, nbytes, base = s.arena_offset, e.dense_nbytes, arena
        out[s.rel] = base[off:off + nbytes].view(e.dtype.torch).view(e.shape)
    return out
