"""The backends behind the pipeline (endor_gds.stream.backends): the Backend contract, views
without copies, and the RAM tier checked once, at load."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import endor_gds
from endor_gds.errors import ChecksumError
from endor_gds.stream.backends import Backend, CpuBackend, CudaBackend, RamImage


def test_both_backends_implement_the_whole_contract():
    assert issubclass(CpuBackend, Backend) and issubclass(CudaBackend, Backend)
    for cls in (CpuBackend, CudaBackend):
        assert not getattr(cls, "__abstractmethods__", set())

    class Partial(Backend):  # a backend lacking calls the pipeline makes cannot be built
        def read(self, plan, s):
            pass

    with pytest.raises(TypeError, match="abstract"):
        Partial()


def test_dense_tensors_are_views_of_the_staging_buffer(packed):
    model = endor_gds.from_pretrained(packed("llama", torch.float16, prune="magnitude"), device="cpu")
    try:
        rt = model.endor
        plan = next(iter(rt.pipeline.plans.values()))
        rt.backend.read(plan, 0)
        rt.backend.decode(plan, 0)
        staging = rt.backend.staging_view(plan, 0)
        lo, hi = staging.ctypes.data, staging.ctypes.data + staging.nbytes
        dense = [s.rel for s in plan.slots if s.arena_offset is None]
        assert dense, "the layer has norms"
        views = rt.backend.tensors(plan, 0)
        for rel in dense:
            assert lo <= views[rel].data_ptr() < hi, rel  # no copy: the parameter is the staged bytes
        assert rt.backend.tensors(plan, 0) is views  # built once per (layer, set)
    finally:
        model.endor.close()


def test_ram_tier_is_checked_once_at_load(packed, tmp_path):
    src = packed("llama", torch.float16, prune="magnitude")
    path = tmp_path / "ram.endor"
    shutil.copyfile(src, path)
    with endor_gds.open(path) as f:
        seg = f.tensors["model.layers.1.mlp.gate_proj.weight"].segments["bitmap"]
    data = bytearray(path.read_bytes())
    data[seg.offset + 7] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="gate_proj.weight:bitmap"):
        endor_gds.from_pretrained(path, device="cpu", tier="ram")  # at load, before any step
    shutil.copyfile(src, path)
    model = endor_gds.from_pretrained(path, device="cpu", tier="ram")
    try:
        assert model.endor.pipeline.check is None  # streaming from RAM is never checked again
        image = model.endor.backend.ram
        assert isinstance(image, RamImage)
        assert image.nbytes == sum(p.length for p in model.endor.pipeline.plans.values())
        assert np.asarray(image.buffer).ctypes.data % 4096 == 0
    finally:
        model.endor.close()
