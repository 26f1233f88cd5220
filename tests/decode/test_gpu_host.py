"""endor_gds.decode.gpu on a machine without a GPU: import, dtype table, argument checks, errors.

Everything here runs without CuPy; the kernel itself is tested by test_cuda_emulated.py (CPU) and
test_gpu_decode.py (GPU).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from endor_gds.decode import gpu as kernels
from endor_gds.decode.gpu import GpuItem, check_items, pack_descriptors
from endor_gds.errors import DecodeError, MissingDependencyError


def test_import_needs_no_cupy():
    code = ("import sys, endor_gds, endor_gds.decode.gpu as k; k.NVRTC_OPTIONS; "
            "assert 'cupy' not in sys.modules, 'cupy imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_decoder_without_cupy_names_the_package():
    ok, _ = kernels.gpu_available()
    if ok:
        pytest.skip("CuPy and a GPU are present here")
    try:
        import cupy  # noqa: F401, PLC0415
    except ImportError:
        with pytest.raises(MissingDependencyError, match=r"pip install 'endor_gds\[gpu\]' \(cupy-cuda13x\)"):
            kernels.GpuDecoder()
    else:
        pytest.skip("CuPy is installed (no GPU): its error is CuPy's")


@pytest.mark.parametrize("source", ["", "__global__ void other_kernel() {}",
                                    'extern "C" __global__ void endor_decode_bitmap_v2(int x) {}'])
def test_a_kernel_source_must_define_the_kernel(source):
    """Checked before CuPy loads: a wrong file fails the same way on any machine."""
    with pytest.raises(ValueError, match='must define extern "C" __global__ endor_decode_bitmap'):
        kernels.GpuDecoder(0, source=source)


@pytest.mark.parametrize("dtype, size", [("F16", 2), ("BF16", 2), ("F32", 4), (torch.float16, 2),
                                         (torch.bfloat16, 2), (torch.float32, 4)])
def test_elem_bytes(dtype, size):
    assert kernels.elem_bytes(dtype) == size


@pytest.mark.parametrize("dtype", ["F64", "I32", "U8", "BOOL", "float16", torch.int8, torch.float64])
def test_elem_bytes_rejects_other_dtypes_by_name(dtype):
    with pytest.raises(ValueError, match=rf"dtype {dtype!r} cannot be bitmap-decoded on the GPU"):
        kernels.elem_bytes(dtype)


def _item(**kw) -> GpuItem:
    base = dict(bitmap_ptr=0x1000, values_ptr=0x2000, values_capacity=4096, tile_offsets_ptr=0x3000,
                out_ptr=0x4000, n=5000, nnz=2000, elem_bytes=2, label="layer.0.q_proj")
    base.update(kw)
    return GpuItem(**base)


def test_descriptors_pack_in_table_order_with_first_tiles():
    items = [_item(n=1, nnz=1), _item(n=4097, elem_bytes=4, nnz=3, values_capacity=12),
             _item(n=4096 * 3)]
    d = pack_descriptors(items)
    assert d.dtype == kernels.DESC_DTYPE and d.dtype.itemsize == 200
    assert d["first_tile"].tolist() == [0, 1, 3]
    assert d["elem_bytes"].tolist() == [2, 4, 2]
    assert d["n"].tolist() == [1, 4097, 4096 * 3]
    assert d["values_capacity"].tolist() == [4096, 12, 4096]
    assert (d["codec"] == 0).all() and (d["codes"] == 0).all() and (d["exponents"] == 0).all()


def _expdict_item(dtype="BF16", escapes=3, **kw) -> GpuItem:
    from endor_gds.codec.expdict import LAYOUTS, ExpDict  # noqa: PLC0415

    layout = LAYOUTS[dtype]
    exponents = (15, 14, 16, 13) if dtype == "F16" else (120, 121, 119, 122)
    ed = dict(params=ExpDict(layout, 2, exponents, escapes), codes_ptr=0x5000,
              codes_capacity=1250, escape_offsets_ptr=0x6000, escape_positions_ptr=0x7000,
              escape_values_ptr=0x8000)
    ed.update({k: kw.pop(k) for k in list(kw) if k in ed})
    base = dict(values_capacity=2000 * layout.residual_bytes, elem_bytes=layout.itemsize)
    base.update(kw)
    return _item(expdict=kernels.GpuExpDict(**ed), **base)


def test_expdict_descriptors():
    items = [_item(n=1, nnz=1), _expdict_item("F16", n=4097), _expdict_item("F32", escapes=0)]
    d = pack_descriptors(items)
    assert d["codec"].tolist() == [0, 1, 1]
    assert d["first_tile"].tolist() == [0, 1, 3]
    assert d["man_bits"].tolist() == [0, 10, 23] and d["index_bits"].tolist() == [0, 2, 2]
    assert d["exponents"][1].tolist() == [15, 14, 16, 13] + [0] * 12
    assert d["exponents"][2].tolist() == [120, 121, 119, 122] + [0] * 12
    assert d["escapes"].tolist() == [0, 3, 0]
    assert d["codes"].tolist() == [0, 0x5000, 0x5000] and d["codes_capacity"].tolist() == [0, 1250, 1250]
    assert d["escape_values"].tolist() == [0, 0x8000, 0x8000]
    # shared memory: the largest need of the table (kernel's smem_bytes, checked in emulation)
    assert kernels.smem_bytes(items[0]) == 4096 * 2 + 16
    # values, residual window, codes window, field table (2^max field bits entries of elem bytes)
    assert kernels.smem_bytes(items[1]) == 4096 * 2 + 4096 + 16 + 512 * 7 + 32 + 128 * 2  # fp16: 3 high bits
    assert kernels.smem_bytes(items[2]) == 4096 * 4 + 3 * 4096 + 16 + 512 * 4 + 32 + 16 * 4


@pytest.mark.parametrize("change, match", [
    (dict(codes_ptr=0x5008), r"codes_ptr=0x5008 must be 16-byte aligned"),
    (dict(escape_offsets_ptr=0x6002), r"escape_offsets_ptr=0x6002 must be 4-byte aligned"),
    (dict(escape_positions_ptr=0x7001), r"escape_positions_ptr=0x7001 must be 2-byte aligned"),
    (dict(escape_values_ptr=0x8001), r"escape_values_ptr=0x8001 must be 2-byte aligned"),
    (dict(dtype="F32", escape_values_ptr=0x8002), r"escape_values_ptr=0x8002 must be 4-byte aligned"),
    (dict(codes_ptr=0), r"codes_ptr is null"),
    (dict(escape_offsets_ptr=0), r"escape_offsets_ptr is null"),
    (dict(escape_values_ptr=0), r"escape_values_ptr is null"),
    (dict(codes_capacity=499), r"2000 values need 2000 residual and 500 code bytes, got capacities 2000 and 499"),
    (dict(values_capacity=1999), r"2000 values need 2000 residual .* got capacities 1999"),
    (dict(escapes=2001), r"escapes=2001 must be between 0 and nnz=2000"),
    (dict(elem_bytes=4), r"expdict values of BF16 are 2-byte, elem_bytes=4"),
])
def test_every_expdict_argument_check(change, match):
    with pytest.raises(ValueError, match=r"item 1 \(layer.0.q_proj\): " + match):
        check_items([_item(label="ok"), _expdict_item(**change)])


def test_expdict_nulls_allowed_without_escapes_or_codes():
    check_items([_expdict_item(escapes=0, escape_positions_ptr=0, escape_values_ptr=0)])
    check_items([_expdict_item(nnz=0, escapes=0, values_ptr=0, values_capacity=0, codes_ptr=0,
                               codes_capacity=0)])
    with pytest.raises(ValueError, match="distinct"):
        from dataclasses import replace  # noqa: PLC0415

        it = _expdict_item()
        bad = replace(it.expdict, params=replace(it.expdict.params, exponents=(1, 1, 2, 3)))
        check_items([replace(it, expdict=bad)])


@pytest.mark.parametrize("change, match", [
    (dict(elem_bytes=8), r"elem_bytes=8; the kernel decodes 2-byte \(fp16/bf16\) and 4-byte"),
    (dict(elem_bytes=1), r"elem_bytes=1"),
    (dict(n=0), r"n=0 must be between 1 and 4294967295"),
    (dict(n=1 << 32), r"n=4294967296 must be between 1 and 4294967295"),
    (dict(nnz=5001), r"nnz=5001 must be between 0 and n=5000"),
    (dict(nnz=-1), r"nnz=-1 must be between 0"),
    (dict(values_capacity=3999), r"values_capacity=3999 bytes is less than nnz \* elem_bytes = 4000"),
    (dict(bitmap_ptr=0x1002), r"bitmap_ptr=0x1002 must be 4-byte aligned"),
    (dict(tile_offsets_ptr=0x3001), r"tile_offsets_ptr=0x3001 must be 4-byte aligned"),
    (dict(values_ptr=0x2008), r"values_ptr=0x2008 must be 16-byte aligned"),
    (dict(out_ptr=0x4004), r"out_ptr=0x4004 must be 16-byte aligned"),
    (dict(out_ptr=0), r"out_ptr is null"),
    (dict(bitmap_ptr=0), r"bitmap_ptr is null"),
    (dict(values_ptr=0), r"values_ptr is null"),
    (dict(out_ptr=-16), r"out_ptr=-16 is not a device address"),
    (dict(out_ptr=1 << 64), r"out_ptr=18446744073709551616 is not a device address"),
])
def test_every_argument_check(change, match):
    items = [_item(label="ok"), _item(**change)]
    with pytest.raises(ValueError, match=r"item 1 \(layer.0.q_proj\): " + match):
        check_items(items)


def test_null_values_allowed_only_without_values():
    check_items([_item(values_ptr=0, values_capacity=0, nnz=0)])
    with pytest.raises(ValueError, match="values_ptr is null"):
        check_items([_item(values_ptr=0, values_capacity=16, nnz=0)])


def test_table_limits():
    with pytest.raises(ValueError, match="needs at least one tensor"):
        check_items([])
    with pytest.raises(TypeError, match="item 0 must be a GpuItem, got tuple"):
        check_items([(1, 2, 3)])
    big = _item(n=(1 << 32) - 1, nnz=0)  # 2^20 tiles each
    check_items([big] * 2047)
    with pytest.raises(ValueError, match=r"at most 2147483647 tiles \(one block each\), got 2147483648"):
        check_items([big] * 2048)


def test_too_many_descriptors(monkeypatch):
    monkeypatch.setattr(kernels, "_MAX_DESCS", 3)  # the real limit, 2^24, is too many to build
    with pytest.raises(ValueError, match="at most 3 tensors, got 4"):
        check_items([_item()] * 4)


def test_error_word_names_tensor_tile_and_reason():
    items = [_item(label="a"), _item(label="model.layers.3.mlp.up_proj.weight", n=3 * 4096 + 5)]
    msg = kernels.error_message(items, 1 << 40 | 3 << 8 | 2)
    assert msg.startswith("model.layers.3.mlp.up_proj.weight: tile 3 (elements 12288..12292) "
                          "disagrees with its tile offsets or bitmap: bits are set past the "
                          "tensor's last element")
    assert kernels.decode_error_key(1 << 40 | 3 << 8 | 2) == (1, 3, 2)
    for reason in kernels.REASONS:
        assert kernels.REASONS[reason] in kernels.error_message(items, reason)


def test_stream_handles():
    class TorchLike:
        cuda_stream = 1234

    class CupyLike:
        ptr = 5678

    assert kernels.stream_handle(0) == 0
    assert kernels.stream_handle(77) == 77
    assert kernels.stream_handle(TorchLike()) == 1234
    assert kernels.stream_handle(CupyLike()) == 5678
    with pytest.raises(TypeError, match="got a bool"):
        kernels.stream_handle(True)
    with pytest.raises(TypeError, match="got str"):
        kernels.stream_handle("0")


def test_from_arrays_needs_device_memory():
    x = torch.zeros(4, dtype=torch.float16)
    with pytest.raises(ValueError, match="w: out is a CPU tensor"):  # out first: it decides the path
        GpuItem.from_arrays(x, x, x, x, label="w")
    with pytest.raises(TypeError, match="w: bitmap must be a CuPy array or a torch CUDA tensor, got list"):
        GpuItem.from_arrays([1], x, x, FakeDeviceArray(0x4000, (4,), "<u2"), label="w")


def test_items_are_immutable():
    it = _item()
    with pytest.raises(AttributeError):
        it.n = 3  # frozen: a table's items cannot drift from its uploaded descriptors


class FakeDeviceArray:
    """Just a __cuda_array_interface__ (no memory behind it): from_arrays only reads the dict."""

    def __init__(self, ptr, shape, typestr, strides=None, readonly=False):
        self.__cuda_array_interface__ = {"data": (ptr, readonly), "shape": shape,
                                         "typestr": typestr, "strides": strides, "version": 3}


def _fake_arrays(n=1000, eb=2, nnz=400):
    t = "<u2" if eb == 2 else "<u4"
    return (FakeDeviceArray(0x1000, (-(-n // 32),), "<u4"), FakeDeviceArray(0x2000, (nnz,), t),
            FakeDeviceArray(0x3000, (-(-n // 4096) + 1,), "<u4"), FakeDeviceArray(0x4000, (n,), t))


def test_from_arrays_over_the_cuda_array_interface():
    b, v, o, y = _fake_arrays(n=5000, eb=4, nnz=300)
    it = GpuItem.from_arrays(b, v, o, y, label="w")
    assert (it.bitmap_ptr, it.values_ptr, it.tile_offsets_ptr, it.out_ptr) == (0x1000, 0x2000, 0x3000, 0x4000)
    assert (it.n, it.nnz, it.elem_bytes, it.values_capacity) == (5000, 300, 4, 1200)
    check_items([it])
    y2 = FakeDeviceArray(0x4000, (50, 100), "<u4")  # any C-contiguous shape: n is its size
    assert GpuItem.from_arrays(b, v, o, y2, label="w").n == 5000


@pytest.mark.parametrize("which, bad, match", [
    (3, FakeDeviceArray(0x4000, (1000,), "<u2", readonly=True), "w: out is read-only"),
    (3, FakeDeviceArray(0x4000, (1000,), "<u2", strides=(4,)), "w: out must be C-contiguous"),
    (3, FakeDeviceArray(0x4000, (10, 100), "<u2", strides=(2, 20)), "w: out must be C-contiguous"),
    (3, FakeDeviceArray(0x4000, (1000,), "<u8"), "w: out has 8-byte elements"),
    (1, FakeDeviceArray(0x2000, (400,), "<u4"), "w: values are 4-byte, out is 2-byte"),
    (0, FakeDeviceArray(0x1000, (31,), "<u4"), "w: bitmap must be 32 uint32 words for n=1000, got 31"),
    (0, FakeDeviceArray(0x1000, (64,), "<u2"), "w: bitmap must be 32 uint32 words"),
    (2, FakeDeviceArray(0x3000, (3,), "<u4"), "w: tile_offsets must be 2 uint32 for n=1000, got 3"),
])
def test_from_arrays_checks(which, bad, match):
    arrays = list(_fake_arrays())
    arrays[which] = bad
    with pytest.raises(ValueError, match=match):
        GpuItem.from_arrays(*arrays, label="w")


def _fake(a, ptr):
    """A FakeDeviceArray with the shape and dtype of host array ``a`` (pointer 0 when empty, as
    CuPy and torch give for zero-size allocations)."""
    return FakeDeviceArray(ptr if a.size else 0, a.shape, a.dtype.str)


def test_from_arrays_expdict_without_escapes(rng):
    """What bench_decode and the CUDA backend pass for a tensor with no escapes: empty escape
    arrays with null pointers are accepted; arrays padded to one element are not (their sizes
    must match the escape count the parameters declare)."""
    import numpy as np  # noqa: PLC0415
    from decode_cases import encode_expdict, expdict_bits  # noqa: PLC0415

    n = 10_000
    enc, streams = encode_expdict(expdict_bits(rng, n, "BF16", 0.5, kind="weights"), "BF16")
    assert streams.params.escapes == 0
    segs = streams.segments()
    args = (_fake(enc.bitmap, 0x1000), _fake(enc.tile_offsets, 0x3000),
            FakeDeviceArray(0x4000, (n,), "<u2"))
    v = {k: _fake(a, 0x10000 * (i + 1)) for i, (k, a) in enumerate(segs.items())}
    it = GpuItem.from_arrays(args[0], v, args[1], args[2], label="w", expdict=streams.params)
    assert it.expdict.escape_positions_ptr == 0 and it.expdict.escape_values_ptr == 0
    assert it.nnz == int(enc.tile_offsets[-1])
    check_items([it])
    padded = dict(v, escape_positions=FakeDeviceArray(0x90000, (1,), np.dtype("<u2").str))
    with pytest.raises(ValueError, match="escape positions and values 0"):
        GpuItem.from_arrays(args[0], padded, args[1], args[2], label="w", expdict=streams.params)


# -- codec exphuff (format v3) -------------------------------------------------------------------


def _exphuff_params(dtype="BF16", nbits=5000):
    from endor_gds.codec.expdict import LAYOUTS  # noqa: PLC0415
    from endor_gds.codec.exphuff import ExpHuff  # noqa: PLC0415

    layout = LAYOUTS[dtype]
    lengths = [0] * (1 << layout.exp_bits)
    for e, ln in zip((15, 14, 16, 13) if dtype == "F16" else (120, 121, 119, 122), (1, 2, 3, 3)):
        lengths[e] = ln
    return ExpHuff(layout, tuple(lengths), nbits)


def _exphuff_item(dtype="BF16", dense=False, nbits=5000, **kw) -> GpuItem:
    p = _exphuff_params(dtype, nbits)
    eh = dict(params=p, bits_ptr=0x5000, bits_capacity=-(-nbits // 8), tile_bits_ptr=0x6000,
              chunk_bits_ptr=0x7000)
    eh.update({k: kw.pop(k) for k in list(kw) if k in eh})
    base = dict(values_capacity=2000 * p.layout.residual_bytes, elem_bytes=p.layout.itemsize)
    if dense:
        base.update(bitmap_ptr=0, tile_offsets_ptr=0, n=2000)
    base.update(kw)
    return _item(exphuff=kernels.GpuExpHuff(**eh), **base)


def test_exphuff_descriptors():
    items = [_item(n=1, nnz=1), _exphuff_item("F16", n=4097), _exphuff_item("F32", dense=True),
             _expdict_item(), _exphuff_item("BF16", dense=True, n=2000, nbits=3)]
    d = pack_descriptors(items, huff_tables_ptr=0x100000)
    assert d.dtype.itemsize == 200
    assert d["codec"].tolist() == [0, 2, 2, 1, 2]
    assert d["first_tile"].tolist() == [0, 1, 3, 4, 6]
    assert d["bitmap"].tolist() == [0x1000, 0x1000, 0, 0x1000, 0]
    assert d["tile_offsets"].tolist() == [0x3000, 0x3000, 0, 0x3000, 0]
    assert d["man_bits"].tolist() == [0, 10, 23, 7, 7] and d["exp_bits"].tolist() == [0, 5, 8, 0, 8]
    assert d["nbits"].tolist() == [0, 5000, 5000, 0, 3]
    assert d["bits"].tolist() == [0, 0x5000, 0x5000, 0, 0x5000]
    assert d["bits_capacity"].tolist() == [0, 625, 625, 0, 1]
    assert d["tile_bits"].tolist() == [0, 0x6000, 0x6000, 0, 0x6000]
    assert d["chunk_bits"].tolist() == [0, 0x7000, 0x7000, 0, 0x7000]
    # the k-th exphuff item's table: 8 KB each, in table order; the expdict item has none
    assert d["huff_table"].tolist() == [0, 0x100000, 0x102000, 0, 0x104000]
    assert (pack_descriptors(items)["huff_table"] == 0).all()  # host-side look only
    tables = kernels.huff_tables(items)
    assert tables.shape == (3, 4096) and tables.dtype == "<u2"
    # values (the decode table until they are rebuilt), residuals, bits window (longest units of
    # 4096 values + 48), units (8 chunks of 512, 16 apart)
    assert kernels.smem_bytes(items[4]) == 4096 * 2 + 4096 + 16 + 512 * 12 + 48 + 8 * 528 == 22720
    assert kernels.smem_bytes(items[1]) == 4096 * 2 + 4096 + 16 + 512 * 15 + 48 + 8 * 528 == 24256
    assert kernels.smem_bytes(items[2]) == 4096 * 4 + 3 * 4096 + 16 + 512 * 12 + 48 + 8 * 528 == 39104


def test_huff_table_is_the_canonical_code():
    """Every 12-bit window starting with a symbol's canonical code gives (symbol, length); the
    rest of the code space (a code that is not complete) gives length 0."""
    from endor_gds.codec.exphuff import canonical_codes  # noqa: PLC0415

    p = _exphuff_params("BF16")
    table = kernels.huff_table(p)
    codes = canonical_codes(__import__("numpy").asarray(p.lengths))
    for sym, ln in ((120, 1), (121, 2), (119, 3), (122, 3)):
        lo = int(codes[sym]) << (12 - ln)
        assert (table[lo:lo + (1 << (12 - ln))] == sym << 4 | ln).all()
    assert (table != 0).all()  # 1/2 + 1/4 + 1/8 + 1/8: complete
    lengths = list(p.lengths)
    lengths[122] = 0  # the last code (111) dropped: a hole
    from dataclasses import replace  # noqa: PLC0415

    holed = kernels.huff_table(replace(p, lengths=tuple(lengths)))
    assert (holed[0b111 << 9:] == 0).all() and (holed[: 0b111 << 9] != 0).all()
    with pytest.raises(ValueError, match="over-subscribe"):
        lengths[122] = 1
        kernels.huff_table(replace(p, lengths=tuple(lengths)))


@pytest.mark.parametrize("change, match", [
    (dict(bits_ptr=0x5008), r"bits_ptr=0x5008 must be 16-byte aligned"),
    (dict(tile_bits_ptr=0x6002), r"tile_bits_ptr=0x6002 must be 4-byte aligned"),
    (dict(chunk_bits_ptr=0x7001), r"chunk_bits_ptr=0x7001 must be 2-byte aligned"),
    (dict(bits_ptr=0), r"bits_ptr is null"),
    (dict(tile_bits_ptr=0), r"tile_bits_ptr is null"),
    (dict(chunk_bits_ptr=0), r"chunk_bits_ptr is null"),
    (dict(bits_capacity=624), r"2000 values need 2000 residual bytes and the 5000-bit stream 625 "
                              r"bytes, got capacities 2000 and 624"),
    (dict(values_capacity=1999), r"2000 values need 2000 residual bytes .* got capacities 1999"),
    (dict(elem_bytes=4), r"exphuff values of BF16 are 2-byte, elem_bytes=4"),
    (dict(nbits=None), r"the exphuff code is bound to no stream \(nbits is None\)"),
    (dict(bitmap_ptr=0), r"a dense exphuff tensor has neither bitmap_ptr nor tile_offsets_ptr"),
    (dict(tile_offsets_ptr=0), r"a dense exphuff tensor has neither bitmap_ptr nor tile_offsets_ptr"),
    (dict(dense=True, nnz=1999), r"a dense exphuff tensor \(no bitmap\) stores all n=2000 elements, got nnz=1999"),
    (dict(expdict="x"), r"an item has one value codec: expdict or exphuff, not both"),
])
def test_every_exphuff_argument_check(change, match):
    if change.get("nbits", 0) is None:
        from dataclasses import replace  # noqa: PLC0415

        it = _exphuff_item()
        it = replace(it, exphuff=replace(it.exphuff, params=replace(it.exphuff.params, nbits=None)))
    else:
        it = _exphuff_item(**change)
    with pytest.raises(ValueError, match=r"item 1 \(layer.0.q_proj\): " + match):
        check_items([_item(label="ok"), it])


def test_exphuff_code_lengths_are_checked():
    from dataclasses import replace  # noqa: PLC0415

    it = _exphuff_item()
    lengths = list(it.exphuff.params.lengths)
    for bad, match in (([1, 1, 1] + lengths[3:], "over-subscribe"), (lengths[:-1], "lengths must be 256"),
                       ([13] + lengths[1:], r"integers in \[0, 12\]")):
        p = replace(it.exphuff.params, lengths=tuple(bad))
        with pytest.raises(ValueError, match=r"item 0 \(layer.0.q_proj\): .*" + match):
            check_items([replace(it, exphuff=replace(it.exphuff, params=p))])
    with pytest.raises(TypeError, match="exphuff must be a GpuExpHuff, got dict"):
        check_items([replace(it, exphuff={})])
    with pytest.raises(ValueError, match="huff_tables_ptr=0x8 must be a 16-byte aligned"):
        pack_descriptors([it], huff_tables_ptr=8)


def test_exphuff_nulls_allowed_only_where_nothing_is_read():
    check_items([_exphuff_item(dense=True)])  # no bitmap, no tile offsets
    check_items([_exphuff_item(nbits=0, bits_ptr=0, bits_capacity=0, nnz=0, values_ptr=0,
                               values_capacity=0)])
    with pytest.raises(ValueError, match="bitmap_ptr is null"):  # only exphuff may be dense
        check_items([_item(bitmap_ptr=0, tile_offsets_ptr=0)])


def test_error_message_of_bad_bits():
    items = [_exphuff_item(dense=True, label="model.layers.0.mlp.up_proj.weight")]
    msg = kernels.error_message(items, 0 << 40 | 0 << 8 | 5)
    assert msg.startswith("model.layers.0.mlp.up_proj.weight: tile 0 (elements 0..1999) cannot be "
                          "decoded: its exponent codes do not decode")


@pytest.mark.parametrize("dense", [False, True])
def test_from_arrays_exphuff(rng, dense):
    """What bench_decode passes: the four exphuff streams, with bitmap and tile offsets for a
    sparse tensor, None for both for a dense one."""
    from bitgen import weight_bits  # noqa: PLC0415
    from exphuff_cases import huff_tensor  # noqa: PLC0415

    n = 10_000
    t = huff_tensor(rng, weight_bits(rng, n, "F16", 1.0 if dense else 0.5), "F16", dense=dense)
    s = t.streams()
    v = {k: _fake(a, 0x10000 * (i + 1)) for i, (k, a) in enumerate(s.segments().items())}
    out = FakeDeviceArray(0x4000, (n,), "<u2")
    b, o = (None, None) if dense else (_fake(t.bitmap, 0x1000), _fake(t.offsets, 0x3000))
    it = GpuItem.from_arrays(b, v, o, out, label="w", exphuff=s.params)
    assert it.dense == dense and it.nnz == t.nnz and it.exphuff.bits_capacity == s.bits.size
    assert (it.bitmap_ptr, it.tile_offsets_ptr) == ((0, 0) if dense else (0x1000, 0x3000))
    check_items([it])
    with pytest.raises(ValueError, match="w: a dense exphuff tensor has neither bitmap nor tile_offsets"):
        GpuItem.from_arrays(None, v, _fake(t.tile_bits, 0x3000), out, label="w", exphuff=s.params)
    short = dict(v, chunk_bits=FakeDeviceArray(0x90000, (3,), "<u2"))
    with pytest.raises(ValueError, match="w: tile_bits must be 4 entries, chunk_bits 21 for n=10000"):
        GpuItem.from_arrays(b, short, o, out, label="w", exphuff=s.params)
    wrong = dict(v, tile_bits=FakeDeviceArray(0x90000, (4,), "<u2"))
    with pytest.raises(ValueError, match="w: exphuff stream tile_bits must be an array of 4-byte items"):
        GpuItem.from_arrays(b, wrong, o, out, label="w", exphuff=s.params)


def test_a_launch_reports_through_its_error_word(monkeypatch):
    """GpuDecoder's make_table / launch / check on host stand-ins for CuPy (host_cupy) and the
    kernel: the error word reset to all ones before the kernel, one block per tile, the word copied
    to pinned memory after it; check() passes on an untouched word, and names the tensor, tile and
    reason of a word the kernel set (the shared ErrorWordTable path, as GpuCrc's)."""
    from host_cupy import fake_cupy  # noqa: PLC0415 - tests/support

    cp = fake_cupy()
    calls = []

    def kernel(grid, block, args, shared_mem=0):
        descs, count, error = args
        assert int(error[0]) == kernels.NO_ERROR  # reset before the launch
        calls.append((grid, block, int(count), shared_mem))
        if bad is not None:
            error[0] = bad

    monkeypatch.setattr(kernels, "_cupy", lambda: cp)
    monkeypatch.setattr(kernels, "kernel_for", lambda device, source=None: kernel)
    dec = kernels.GpuDecoder(0)
    items = [_item(n=1, nnz=1), _item(n=4096 * 3, label="layer.0.up_proj")]
    table = dec.make_table(items)
    with pytest.raises(RuntimeError, match=r"has not been launched; call launch\(\) before check\(\)"):
        dec.check(table)
    bad = None
    dec.launch(table, 1234)
    dec.check(table)
    assert calls[0][:3] == ((4,), (kernels.THREADS,), 2) and table.launched
    table.error[0] = 7  # what a failed launch left: reset by the next one
    bad = 1 << 40 | 2 << 8 | 5
    dec.launch(table, 1234)
    with pytest.raises(DecodeError, match=r"layer.0.up_proj: tile 2 \(elements 8192..12287\) cannot be decoded"):
        dec.check(table)
