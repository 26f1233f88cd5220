"""Every byte the model computes with is checked, by default (endor_gds.stream.integrity).

The sweep flips single bits all over a packed file — header page, manifest, and every segment
of every extent the model reads — one position at a time, and requires every load + generate to
end in an EndorError: never in tokens computed from damaged bytes, and a flip inside a segment in
a ChecksumError (the check comes before any decode). Tiers ssd and ram and prefetch depths 1 and 2
take turns over the positions (2000 per codec; ENDOR_BITFLIP_POSITIONS=N for a longer campaign; on
a GPU, 24 per codec, and 10 more with KvikIO reading into device memory, checked by the GPU).
"""

from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import endor_gds
from endor_gds import defaults
from endor_gds.errors import ChecksumError, EndorError
from endor_gds.stream import backends, integrity
from endor_gds.stream.integrity import ChunkedCheck, ExtentCheck
from endor_gds.stream.plan import plan_layer

PROMPT = torch.tensor([[1, 5, 9, 13, 2, 7]])
COMBOS = [("ssd", 1), ("ssd", 2), ("ram", 1), ("ram", 2)]
POSITIONS = int(os.environ.get("ENDOR_BITFLIP_POSITIONS", "2000"))


def _generate(path, tier="ssd", depth=2, device="cpu", **kw):
    model = endor_gds.from_pretrained(path, device=device, tier=tier, prefetch_depth=depth, **kw)
    try:
        with torch.no_grad():
            return model.generate(PROMPT.to(device), max_new_tokens=2, do_sample=False, pad_token_id=0).cpu()
    finally:
        model.endor.close()


def _regions(path) -> list[tuple[str, int, int]]:
    """``(kind, start, end)`` of every byte range a load + generate reads: the header page, the
    manifest to the end of the file, and each segment of the resident and layer extents."""
    with endor_gds.open(path) as f:
        regions = [("header", 0, 4096), ("manifest", f._manifest_offset, f.file_size)]
        for entry in f.tensors.values():
            regions += [(kind, s.offset, s.offset + s.length) for kind, s in entry.segments.items()]
    return [r for r in regions if r[2] > r[1]]  # an empty escape table has no bytes to flip


def _flip(path, pos: int, bit: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, pos)[0]
        os.pwrite(fd, bytes([byte ^ (1 << bit)]), pos)
    finally:
        os.close(fd)


def _copy(src, folder, name: str, tensor: str, kind: str):
    """A copy of the packed file ``src`` to damage, and the segment ``tensor:kind`` in it."""
    path = folder / name
    shutil.copyfile(src, path)
    with endor_gds.open(path) as f:
        return path, f.tensors[tensor].segments[kind]


def test_reads_are_checked_by_default():
    assert defaults.get("verify_reads") is True


CODEC_KINDS = {"raw": {"bitmap", "tile_offsets", "values"},
               "expdict": {"bitmap", "tile_offsets", "residuals", "codes", "escape_offsets"},
               # the tiny model's weights come out dense exphuff: no bitmap (test_runtime has both)
               "exphuff": {"residuals", "bits", "tile_bits", "chunk_bits"}}


@pytest.mark.parametrize("codec", sorted(CODEC_KINDS))
def test_single_bit_flips_anywhere_are_named_errors(packed, tmp_path, codec):
    _flip_sweep(packed, tmp_path, codec, "cpu", POSITIONS)


@pytest.mark.gpu
@pytest.mark.parametrize("codec", sorted(CODEC_KINDS))
def test_single_bit_flips_anywhere_are_named_errors_on_cuda(packed, tmp_path, codec):
    """The same sweep on the CUDA path (kernel decode; KvikIO or posix reads): 24 positions, every
    segment kind twice or more, to fit bench/gpu_check.sh's few minutes (ENDOR_GPU_BITFLIP_POSITIONS)."""
    _flip_sweep(packed, tmp_path, codec, "cuda", int(os.environ.get("ENDOR_GPU_BITFLIP_POSITIONS", "24")))


@pytest.mark.gpu
@pytest.mark.parametrize("codec", sorted(CODEC_KINDS))
def test_single_bit_flips_in_kvikio_staging_are_named_errors(packed, tmp_path, codec):
    """The sweep with KvikIO reading straight into device memory (gds, or its compat mode where
    the host has no GDS), tier ssd: every streamed and resident extent is checked by the GPU
    check's kernels (10 positions, ENDOR_GPU_BITFLIP_POSITIONS / 3 + 2: every kind once, within
    bench/gpu_check.sh's few minutes beside the sweep above)."""
    positions = int(os.environ.get("ENDOR_GPU_BITFLIP_POSITIONS", "24")) // 3 + 2
    _flip_sweep(packed, tmp_path, codec, "cuda", positions, combos=[("ssd", 1), ("ssd", 2)], io="kvikio")


def _flip_sweep(packed, tmp_path, codec: str, device: str, positions: int, combos=COMBOS, **kw) -> None:
    """Flip bits all over the file, one position at a time; every load + generate must fail with
    an EndorError, and a flip inside a segment with a ChecksumError (the check runs before any
    decode). ``kw``: more from_pretrained options (``io``)."""
    src = packed("llama", torch.float16, prune="magnitude", codec=codec)
    path = tmp_path / "flipped.endor"
    shutil.copyfile(src, path)
    clean = _generate(path, device=device, **kw)
    regions = _regions(path)
    kinds = sorted({k for k, _, _ in regions})
    assert {"header", "manifest", "data"} | CODEC_KINDS[codec] <= set(kinds)
    rng = np.random.default_rng(20261202)
    escaped, seen = [], set()
    for i in range(positions):
        kind = kinds[i % len(kinds)]  # every kind in turn, so a rare one is not left out
        of_kind = [r for r in regions if r[0] == kind]
        _, start, end = of_kind[rng.integers(len(of_kind))]
        pos, bit = int(rng.integers(start, end)), int(rng.integers(8))
        tier, depth = combos[i % len(combos)]
        _flip(path, pos, bit)
        try:
            out = _generate(path, tier, depth, device, **kw)
            escaped.append((kind, pos, bit, tier, depth, torch.equal(out, clean)))
        except EndorError as exc:
            if kind not in ("header", "manifest") and not isinstance(exc, ChecksumError):
                escaped.append((kind, pos, bit, tier, depth, f"{type(exc).__name__}, not a ChecksumError"))
            seen.add(kind)
        finally:
            _flip(path, pos, bit)  # restored: the next position starts from the good file
    assert escaped == [], f"{len(escaped)} flips ran without an error: {escaped[:10]}"
    assert seen == set(kinds)
    assert torch.equal(_generate(path, device=device, **kw), clean)


def test_a_transient_fault_heals_and_is_counted(packed, monkeypatch):
    """The first read of an extent returns damaged bytes (a bad DMA, say); the read is repeated
    from storage, passes, and the tokens are the clean ones."""
    path = packed("llama", torch.float16, prune="magnitude")
    clean = _generate(path)
    real, state = backends.CpuBackend.read, {"damaged": 0}  # the CPU staging read, damaged once

    def read_once_damaged(self, plan, s, on_chunk=None):
        def arrived(start, stop):  # damaged on the way in: before the piece is reported
            if state["damaged"] == 0 and plan.index == 1 and start <= 100 < stop:
                self._staging[s][100] ^= 0x10
                state["damaged"] += 1
            if on_chunk is not None:
                on_chunk(start, stop)

        real(self, plan, s, arrived)

    monkeypatch.setattr(backends.CpuBackend, "read", read_once_damaged)
    model = endor_gds.from_pretrained(path, device="cpu")
    try:
        with torch.no_grad():
            out = model.generate(PROMPT, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert state["damaged"] == 1 and model.endor.check.rereads == 1
        assert "1 layer(s) read again" in model.endor.summary()["checked_reads"]
    finally:
        model.endor.close()
    assert torch.equal(out, clean)


def test_file_overwritten_while_streaming_is_named(packed, tmp_path):
    src = packed("llama", torch.float16, prune="magnitude", codec="raw")
    path, seg = _copy(src, tmp_path, "live.endor", "model.layers.2.mlp.down_proj.weight", "values")
    model = endor_gds.from_pretrained(path, device="cpu")
    try:
        with torch.no_grad():
            model(PROMPT)
        with open(path, "r+b") as fh:  # another process rewrites part of the file in place
            fh.seek(seg.offset)
            fh.write(os.urandom(64))
        with pytest.raises(ChecksumError, match=r"down_proj.weight:values \(file offset \d+, \d+ bytes\) "
                                                r"fails its CRC-32C.*changed on disk after it was opened"):
            with torch.no_grad():
                model(PROMPT)
        shutil.copyfile(src, path)  # put back: the same model object recovers on the next step
        with torch.no_grad():
            model(PROMPT)
    finally:
        model.endor.close()


def test_opting_out_computes_with_what_was_read(packed, tmp_path):
    """verify_reads=False is the documented opt-out: nothing is checked, nothing is raised."""
    src = packed("llama", torch.float16, prune="magnitude", codec="raw")
    path, seg = _copy(src, tmp_path, "optout.endor", "model.layers.1.self_attn.q_proj.weight", "values")
    _flip(path, seg.offset + 3, 6)
    for tier in ("ssd", "ram"):
        with pytest.raises(ChecksumError, match="q_proj.weight:values"):
            _generate(path, tier)
        _generate(path, tier, verify_reads=False)
    model = endor_gds.from_pretrained(path, device="cpu", verify_reads=False)
    try:
        assert model.endor.summary()["checked_reads"].startswith("off")
    finally:
        model.endor.close()


def _staged(path, pick=lambda layers: layers[1]):
    """One layer extent of ``path`` as the reader stages it (a writable copy), and its plan."""
    with endor_gds.open(path) as f:
        ext = pick(f.layers)
        host = np.frombuffer(f._pread(ext.offset, ext.length).tobytes(), dtype=np.uint8).copy()
        return ext, host, plan_layer(f, ext, f"model.layers.{ext.layer}.")


def test_the_chunked_check_counts_bytes_and_any_order(packed):
    """ChunkedCheck: segments pass only once every byte arrived, in any order of pieces, and a
    damaged piece fails the extent (then the decoder thread checks and reads again)."""
    ext, host, plan = _staged(packed("llama", torch.float16, prune="magnitude"))
    cuts = list(range(0, ext.length, 4096 * 3)) + [ext.length]
    pieces = list(zip(cuts[:-1], cuts[1:]))
    check = ChunkedCheck(plan, host)
    for start, stop in reversed(pieces[1:]):
        check.on_chunk(start, stop)
    assert not check.passed()  # the first piece is still missing
    check.on_chunk(*pieces[0])
    assert check.passed()
    host[200] ^= 1
    damaged = ChunkedCheck(plan, host)
    for piece in pieces:
        damaged.on_chunk(*piece)
    assert not damaged.passed()


@pytest.mark.parametrize("seed", range(6))
def test_the_chunked_check_folds_pieces_of_any_size(packed, monkeypatch, seed):
    """Each piece's share of a segment is checked by the thread that brought it (no CRC call
    spans two pieces) and folded into the segment's CRC: random cut points (odd sizes, several
    pieces per segment, pieces across segment boundaries), random order; one flipped bit anywhere
    in the extent's segments fails it, and the intact extent passes."""
    rng = np.random.default_rng(seed)
    ext, host, plan = _staged(packed("llama", torch.float16, prune="magnitude", codec="expdict"),
                              lambda layers: layers[int(rng.integers(len(layers)))])
    cuts = np.unique(np.concatenate([[0, ext.length], rng.integers(1, ext.length, 40)]))
    pieces = [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]
    piece, spans = [0], []  # the size of the piece being delivered; CRC calls longer than it
    real = integrity._crc32c.crc32c
    monkeypatch.setattr(integrity._crc32c, "crc32c",
                        lambda b, *a: (len(b) > piece[0] and spans.append(len(b))) or real(b, *a))

    def deliver(buf):
        check = ChunkedCheck(plan, buf)
        for i in rng.permutation(len(pieces)):
            piece[0] = pieces[i][1] - pieces[i][0]
            check.on_chunk(*pieces[i])
        return check.passed()

    assert deliver(host)
    assert spans == [], "a CRC call covered more than the piece that had just arrived"
    checked = [(off, length) for _, _, off, length, _ in plan.segment_crcs if length]
    off, length = checked[int(rng.integers(len(checked)))]
    host[off + int(rng.integers(length))] ^= 1 << int(rng.integers(8))
    assert not deliver(host)


def test_streamed_extents_are_checked_as_they_arrive(packed, monkeypatch):
    """With the posix reader the decoder thread checks nothing itself: every extent passed as its
    pieces arrived, each piece checked on a CRC thread, never on the reader thread that read it
    (which goes on to its next read), and the CRC threads end with the model."""
    calls, where = [], set()
    real = backends.host_mismatch
    monkeypatch.setattr(backends, "host_mismatch", lambda plan, host: calls.append(plan) or real(plan, host))
    crc = integrity._crc32c.crc32c
    monkeypatch.setattr(integrity._crc32c, "crc32c",
                        lambda b, *a, **k: where.add(threading.current_thread().name.split("_")[0]) or crc(b, *a, **k))
    model = endor_gds.from_pretrained(packed("llama", torch.float16, prune="magnitude"), device="cpu")
    try:
        where.clear()  # the resident extent's check at load
        with torch.no_grad():
            model.generate(PROMPT, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert model.endor.check.extents_checked > 0 and model.endor.pipeline.backend.chunked_reads()
        layers = model.endor.placement.streamed_layers
        streamed = [p for p in calls if p.index in layers and p.extent != "resident"]
        assert streamed == [], f"{len(streamed)} streamed extents were checked on the decoder thread"
        assert where == {"endor-crc"}, where
    finally:
        model.endor.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("endor-crc")]


def test_the_pieces_are_checked_off_the_reader_thread(packed):
    """``on_chunk`` with a pool returns before the piece is checked (the reader thread is not held:
    here the pool's only thread is blocked until every piece was handed over); ``passed()`` waits
    for the pieces still being checked, and a damaged piece still fails the extent."""
    ext, host, plan = _staged(packed("llama", torch.float16, prune="magnitude"))
    cuts = list(range(0, ext.length, 4096 * 5)) + [ext.length]
    with ThreadPoolExecutor(1) as pool:
        for damage in (None, len(host) // 3):
            buf = host.copy()
            if damage is not None:
                buf[damage] ^= 0x10
            gate = threading.Event()
            pool.submit(gate.wait, 30)
            check = ChunkedCheck(plan, buf, pool)
            for start, stop in zip(cuts[:-1], cuts[1:]):
                check.on_chunk(start, stop)  # returns at once: the pool's thread is held
            assert check._left > 0
            gate.set()
            assert check.passed() is (damage is None)


def test_a_gpu_result_is_named_as_the_host_check_names_it(packed):
    """The GPU check answers with a segment's index and computed CRC; over plan.segment_crcs that
    is the host check's tuple, and ExtentCheck raises the same message from either: one re-read,
    then file, extent, segment, file offset, length, both CRCs and what changed on disk."""
    path = packed("llama", torch.float16, prune="magnitude", codec="raw")
    ext, host, plan = _staged(path, lambda layers: layers[2])
    check = ExtentCheck(str(path), os.stat(path))
    i = len(plan.segment_crcs) // 2
    tensor, kind, off, length, stored = plan.segment_crcs[i]
    host[off + length - 1] ^= 0x80
    bad = integrity.host_mismatch(plan, host)
    assert bad == integrity.device_mismatch(plan, (i, bad[5])) and bad[:5] == plan.segment_crcs[i]
    assert integrity.device_mismatch(plan, None) is None
    finds = []
    with pytest.raises(ChecksumError, match=rf"extent layer.2, segment {tensor}:{kind} \(file offset "
                                            rf"{ext.offset + off}, {length} bytes\) fails its CRC-32C, also "
                                            rf"when read again from storage: stored 0x{stored:08x}, computed "
                                            rf"0x{bad[5]:08x}\. The file is unchanged") as err:
        check.check(plan, lambda: finds.append(1) or integrity.device_mismatch(plan, (i, bad[5])),
                    lambda: finds.append("reread"))
    assert err.value.segment == f"{tensor}:{kind}" and finds == [1, "reread", 1] and check.rereads == 1
    results = iter([(i, bad[5]), None])  # bad, then good after the read from storage
    check.check(plan, lambda: integrity.device_mismatch(plan, next(results)), lambda: None)
    assert check.rereads == 2 and check.extents_checked == 1


@pytest.mark.gpu
def test_kvikio_staging_is_checked_on_the_gpu_without_a_copy_to_the_host(packed, monkeypatch):
    """With KvikIO into device memory, every extent (streamed and resident) is checked by the GPU
    check: none is copied back (staging_view), none is checked on the host, and checks ran."""
    from endor_gds.decode import gpu_crc  # noqa: PLC0415

    host_checked, launches = [], []
    real_launch = gpu_crc.GpuCrc.launch
    monkeypatch.setattr(gpu_crc.GpuCrc, "launch", lambda self, t, s: launches.append(t) or real_launch(self, t, s))
    monkeypatch.setattr(backends, "host_mismatch", lambda plan, host: host_checked.append(plan.extent))
    monkeypatch.setattr(backends.CudaBackend, "staging_view",
                        lambda *a: pytest.fail("device staging was copied to the host"))
    model = endor_gds.from_pretrained(packed("llama", torch.float16, prune="magnitude"), device="cuda",
                                      io="kvikio", prefetch_depth=2)
    try:
        assert model.endor.backend.direct_to_device
        with torch.no_grad():
            model.generate(PROMPT.cuda(), max_new_tokens=2, do_sample=False, pad_token_id=0)
        check = model.endor.check
        assert check.extents_checked > 0 and check.rereads == 0
        assert len(launches) >= check.extents_checked and host_checked == []
    finally:
        model.endor.close()


@pytest.mark.gpu
def test_a_transient_fault_in_device_staging_heals(packed, monkeypatch):
    """A byte of device staging damaged after KvikIO's read of a layer: the GPU check fails it,
    the extent is read again from storage, passes, and the tokens are the clean ones."""
    path = packed("llama", torch.float16, prune="magnitude")
    clean = _generate(path, device="cuda", io="kvikio")
    real, state = backends.CudaBackend.read, {"damaged": 0}

    def read_once_damaged(self, plan, s, on_chunk=None):
        real(self, plan, s, on_chunk)
        if state["damaged"] == 0 and plan.index == 1:
            self._dev_staging[s][plan.length // 2] ^= 0x10
            torch.cuda.synchronize()  # done before the check starts, as KvikIO's read is
            state["damaged"] += 1

    monkeypatch.setattr(backends.CudaBackend, "read", read_once_damaged)
    model = endor_gds.from_pretrained(path, device="cuda", io="kvikio")
    try:
        with torch.no_grad():
            out = model.generate(PROMPT.cuda(), max_new_tokens=2, do_sample=False, pad_token_id=0).cpu()
        assert state["damaged"] == 1 and model.endor.check.rereads == 1
    finally:
        model.endor.close()
    assert torch.equal(out, clean)
