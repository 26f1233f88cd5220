"""The backends behind the pipeline (endor_gds.stream.backends): the Backend contract, views
without copies, the RAM tier checked once, at load, and CudaBackend's GPU check of device staging
(with torch.cuda's streams and the GPU check stood in for on the host)."""

from __future__ import annotations

import contextlib
import shutil
import types

import numpy as np
import pytest
import torch

import endor_gds
from endor_gds.errors import ChecksumError
from endor_gds.stream.backends import Backend, CpuBackend, CudaBackend, RamImage
from endor_gds.stream.integrity import ExtentCheck, host_mismatch
from endor_gds.stream.plan import plan_layer


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


# ---------------------------------------------------------------------------------------------
# CudaBackend's checked reads, without a GPU: torch.cuda's streams and events are stand-ins that
# log what is enqueued where, device staging is host memory, and the GPU check is host_crc.HostCrc
# (the real table checks; crc32c through the segments' pointers). The kernels are tested in
# tests/decode/test_crc_emulated.py and test_gpu_crc.py.

class _Stream:
    def __init__(self, name="stream", log=None):
        self.name, self.log = name, log if log is not None else []

    def wait_event(self, event):
        self.log.append((self.name, "waits", event.name))

    def wait_stream(self, other):
        self.log.append((self.name, "waits for", other.name))


class _Event:
    count = 0

    def __init__(self, *args, **kwargs):
        _Event.count += 1
        self.name, self.recorded_on = f"event{_Event.count}", None

    def record(self, stream=None):
        self.recorded_on = stream
        stream.log.append((stream.name, "records", self.name))

    def synchronize(self):
        pass


class _Reader:
    """KvikIO's calls, reading the file into host memory: ``damage`` flips a byte of the next reads."""

    mode, chunked = "kvikio-compat", False

    def __init__(self, path):
        self.f = endor_gds.open(path)
        self.damage: list[int] = []  # extent offsets to flip, one per read

    def read(self, span, dst):
        off, length = span
        data = torch.from_numpy(self.f._pread(off, length).copy())
        if self.damage:
            data[self.damage.pop(0)] ^= 0x40
        dst.copy_(data)


class _Decoder:
    def __init__(self, log):
        self.log = log

    def make_table(self, items):
        return types.SimpleNamespace(items=list(items), launched=False)

    def launch(self, table, stream):
        self.log.append((stream.name, "decodes", len(table.items)))
        table.launched = True

    def check(self, table):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's streams and events logged in one list, the GPU check on the host."""
    from host_crc import HostCrc  # noqa: PLC0415 - tests/support, on the path pytest sets

    from endor_gds.decode import gpu_crc  # noqa: PLC0415

    log = []
    names = iter(["decode", "check", "other"])
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream(next(names), log))
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    current = _Stream("compute", log)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(gpu_crc, "GpuCrc", HostCrc)
    HostCrc.made = []
    return log


def _cuda_backend(packed, log, check=True):
    path = packed("llama", torch.float16, prune="magnitude")
    reader = _Reader(path)
    with endor_gds.open(path) as f:
        plans = [plan_layer(f, ext, f"model.layers.{ext.layer}.") for ext in f.layers]
        resident = plan_layer(f, f.resident, "")
        extent_check = ExtentCheck(str(path), f.opened_stat) if check else None
    backend = CudaBackend(plans, 2, torch.device("cpu"), reader, _Decoder(log), check=extent_check)
    return backend, plans, resident, reader


def test_cuda_checks_device_staging_on_its_check_stream(packed, fake_cuda, monkeypatch):
    """KvikIO staging is checked where it lies: the check launched on the check stream right
    after the read, its event recorded there, the decode stream waiting on it before the decode;
    no byte copied to the host (staging_view is never called); one table per layer and set."""
    from host_crc import HostCrc  # noqa: PLC0415

    log = fake_cuda
    backend, plans, _, _ = _cuda_backend(packed, log)
    assert backend.direct_to_device and backend._check_stream.name == "check"
    monkeypatch.setattr(CudaBackend, "staging_view", lambda *a: pytest.fail("staging copied to the host"))
    plan = plans[1]
    backend.read(plan, 0)
    log.clear()
    assert backend.first_mismatch(plan, 0) is None
    (crc,) = HostCrc.made
    (table,) = crc.tables
    assert crc.launches == [(table, backend._check_stream)]
    assert [sg.ptr - backend._dev_staging[0].data_ptr() for sg in table.segments] == \
        [off for _, _, off, _, _ in plan.segment_crcs]
    assert log == [("check", "records", backend._checked[0].name)]
    backend.decode(plan, 0)
    assert log[1:] == [("decode", "waits", backend._free[0].name), ("decode", "waits", backend._checked[0].name),
                       ("decode", "decodes", sum(s.arena_offset is not None for s in plan.slots)),
                       ("decode", "records", backend._ready[0].name)]
    backend.first_mismatch(plan, 0)
    assert len(crc.tables) == 1 and len(crc.launches) == 2  # the table is reused
    backend.forget(plan, 0)
    backend.first_mismatch(plan, 0)
    assert len(crc.tables) == 2


def test_cuda_device_check_names_the_segment_and_reads_again(packed, fake_cuda):
    """A damaged byte in device staging: the GPU result names the same segment, stored and
    computed CRC as the host check of the same bytes; read again once, it heals (counted); damaged
    twice, the ChecksumError names segment, file offset and both CRCs."""
    backend, plans, _, reader = _cuda_backend(packed, fake_cuda)
    plan, check = plans[2], backend.check
    tensor, kind, off, length, stored = plan.segment_crcs[3]
    reader.damage = [off + length // 2]
    backend.read(plan, 1)
    bad = backend.first_mismatch(plan, 1)
    staged = backend._dev_staging[1][: plan.length].numpy()
    assert bad == host_mismatch(plan, staged) and bad[:5] == (tensor, kind, off, length, stored)
    check.check(plan, lambda: backend.first_mismatch(plan, 1), lambda: backend.reread(plan, 1))
    assert check.rereads == 1 and check.extents_checked == 1
    reader.damage = [off + 1, off + 1]
    backend.read(plan, 1)
    with pytest.raises(ChecksumError, match=rf"extent layer.2, segment {tensor}:{kind} \(file offset "
                                            rf"{plan.offset + off}, {length} bytes\) fails its CRC-32C, also "
                                            rf"when read again from storage: stored 0x{stored:08x}, computed "
                                            r"0x[0-9a-f]{8}\. The file is unchanged since it was opened"):
        check.check(plan, lambda: backend.first_mismatch(plan, 1), lambda: backend.reread(plan, 1))
    assert check.rereads == 2


def test_cuda_load_checks_kvikio_staging_on_the_gpu(packed, fake_cuda):
    """Resident extents read by KvikIO are checked on the GPU too, and the decode that follows
    waits for the check stream."""
    from host_crc import HostCrc  # noqa: PLC0415

    log = fake_cuda
    backend, plans, resident, reader = _cuda_backend(packed, log)
    views, held = backend.load(plans[0], reader)
    assert held > 0 and set(views) == {s.rel for s in plans[0].slots}
    (crc,) = HostCrc.made
    assert len(crc.launches) == 1 and crc.launches[0][1] is backend._check_stream
    assert ("compute", "waits for", "check") in log
    reader.damage = [resident.segment_crcs[0][2], resident.segment_crcs[0][2]]
    with pytest.raises(ChecksumError, match=f"segment {resident.segment_crcs[0][0]}:"):
        backend.load(resident, reader)


def test_cuda_unchecked_reads_build_no_check(packed, fake_cuda):
    """verify_reads=False: no check stream, no checker, no launch, and the decode waits on no check."""
    from host_crc import HostCrc  # noqa: PLC0415

    log = fake_cuda
    backend, plans, _, reader = _cuda_backend(packed, log, check=False)
    assert backend._check_stream is None
    backend.read(plans[0], 0)
    backend.decode(plans[0], 0)
    backend.load(plans[1], reader)
    assert HostCrc.made == [] and ("decode", "waits", backend._checked[0].name) not in log
