"""The CUDA decode kernel on a GPU, bit-exact against the numpy reference (marker ``gpu``), for
raw values (format v1), the expdict codec (format v2) and the exphuff codec (format v3, dense and
sparse), and v1/v2 files streamed on CUDA.

Every output is poisoned before each launch, twice with different patterns, so an element the
kernel forgets to write fails whatever its expected value (the specials include 0xFFFF).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from bitgen import SIZES
from decode_cases import corrupt_cases, expdict_corrupt_cases, make_expdict_tensor, make_tensor
from exphuff_cases import HuffTensor, deep_code_tensor, exphuff_corrupt_cases, make_exphuff_tensor

from endor_gds.codec.bitmap import TILE_ELEMS, encode_bitmap
from endor_gds.decode.cpu import CpuDecoder
from endor_gds.errors import DecodeError

pytestmark = pytest.mark.gpu

POISONS = (0xA5, 0x5A)  # byte patterns: no element equals both


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


@pytest.fixture(scope="module")
def decoder(cp):
    from endor_gds.decode.gpu import GpuDecoder  # noqa: PLC0415

    return GpuDecoder(0)


def _bits_dtype(eb):
    return np.dtype("<u2") if eb == 2 else np.dtype("<u4")


class Dev:
    """A decode_cases.Tensor or exphuff_cases.HuffTensor on the device, with a poisonable output."""

    def __init__(self, cp, t, out=None):
        self.t = t
        self.out = cp.empty(t.n, dtype=_bits_dtype(t.elem_bytes)) if out is None else out
        if isinstance(t, HuffTensor):
            self.bitmap = None if t.dense else cp.asarray(t.bitmap)
            self.offsets = None if t.dense else cp.asarray(t.offsets)
            self.streams = {"residuals": _bytes(cp, t.residuals), "bits": _bytes(cp, t.bits),
                            "tile_bits": cp.asarray(t.tile_bits), "chunk_bits": cp.asarray(t.chunk_bits)}
            return
        self.bitmap = cp.asarray(t.bitmap)
        self.values = _bytes(cp, t.values)
        self.offsets = cp.asarray(t.offsets)
        if t.expdict is not None:
            self.codes = _bytes(cp, t.codes)
            self.escapes = [cp.asarray(a) if a.size else cp.empty(1, a.dtype) for a in
                            (t.escape_offsets, t.escape_positions, t.escape_values)]

    def item(self):
        from endor_gds.decode.gpu import GpuExpDict, GpuExpHuff, GpuItem  # noqa: PLC0415

        if isinstance(self.t, HuffTensor):  # capacities may hold page padding: nnz given, as backends does
            s = self.streams
            eh = GpuExpHuff(self.t.params, s["bits"].data.ptr, s["bits"].nbytes, s["tile_bits"].data.ptr,
                            s["chunk_bits"].data.ptr)
            return GpuItem(bitmap_ptr=0 if self.t.dense else self.bitmap.data.ptr,
                           values_ptr=s["residuals"].data.ptr, values_capacity=s["residuals"].nbytes,
                           tile_offsets_ptr=0 if self.t.dense else self.offsets.data.ptr,
                           out_ptr=_ptr(self.out), n=self.t.n, nnz=self.t.nnz,
                           elem_bytes=self.t.elem_bytes, label=self.t.label, exphuff=eh)
        expdict = None
        if self.t.expdict is not None:
            expdict = GpuExpDict(self.t.expdict, self.codes.data.ptr, self.codes.nbytes,
                                 *(a.data.ptr for a in self.escapes))
        return GpuItem(bitmap_ptr=self.bitmap.data.ptr, values_ptr=self.values.data.ptr,
                       values_capacity=self.values.nbytes, tile_offsets_ptr=self.offsets.data.ptr,
                       out_ptr=_ptr(self.out), n=self.t.n, nnz=self.t.nnz,
                       elem_bytes=self.t.elem_bytes, label=self.t.label, expdict=expdict)

    def poison(self, byte):
        if isinstance(self.out, torch.Tensor):
            self.out.view(torch.uint8).fill_(byte)
        else:
            self.out.view(np.uint8).fill(byte)

    def host(self):
        if isinstance(self.out, torch.Tensor):
            return self.out.view(torch.uint8).cpu().numpy().view(_bits_dtype(self.t.elem_bytes))
        return self.out.get()


def _bytes(cp, data: bytes):
    return cp.asarray(np.frombuffer(data, np.uint8)) if data else cp.empty(0, cp.uint8)


def _ptr(a):
    return a.data_ptr() if isinstance(a, torch.Tensor) else a.data.ptr


def _decode_poisoned(cp, decoder, devs, stream=None):
    """Decode twice, the outputs poisoned differently before each launch; both must match."""
    table = decoder.make_table([d.item() for d in devs])
    s = stream if stream is not None else cp.cuda.get_current_stream()
    results = []
    for byte in POISONS:
        for d in devs:
            d.poison(byte)
        cp.cuda.runtime.deviceSynchronize()
        decoder.launch(table, s)
        decoder.check(table)
        results.append([d.host() for d in devs])
    return results


@pytest.mark.parametrize("eb", [2, 4])
@pytest.mark.parametrize("n", SIZES + (300_001,))
@pytest.mark.parametrize("density", [0.0, 1.0, 0.5, 0.1, 0.97])
def test_bit_exact_against_reference(cp, decoder, rng, eb, n, density):
    t = make_tensor(rng, n, eb, density, "exact")
    d = Dev(cp, t)
    for outs in _decode_poisoned(cp, decoder, [d]):
        np.testing.assert_array_equal(outs[0], t.reference())


def test_several_tensors_one_launch_mixed_sizes_and_padding(cp, decoder, rng):
    specs = [(5000, 2, "exact"), (33, 4, "page"), (70_001, 2, "exact"), (1, 2, "page"),
             (4097, 4, "exact"), (12289, 4, "page"), (4096, 2, "exact"), (31, 4, "exact")]
    devs = [Dev(cp, make_tensor(rng, n, eb, float(rng.random()), cap, f"t{i}"))
            for i, (n, eb, cap) in enumerate(specs)]
    for outs in _decode_poisoned(cp, decoder, devs):
        for d, out in zip(devs, outs):
            np.testing.assert_array_equal(out, d.t.reference(), err_msg=d.t.label)


@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 8192), (11008, 4096)])
def test_llama_shapes_match_the_cpu_decoder(cp, decoder, rng, shape):
    n = shape[0] * shape[1]
    bits = rng.integers(1, 1 << 16, n, dtype=np.uint16)
    bits[rng.random(n, dtype=np.float32) < 0.5] = 0
    enc = encode_bitmap(bits)
    cpu_out = np.empty(n, np.uint16)
    with CpuDecoder() as cpu:
        cpu.decode([(enc.bitmap, enc.values, enc.tile_offsets, cpu_out)])
    from endor_gds.decode.gpu import GpuItem  # noqa: PLC0415

    b, v, o = cp.asarray(enc.bitmap), cp.asarray(enc.values), cp.asarray(enc.tile_offsets)
    out = cp.full(n, 0xA5A5, dtype=cp.uint16)
    decoder.decode([GpuItem.from_arrays(b, v, o, out, label="w")], stream=cp.cuda.get_current_stream())
    np.testing.assert_array_equal(out.get(), cpu_out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_torch_outputs_consumed_on_torch_streams(cp, decoder, rng, dtype):
    """Outputs are torch tensors; launching on torch's current stream orders the decode before
    torch's own work with no synchronisation; a side stream works with wait_stream."""
    from endor_gds.decode.gpu import GpuItem  # noqa: PLC0415

    eb = torch.empty(0, dtype=dtype).element_size()
    t = make_tensor(rng, 3 * TILE_ELEMS + 77, eb, 0.5, "exact")
    ref = torch.from_numpy(t.reference().view(np.int16 if eb == 2 else np.int32).copy())
    bitmap = torch.from_numpy(t.bitmap.view(np.int32)).cuda()
    values = torch.from_numpy(np.frombuffer(t.values, np.int16 if eb == 2 else np.int32).copy()).cuda()
    offsets = torch.from_numpy(t.offsets.view(np.int32)).cuda()
    values = values.view(dtype)
    out = torch.empty(t.n, dtype=dtype, device="cuda")
    item = GpuItem.from_arrays(bitmap, values, offsets, out, label="w")
    table = decoder.make_table([item])
    int_view = torch.int16 if eb == 2 else torch.int32

    out.view(torch.uint8).fill_(POISONS[0])
    decoder.launch(table, torch.cuda.current_stream())  # a torch.cuda.Stream object
    got = out.view(int_view).cpu()  # torch's stream: ordered after the decode
    decoder.check(table)
    assert torch.equal(got, ref)

    side = torch.cuda.Stream()
    out.view(torch.uint8).fill_(POISONS[1])
    side.wait_stream(torch.cuda.current_stream())  # the poisoning happens before the decode
    decoder.launch(table, side.cuda_stream)  # a raw int handle
    torch.cuda.current_stream().wait_stream(side)
    got = out.view(int_view).cpu()
    decoder.check(table)
    assert torch.equal(got, ref)


def test_cupy_stream_and_no_allocation_per_launch(cp, decoder, rng):
    t = make_tensor(rng, 9000, 2, 0.5, "exact")
    d = Dev(cp, t)
    table = decoder.make_table([d.item()])
    stream = cp.cuda.Stream(non_blocking=True)
    pool = cp.get_default_memory_pool()
    before = pool.used_bytes()
    for _ in range(5):
        decoder.launch(table, stream)
    assert pool.used_bytes() == before  # launch allocates nothing
    decoder.check(table)
    np.testing.assert_array_equal(d.out.get(), t.reference())


@pytest.mark.parametrize("eb", [2, 4])
def test_corrupt_tables_raise_decode_error_naming_tensor_and_tile(cp, decoder, rng, eb):
    from endor_gds.decode.gpu import decode_error_key  # noqa: PLC0415

    for name, (bad, want) in corrupt_cases(rng, eb).items():
        bad.label = f"layers.0.{name}"
        devs = [Dev(cp, make_tensor(rng, 9000, 2, 0.5, "page", "good0")), Dev(cp, bad),
                Dev(cp, make_tensor(rng, 4097, 4, 0.3, "exact", "good2"))]
        table = decoder.make_table([d.item() for d in devs])
        decoder.launch(table, cp.cuda.get_current_stream())
        desc, tile, _ = decode_error_key(want)
        assert desc == 1
        with pytest.raises(DecodeError, match=rf"^{re.escape(bad.label)}: tile {tile} \(elements "):
            decoder.check(table)
        with pytest.raises(DecodeError):
            bad.reference()


def test_error_word_is_reset_by_each_launch(cp, decoder, rng):
    t = make_tensor(rng, 3 * TILE_ELEMS, 2, 0.5, "exact")
    d = Dev(cp, t)
    table = decoder.make_table([d.item()])
    good = d.offsets.copy()
    d.offsets[1] += 1  # corrupt on the device, behind the table's back, as a bad read would
    decoder.launch(table, cp.cuda.get_current_stream())
    with pytest.raises(DecodeError, match="tile 0"):
        decoder.check(table)
    d.offsets[...] = good
    decoder.launch(table, cp.cuda.get_current_stream())
    decoder.check(table)
    np.testing.assert_array_equal(d.out.get(), t.reference())


def test_check_before_launch_is_an_error(cp, decoder, rng):
    d = Dev(cp, make_tensor(rng, 100, 2, 0.5))
    table = decoder.make_table([d.item()])
    with pytest.raises(RuntimeError, match=r"has not been launched; call launch\(\) before check\(\)"):
        decoder.check(table)
    with pytest.raises(TypeError, match="needs an explicit stream"):
        decoder.launch(table, None)
    table.device = decoder.device + 1
    with pytest.raises(ValueError, match=rf"table lives on device {decoder.device + 1}, this "
                                         rf"decoder on {decoder.device}"):
        decoder.launch(table, 0)


def test_from_arrays_checks_sizes(cp, rng):
    from endor_gds.decode.gpu import GpuItem  # noqa: PLC0415

    enc = encode_bitmap(rng.integers(0, 3, 1000, dtype=np.uint16))
    b, v, o = cp.asarray(enc.bitmap), cp.asarray(enc.values), cp.asarray(enc.tile_offsets)
    out = cp.empty(1000, cp.uint16)
    with pytest.raises(ValueError, match="w: bitmap must be 32 uint32 words for n=1000, got 31"):
        GpuItem.from_arrays(b[:-1], v, o, out, label="w")
    with pytest.raises(ValueError, match=r"w: tile_offsets must be 2 uint32 for n=1000"):
        GpuItem.from_arrays(b, v, o[:-1], out, label="w")
    with pytest.raises(ValueError, match="w: values are 4-byte, out is 2-byte"):
        GpuItem.from_arrays(b, v.astype(cp.uint32), o, out, label="w")
    with pytest.raises(ValueError, match="w: out has 8-byte elements"):
        GpuItem.from_arrays(b, v, o, out.astype(cp.uint64), label="w")
    with pytest.raises(ValueError, match="w: out must be C-contiguous"):
        GpuItem.from_arrays(b, v, o, cp.empty(2000, cp.uint16)[::2], label="w")
    item = GpuItem.from_arrays(b, v, o, out, label="w")
    assert (item.n, item.nnz, item.elem_bytes, item.values_capacity) == (1000, enc.nnz, 2, 2 * enc.nnz)


# -- codec expdict (format v2) ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("n", SIZES + (300_001,))
@pytest.mark.parametrize("kind", ["weights", "outliers", "uniform"])
def test_expdict_bit_exact_against_reference(cp, decoder, rng, dtype, n, kind):
    for density, bits in ((0.5, None), (1.0, 1), (0.1, 4)):
        t = make_expdict_tensor(rng, n, dtype, density, "page", kind=kind, index_bits=bits)
        for outs in _decode_poisoned(cp, decoder, [Dev(cp, t)]):
            np.testing.assert_array_equal(outs[0], t.reference())


def test_expdict_and_raw_in_one_launch(cp, decoder, rng):
    tensors = [make_expdict_tensor(rng, 5000, "BF16", 0.5), make_tensor(rng, 33, 4, 0.5, "page"),
               make_expdict_tensor(rng, 70_001, "F16", 0.3, "page"), make_tensor(rng, 4097, 2, 0.7),
               make_expdict_tensor(rng, 12289, "F32", 0.5, kind="weights"),
               make_expdict_tensor(rng, 1, "BF16", 1.0)]
    devs = [Dev(cp, t) for t in tensors]
    for outs in _decode_poisoned(cp, decoder, devs):
        for d, out in zip(devs, outs):
            np.testing.assert_array_equal(out, d.t.reference(), err_msg=d.t.label)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("codec", ["expdict", "exphuff"])
def test_corrupt_codec_tables_raise_decode_error(cp, decoder, rng, codec, dtype):
    """Each corrupted table of a codec, between two good tensors: the bad tile is named, the good
    tensors are decoded all the same."""
    from endor_gds.decode.gpu import decode_error_key  # noqa: PLC0415

    cases = expdict_corrupt_cases if codec == "expdict" else exphuff_corrupt_cases
    for name, (bad, want) in cases(rng, dtype).items():
        bad.label = f"layers.0.{name}"
        good = make_expdict_tensor(rng, 4097, "F32", 0.3, "exact", "good2") if codec == "expdict" else \
            make_exphuff_tensor(rng, 4097, "F32", 1.0, "exact", "good2")
        devs = [Dev(cp, make_tensor(rng, 9000, 2, 0.5, "page", "good0")), Dev(cp, bad), Dev(cp, good)]
        table = decoder.make_table([d.item() for d in devs])
        decoder.launch(table, cp.cuda.get_current_stream())
        _, tile, _ = decode_error_key(want)
        with pytest.raises(DecodeError, match=rf"^{re.escape(bad.label)}: tile {tile} \(elements "):
            decoder.check(table)
        assert int(table.host_error[0]) == want, name
        np.testing.assert_array_equal(devs[0].host(), devs[0].t.reference())
        np.testing.assert_array_equal(devs[2].host(), devs[2].t.reference())


@pytest.mark.parametrize("prune, codec", [("magnitude", "raw"), ("magnitude", "expdict"), ("magnitude", "exphuff"),
                                          ("none", "exphuff")])
def test_files_of_every_version_stream_on_cuda(packed, prune, codec):
    """The CUDA runtime path (backends.CudaBackend, kernel descriptors of every codec; unpruned
    exphuff: no bitmap) streams a file bit-identically to the same model decoded by the reference
    and held on the GPU."""
    from reference import PROMPT, reference_model  # noqa: PLC0415

    import endor_gds  # noqa: PLC0415

    path = packed("llama", torch.bfloat16, prune=prune, codec=codec)
    ref = reference_model(path).to("cuda")
    model = endor_gds.from_pretrained(path, device="cuda")
    try:
        with torch.no_grad():
            assert torch.equal(model(PROMPT.cuda()).logits, ref(PROMPT.cuda()).logits)
    finally:
        model.endor.close()


# -- codec exphuff (format v3) ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("n", SIZES + (300_001,))
def test_exphuff_bit_exact_against_reference(cp, decoder, rng, dtype, n):
    tensors = [make_exphuff_tensor(rng, n, dtype, 1.0, "page"),  # dense: no bitmap
               make_exphuff_tensor(rng, n, dtype, 1.0, dense=False, outliers=True),
               make_exphuff_tensor(rng, n, dtype, 0.5, "page"), make_exphuff_tensor(rng, n, dtype, 0.02)]
    devs = [Dev(cp, t) for t in tensors]
    for outs in _decode_poisoned(cp, decoder, devs):
        for d, out in zip(devs, outs):
            np.testing.assert_array_equal(out, d.t.reference(), err_msg=d.t.label)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_exphuff_twelve_bit_codes(cp, decoder, rng, dtype):
    devs = [Dev(cp, deep_code_tensor(rng, dtype)), Dev(cp, deep_code_tensor(rng, dtype, dense=False))]
    for outs in _decode_poisoned(cp, decoder, devs):
        for d, out in zip(devs, outs):
            np.testing.assert_array_equal(out, d.t.reference())


def test_exphuff_expdict_and_raw_in_one_launch(cp, decoder, rng):
    tensors = [make_exphuff_tensor(rng, 5000, "BF16", 1.0), make_tensor(rng, 33, 4, 0.5, "page"),
               make_expdict_tensor(rng, 70_001, "F16", 0.3, "page"), make_exphuff_tensor(rng, 4097, "F16", 0.5),
               make_exphuff_tensor(rng, 12289, "F32", 1.0, "page"), make_tensor(rng, 4097, 2, 0.7),
               make_exphuff_tensor(rng, 1, "BF16", 1.0)]
    devs = [Dev(cp, t) for t in tensors]
    for outs in _decode_poisoned(cp, decoder, devs):
        for d, out in zip(devs, outs):
            np.testing.assert_array_equal(out, d.t.reference(), err_msg=d.t.label)


