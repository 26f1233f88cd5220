"""The CUDA decode kernel's own code, run on the CPU (no GPU needed), against the numpy reference.

tests/support/endor_decode_emulate.cu includes cuda/endor_decode.cu and runs its per-thread functions for
every thread of every block in the kernel's phase order; the harness allocates every buffer the
kernel touches on its own, with guard pages and canaries, and the same inputs also run under
valgrind; it is built with the undefined-behaviour sanitizer (nvcc_tools.UBSAN). Descriptors are built
by endor_gds.decode.gpu.pack_descriptors, as on a GPU. Raw values (format v1), the expdict codec
(format v2) and the exphuff codec (format v3, dense and sparse) are covered, alone and mixed in one
launch.
"""

from __future__ import annotations

import shutil
import struct
import subprocess

import numpy as np
import pytest
from bitgen import SIZES
from decode_cases import (
    COUNT_MISMATCH,
    Tensor,
    corrupt_cases,
    expdict_corrupt_cases,
    key,
    make_expdict_tensor,
    make_tensor,
)
from exphuff_cases import (
    HuffTensor,
    deep_code_tensor,
    exphuff_corrupt_cases,
    make_exphuff_tensor,
)
from nvcc_tools import REPO, build_emulator, require_nvcc

from endor_gds.codec.bitmap import TILE_ELEMS
from endor_gds.decode import gpu as kernels
from endor_gds.errors import DecodeError

NO_ERROR = kernels.NO_ERROR


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    exe = tmp_path_factory.mktemp("emulate") / "endor_decode_emulate"
    build_emulator(require_nvcc(), REPO / "tests" / "support" / "endor_decode_emulate.cu", exe)
    return exe


def gpu_item(t: Tensor | HuffTensor, k: int) -> kernels.GpuItem:
    """A GpuItem for ``t`` at fake, aligned device addresses (the harness substitutes its own)."""
    base = 0x1000000 * (k + 1)
    if isinstance(t, HuffTensor):
        eh = kernels.GpuExpHuff(t.params, base + 0x500000, len(t.bits), base + 0x600000, base + 0x700000)
        sparse = 0 if t.dense else 1
        return kernels.GpuItem(bitmap_ptr=sparse * (base + 0x100000), values_ptr=base + 0x200000,
                               values_capacity=len(t.residuals), tile_offsets_ptr=sparse * (base + 0x300000),
                               out_ptr=base + 0x400000, n=t.n, nnz=t.nnz, elem_bytes=t.elem_bytes,
                               label=t.label, exphuff=eh)
    expdict = None
    if t.expdict is not None:
        expdict = kernels.GpuExpDict(t.expdict, base + 0x500000, len(t.codes), base + 0x600000,
                                     base + 0x700000, base + 0x800000)
    return kernels.GpuItem(bitmap_ptr=base + 0x100000, values_ptr=base + 0x200000,
                           values_capacity=len(t.values), tile_offsets_ptr=base + 0x300000,
                           out_ptr=base + 0x400000, n=t.n, nnz=t.nnz, elem_bytes=t.elem_bytes,
                           label=t.label, expdict=expdict)


def _input_bytes(tables: list[list[Tensor]]) -> bytes:
    parts = [b"EMU2", struct.pack("<I", len(tables))]
    for table in tables:
        items = [gpu_item(t, k) for k, t in enumerate(table)]
        parts += [struct.pack("<I", len(table)), kernels.pack_descriptors(items).tobytes()]
        tables_16 = kernels.huff_tables(items)  # the decode tables make_table uploads
        for t in table:
            if isinstance(t, HuffTensor):
                if not t.dense:
                    parts.append(t.bitmap.astype("<u4").tobytes())
                parts.append(t.residuals)
                if not t.dense:
                    parts.append(t.offsets.astype("<u4").tobytes())
                parts += [t.bits, t.tile_bits.astype("<u4").tobytes(), t.chunk_bits.astype("<u2").tobytes(),
                          tables_16[0].tobytes()]
                tables_16 = tables_16[1:]
                continue
            parts += [t.bitmap.astype("<u4").tobytes(), t.values, t.offsets.astype("<u4").tobytes()]
            if t.expdict is not None:
                parts += [t.codes, t.escape_offsets.astype("<u4").tobytes(),
                          t.escape_positions.astype("<u2").tobytes(),
                          t.escape_values.astype("<u2" if t.elem_bytes == 2 else "<u4").tobytes()]
    return b"".join(parts)


def emulate(exe, tables: list[list[Tensor]], tmp_path, *, valgrind: bool = False):
    """Run the harness; per table ``(error word, [output bit patterns per tensor])``."""
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(_input_bytes(tables))
    cmd = [str(exe), "run", str(src), str(dst)]
    if valgrind:
        # partial-loads-ok=no: a 16-byte load reaching past a block is an error even if aligned
        cmd = ["valgrind", "--error-exitcode=99", "--quiet", "--partial-loads-ok=no", *cmd, "--malloc"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, f"harness failed (rc={res.returncode}):\n{res.stderr[-4000:]}"
    raw = dst.read_bytes()
    pos, results = 0, []
    for table in tables:
        (error,) = struct.unpack_from("<Q", raw, pos)
        pos += 8
        outs = []
        for t in table:
            dt = np.dtype("<u2") if t.elem_bytes == 2 else np.dtype("<u4")
            outs.append(np.frombuffer(raw, dtype=dt, count=t.n, offset=pos))
            pos += t.n * t.elem_bytes
        results.append((error, outs))
    assert pos == len(raw)
    return results


# ---------------------------------------------------------------------------------------------

def test_descriptor_layout_matches_kernels_py(harness):
    out = subprocess.run([str(harness), "layout"], capture_output=True, text=True, check=True).stdout
    got = dict(line.split() for line in out.splitlines())
    assert int(got["sizeof"]) == kernels.DESC_DTYPE.itemsize
    for name in kernels.DESC_DTYPE.names:
        assert int(got[name]) == kernels.DESC_DTYPE.fields[name][1], name
    assert int(got["stage_bytes_2"]) == kernels.stage_bytes(2)
    assert int(got["stage_bytes_4"]) == kernels.stage_bytes(4)
    assert int(got["threads"]) == kernels.THREADS
    from endor_gds.codec.expdict import LAYOUTS, ExpDict  # noqa: PLC0415

    for eb in (2, 4):  # raw
        item = kernels.GpuItem(16, 16, 0, 16, 16, 1, 0, eb)
        assert int(got[f"smem_0_{eb}_0"]) == kernels.smem_bytes(item)
    for layout in LAYOUTS.values():
        p = ExpDict(layout, 1, (0, 1), 0)
        item = kernels.GpuItem(16, 16, 0, 16, 16, 1, 0, layout.itemsize,
                               expdict=kernels.GpuExpDict(p, 16, 0, 16, 0, 0))
        assert int(got[f"smem_1_{layout.itemsize}_{layout.man_bits}"]) == kernels.smem_bytes(item)
        from endor_gds.codec.exphuff import ExpHuff  # noqa: PLC0415

        h = ExpHuff(layout, (1, 1) + (0,) * ((1 << layout.exp_bits) - 2), 1)
        item = kernels.GpuItem(0, 16, 0, 0, 16, 1, 1, layout.itemsize,
                               exphuff=kernels.GpuExpHuff(h, 16, 1, 16, 16))
        assert int(got[f"smem_2_{layout.itemsize}_{layout.man_bits}"]) == kernels.smem_bytes(item)


def _valid_tables(rng) -> list[list[Tensor]]:
    """Every size of bitgen.SIZES at densities 0, 1, 0.5 and random, both element sizes, exact and
    page-padded value segments; several tensors per table, single-tensor tables, mixed sizes."""
    tables = []
    for eb in (2, 4):
        table = []
        for i, n in enumerate(SIZES):
            for density in (0.0, 1.0, 0.5, float(rng.random())):
                cap = "exact" if (i + len(table)) % 2 else "page"
                table.append(make_tensor(rng, n, eb, density, cap, f"eb{eb}-n{n}-d{density:.2f}"))
        tables.append(table)
        tables += [[make_tensor(rng, n, eb, float(rng.random()), "exact")] for n in (1, 33, 4097)]
    mixed = [make_tensor(rng, n, eb, float(rng.random()), cap)
             for n, eb, cap in [(5000, 2, "exact"), (33, 4, "page"), (70_001, 2, "exact"),
                                (1, 2, "page"), (4097, 4, "exact"), (12289, 4, "exact")]]
    tables.append(mixed)
    return tables + _expdict_tables(rng) + _exphuff_tables(rng)


def _expdict_tables(rng) -> list[list[Tensor]]:
    """Codec expdict: every dtype, every size of bitgen.SIZES, densities 1, 0.5 and random, weights
    with outliers (escapes in most tiles), uniform bit patterns (escapes everywhere) and every
    index width; then one launch mixing expdict and raw tensors of all element sizes."""
    tables = []
    for dtype in ("BF16", "F16", "F32"):
        table = []
        for i, n in enumerate(SIZES):
            for density in (1.0, 0.5, float(rng.random())):
                cap = "exact" if (i + len(table)) % 2 else "page"
                kind = "uniform" if len(table) % 5 == 4 else "outliers"
                table.append(make_expdict_tensor(rng, n, dtype, density, cap,
                                                 f"{dtype}-n{n}-d{density:.2f}-{kind}", kind=kind,
                                                 index_bits=1 + len(table) % 4))
        tables.append(table)
    mixed = [make_expdict_tensor(rng, 5000, "BF16", 0.5), make_tensor(rng, 33, 4, 0.5, "page"),
             make_expdict_tensor(rng, 70_001, "F16", 0.3, "page"), make_tensor(rng, 4097, 2, 0.7),
             make_expdict_tensor(rng, 12289, "F32", 0.5, kind="weights"),
             make_expdict_tensor(rng, 1, "BF16", 1.0)]
    tables.append(mixed)
    return tables


def _exphuff_tables(rng) -> list[list]:
    """Codec exphuff: every dtype; dense tensors (no bitmap) of every size of bitgen.SIZES and
    sparse ones at densities 1, 0.5 and 0.02, exact and page-padded segments; codes of up to 12
    bits, dense and sparse; weights with outliers (specials: NaN, inf, -0.0, subnormals); then one
    launch mixing raw, expdict and exphuff tensors of all element sizes."""
    tables = []
    for dtype in ("BF16", "F16", "F32"):
        table = []
        for i, n in enumerate(SIZES):
            cap = ("exact", "page")[i % 2]
            table.append(make_exphuff_tensor(rng, n, dtype, 1.0, cap, f"{dtype}-n{n}-dense"))
            for density in (1.0, 0.5, 0.02):
                table.append(make_exphuff_tensor(rng, n, dtype, density, cap, f"{dtype}-n{n}-d{density}",
                                                 dense=False, outliers=i % 3 == 0))
        table += [deep_code_tensor(rng, dtype), deep_code_tensor(rng, dtype, dense=False, capacity="page"),
                  make_exphuff_tensor(rng, 70_001, dtype, 0.5, "page", f"{dtype}-70001", outliers=True)]
        tables.append(table)
        tables.append([make_exphuff_tensor(rng, 1, dtype, 1.0)])  # one element, one tile, alone
    mixed = [make_exphuff_tensor(rng, 5000, "BF16", 1.0), make_tensor(rng, 33, 4, 0.5, "page"),
             make_expdict_tensor(rng, 70_001, "F16", 0.3, "page"), make_exphuff_tensor(rng, 4097, "F16", 0.5),
             make_exphuff_tensor(rng, 12289, "F32", 1.0, "page"), make_tensor(rng, 4097, 2, 0.7),
             make_expdict_tensor(rng, 12289, "F32", 0.5, kind="weights"),
             make_exphuff_tensor(rng, 8191, "F32", 0.02), make_exphuff_tensor(rng, 1, "BF16", 1.0)]
    tables.append(mixed)
    return tables


def test_exphuff_decodes_exactly_as_the_cpu_decoder(rng):
    """The inputs the kernel is compared on are the ones the C decoder accepts too (the same
    reference, seen from the other decoder)."""
    from endor_gds.decode.cpu import CpuDecoder  # noqa: PLC0415

    cpu = CpuDecoder(1)
    try:
        for t in [make_exphuff_tensor(rng, 12289, "F16", 1.0), deep_code_tensor(rng, "BF16", dense=False)]:
            out = np.empty(t.n, LAYOUTS_BITS[t.elem_bytes])
            cpu.decode([(t.bitmap, t.streams(), t.offsets, out)])
            np.testing.assert_array_equal(out, t.reference())
    finally:
        cpu.close()


LAYOUTS_BITS = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def _check_valid(tables, results):
    for table, (error, outs) in zip(tables, results):
        assert error == NO_ERROR
        for t, out in zip(table, outs):
            np.testing.assert_array_equal(out, t.reference(), err_msg=t.label)


def test_bit_exact_against_reference(harness, rng, tmp_path):
    tables = _valid_tables(rng)
    _check_valid(tables, emulate(harness, tables, tmp_path))


def _corrupt_tables(rng):
    tables, expected = [], []
    cases = [(f"eb{eb} {name}", case) for eb in (2, 4) for name, case in corrupt_cases(rng, eb).items()]
    cases += [(f"{dtype} {name}", case) for dtype in ("BF16", "F16", "F32")
              for name, case in expdict_corrupt_cases(rng, dtype).items()]
    cases += [(f"{dtype} exphuff {name}", case) for dtype in ("BF16", "F16", "F32")
              for name, case in exphuff_corrupt_cases(rng, dtype).items()]
    for name, (bad, want) in cases:
        # desc 0, 2 and 3 are good (raw, expdict, exphuff): the error must name desc 1
        tables.append([make_tensor(rng, 9000, 2, 0.5, "page", "good0"), bad,
                       make_expdict_tensor(rng, 4097, "F32", 0.3, "exact", "good2"),
                       make_exphuff_tensor(rng, 5000, "F16", 1.0, "page", "good3")])
        expected.append((name, want))
    return tables, expected


def test_corrupt_input_sets_error_word_without_overrun(harness, rng, tmp_path):
    tables, expected = _corrupt_tables(rng)
    for table, (error, outs), (name, want) in zip(tables, emulate(harness, tables, tmp_path), expected):
        assert error == want, f"{name}: got {kernels.decode_error_key(error)}, " \
                              f"want {kernels.decode_error_key(want)}"
        with pytest.raises(DecodeError):  # the reference rejects the same input
            table[1].reference()
        # the good tensors of the same launch decode correctly all the same
        np.testing.assert_array_equal(outs[0], table[0].reference())
        np.testing.assert_array_equal(outs[2], table[2].reference())
        np.testing.assert_array_equal(outs[3], table[3].reference())


def test_first_bad_tile_in_table_order_is_reported(harness, rng, tmp_path):
    good = [make_tensor(rng, 10_000, 2, 0.5) for _ in range(4)]
    bad1, bad3 = make_tensor(rng, 10_000, 4, 0.5), make_tensor(rng, 10_000, 2, 0.5)
    bad1.bitmap[70] ^= 1  # tile 0 of desc 1
    bad1.bitmap[130] ^= 1  # tile 1 of desc 1
    bad3.offsets[1] += 1  # tiles 0 and 1 of desc 3
    (error, _), = emulate(harness, [[good[0], bad1, good[1], bad3, good[2]]], tmp_path)
    assert error == key(1, 0, COUNT_MISMATCH)
    msg = kernels.error_message([kernels.GpuItem(16, 16, 0, 16, 16, t.n, t.nnz, 2, f"L{i}")
                                 for i, t in enumerate([good[0], bad1])], error)
    assert msg.startswith("L1: tile 0 (elements 0..4095) disagrees with its tile offsets or bitmap")


def test_random_corruptions_rejected_exactly_when_the_reference_rejects(harness, rng, tmp_path):
    """Fuzz: random bit flips, offset rewrites and nnz changes. The kernel must accept exactly what
    the reference accepts, produce its output when it does, and never touch memory it should not
    (guard pages and canaries in the harness)."""
    tables = []
    for i in range(120):
        eb = (2, 4)[i % 2]
        n = int(rng.choice([1, 33, 4096, 4097, 3 * TILE_ELEMS + 5]))
        t = make_tensor(rng, n, eb, float(rng.choice([0.0, 1.0, rng.random()])),
                        ("exact", "page")[i % 3 == 0])
        for _ in range(int(rng.integers(1, 3))):
            what = int(rng.integers(0, 4))
            if what == 0:
                w = int(rng.integers(0, t.bitmap.size))
                t.bitmap[w] ^= np.uint32(1 << int(rng.integers(0, 32)))
            elif what == 1:
                j = int(rng.integers(0, t.offsets.size))
                if rng.random() < 0.7:  # off by a little: count mismatches, first/last entries
                    t.offsets[j] = (int(t.offsets[j]) + int(rng.integers(-3, 4))) % (1 << 32)
                else:  # anywhere in uint32: far out of bounds
                    t.offsets[j] = int(rng.integers(0, 1 << 32))
            elif what == 2 and t.nnz:  # fewer values declared than the table uses
                t.nnz = int(rng.integers(0, t.nnz))
                t.values = t.values[: t.nnz * eb]
            elif what == 2 and t.nnz < t.n:  # more values declared (and present) than used
                extra = int(rng.integers(1, min(20, t.n - t.nnz) + 1))
                t.nnz += extra
                t.values = t.values[: (t.nnz - extra) * eb] + bytes(extra * eb)
            # what == 3: left intact
        tables.append([t])
    accepted, rejected = _judge_like_the_reference(harness, tables, tmp_path)
    assert accepted > 5 and rejected > 50  # both sides of the decision were exercised


def _judge_like_the_reference(harness, tables, tmp_path) -> tuple[int, int]:
    """Emulate one-tensor tables; the kernel must reject exactly what the reference rejects and
    match its output otherwise. Returns (accepted, rejected)."""
    accepted = rejected = 0
    for (t,), (error, (out,)) in zip(tables, emulate(harness, tables, tmp_path)):
        try:
            ref = t.reference()
        except DecodeError:
            assert error != NO_ERROR, t.label
            rejected += 1
        else:
            assert error == NO_ERROR, (t.label, kernels.decode_error_key(error))
            np.testing.assert_array_equal(out, ref)
            accepted += 1
    return accepted, rejected


def _mutate_expdict(rng, t: Tensor) -> None:
    """One random change to an expdict tensor's bitmap, tile offsets, escape table or counts,
    keeping what the host guarantees (capacities, array sizes) true."""
    what = int(rng.integers(0, 6))
    u32 = 1 << 32
    if what == 0:
        w = int(rng.integers(0, t.bitmap.size))
        t.bitmap[w] ^= np.uint32(1 << int(rng.integers(0, 32)))
    elif what == 1:
        j = int(rng.integers(0, t.offsets.size))
        t.offsets[j] = (int(t.offsets[j]) + int(rng.integers(-3, 4))) % u32 if rng.random() < 0.7 \
            else int(rng.integers(0, u32))
    elif what == 2:
        j = int(rng.integers(0, t.escape_offsets.size))
        t.escape_offsets[j] = (int(t.escape_offsets[j]) + int(rng.integers(-2, 3))) % u32 \
            if rng.random() < 0.7 else int(rng.integers(0, u32))
    elif what == 3 and t.escape_positions.size:
        j = int(rng.integers(0, t.escape_positions.size))
        t.escape_positions[j] = (int(t.escape_positions[j]) + int(rng.integers(-2, 3))) % 65536 \
            if rng.random() < 0.7 else int(rng.integers(0, 65536))
    elif what == 4:  # a different escape count
        _set_escape_count(t, int(rng.integers(0, min(t.nnz, t.expdict.escapes + 3) + 1)))
    elif what == 5 and t.nnz:  # fewer values declared: capacities shrink with them
        t.nnz = int(rng.integers(0, t.nnz))
        need = t.expdict.stream_nbytes(t.nnz)
        t.values, t.codes = t.values[: need["residuals"]], t.codes[: need["codes"]]
        _set_escape_count(t, min(t.nnz, t.expdict.escapes))


def _set_escape_count(t: Tensor, nesc: int) -> None:
    """Declare ``nesc`` escapes, the arrays cut or repeated to that size (a host guarantee)."""
    from dataclasses import replace  # noqa: PLC0415

    t.expdict = replace(t.expdict, escapes=nesc)
    t.escape_positions = np.resize(t.escape_positions, nesc).astype("<u2")
    t.escape_values = np.resize(t.escape_values, nesc).astype(t.escape_values.dtype)


def test_expdict_random_corruptions_rejected_exactly_when_the_reference_rejects(harness, rng, tmp_path):
    """The same fuzz for codec expdict: the escape tables and counts too."""
    tables = []
    for i in range(120):
        dtype = ("BF16", "F16", "F32")[i % 3]
        n = int(rng.choice([1, 33, 4096, 4097, 3 * TILE_ELEMS + 5]))
        t = make_expdict_tensor(rng, n, dtype, float(rng.choice([1.0, 0.5, rng.random()])),
                                ("exact", "page")[i % 3 == 0], index_bits=1 + i % 4)
        for _ in range(int(rng.integers(1, 3))):
            _mutate_expdict(rng, t)
        tables.append([t])
    accepted, rejected = _judge_like_the_reference(harness, tables, tmp_path)
    assert accepted > 5 and rejected > 40  # both sides of the decision were exercised


def _mutate_exphuff(rng, t: HuffTensor) -> None:
    """One random change to an exphuff tensor's tile or chunk bit offsets, bit stream, bitmap or
    tile offsets, keeping what the host guarantees (capacities, array sizes, the code) true."""
    what = int(rng.integers(0, 5))
    if what == 0:
        j = int(rng.integers(0, t.tile_bits.size))
        t.tile_bits[j] = (int(t.tile_bits[j]) + int(rng.integers(-3, 4))) % (1 << 32) \
            if rng.random() < 0.8 else int(rng.integers(0, 1 << 32))
    elif what == 1 and t.chunk_bits.size:
        j = int(rng.integers(0, t.chunk_bits.size))
        t.chunk_bits[j] = (int(t.chunk_bits[j]) + int(rng.integers(-3, 4))) % 65536 \
            if rng.random() < 0.8 else int(rng.integers(0, 65536))
    elif what == 2 and t.params.nbits:  # a bit of the stream: may still decode, to other values
        bits = bytearray(t.bits)
        b = int(rng.integers(0, t.params.nbits))
        bits[b // 8] ^= 0x80 >> (b % 8)
        t.bits = bytes(bits)
    elif what == 3 and not t.dense:
        w = int(rng.integers(0, t.bitmap.size))
        t.bitmap[w] ^= np.uint32(1 << int(rng.integers(0, 32)))
    elif what == 4 and not t.dense:
        j = int(rng.integers(0, t.offsets.size))
        t.offsets[j] = (int(t.offsets[j]) + int(rng.integers(-3, 4))) % (1 << 32)


def test_exphuff_random_corruptions_rejected_exactly_when_the_reference_rejects(harness, rng, tmp_path):
    """The same fuzz for codec exphuff, dense and sparse: bit offsets, stream bits, bitmap."""
    tables = []
    for i in range(120):
        dtype = ("BF16", "F16", "F32")[i % 3]
        n = int(rng.choice([1, 33, 4096, 4097, 3 * TILE_ELEMS + 5]))
        density = float(rng.choice([1.0, 0.5, rng.random()]))
        t = make_exphuff_tensor(rng, n, dtype, density, ("exact", "page")[i % 3 == 0])
        for _ in range(int(rng.integers(1, 3))):
            _mutate_exphuff(rng, t)
        tables.append([t])
    accepted, rejected = _judge_like_the_reference(harness, tables, tmp_path)
    assert accepted > 5 and rejected > 40  # both sides of the decision were exercised


def test_valid_and_corrupt_inputs_under_valgrind(harness, rng, tmp_path):
    """Byte-exact memory checking: every buffer is an exact-size heap block (--malloc)."""
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind not installed")
    valid = _valid_tables(rng)
    corrupt, expected = _corrupt_tables(rng)
    results = emulate(harness, valid + corrupt, tmp_path, valgrind=True)
    _check_valid(valid, results[: len(valid)])
    for (error, _), (name, want) in zip(results[len(valid):], expected):
        assert error == want, name


def _huff_tensor_at(it: kernels.GpuItem, at) -> HuffTensor:
    """The exphuff tensor a GpuItem points at, its segments read through ``at(ptr, size)``."""
    eh, ntiles = it.exphuff, -(-it.n // TILE_ELEMS)
    sparse = not it.dense
    return HuffTensor(eh.params.layout.name, it.n,
                      np.frombuffer(at(it.bitmap_ptr, 4 * -(-it.n // 32)), "<u4").copy() if sparse else None,
                      np.frombuffer(at(it.tile_offsets_ptr, 4 * (ntiles + 1)), "<u4").copy() if sparse else None,
                      it.nnz, eh.params, at(it.values_ptr, it.values_capacity), at(eh.bits_ptr, eh.bits_capacity),
                      np.frombuffer(at(eh.tile_bits_ptr, 4 * (ntiles + 1)), "<u4").copy(),
                      np.frombuffer(at(eh.chunk_bits_ptr, 2 * 7 * ntiles), "<u2").copy(), it.label)


def _backend_tables(path) -> tuple[list[list], list[list[np.ndarray]], set[str]]:
    """Per layer of the file at ``path``: the tensors backends._gpu_item points the kernel at
    (read back through its pointers and capacities), what the reference reads for each, and the
    codecs seen."""
    from endor_gds.container import EndorFile  # noqa: PLC0415
    from endor_gds.stream.backends import _gpu_item  # noqa: PLC0415
    from endor_gds.stream.plan import plan_layer  # noqa: PLC0415

    base, out = 1 << 40, 1 << 41  # fake device addresses: only differences are used
    tables, refs = [], []
    with EndorFile(path) as f:
        for ext in f.layers:
            plan = plan_layer(f, ext, f"model.layers.{ext.layer}.")
            staging = f._pread(ext.offset, ext.length).tobytes()

            def at(ptr, size, staging=staging):
                return staging[ptr - base:ptr - base + size]

            table, ref = [], []
            for slot in plan.slots:
                if slot.arena_offset is None:
                    continue
                it = _gpu_item(slot, base, out + slot.arena_offset, slot.entry.name)
                ref.append(f.read_tensor_bits(slot.entry.name))
                if it.exphuff is not None:
                    table.append(_huff_tensor_at(it, at))
                    continue
                ntiles = -(-it.n // TILE_ELEMS)
                t = Tensor(it.elem_bytes, it.n,
                           np.frombuffer(at(it.bitmap_ptr, 4 * -(-it.n // 32)), "<u4").copy(),
                           at(it.values_ptr, it.values_capacity),
                           np.frombuffer(at(it.tile_offsets_ptr, 4 * (ntiles + 1)), "<u4").copy(),
                           it.nnz, it.label)
                if it.expdict is not None:
                    ed, p = it.expdict, it.expdict.params
                    t.expdict, t.codes = p, at(ed.codes_ptr, ed.codes_capacity)
                    t.escape_offsets = np.frombuffer(at(ed.escape_offsets_ptr, 4 * (ntiles + 1)), "<u4").copy()
                    t.escape_positions = np.frombuffer(at(ed.escape_positions_ptr, 2 * p.escapes), "<u2").copy()
                    t.escape_values = np.frombuffer(at(ed.escape_values_ptr, it.elem_bytes * p.escapes),
                                                    p.layout.bits).copy()
                table.append(t)
            tables.append(table)
            refs.append(ref)
        codecs = {f.tensors[t.label].codec for table in tables for t in table}
    return tables, refs, codecs


def test_cuda_backend_items_of_packed_files(harness, packed, tmp_path):
    """The CUDA backend's descriptors for real layers (backends._gpu_item: which segment each
    pointer names, and its capacity), of files with exphuff (forced), the packer's choice and raw
    tensors, one launch per layer mixing them, decode in emulation exactly as the reference reads
    the files."""
    import torch  # noqa: PLC0415

    files = [_backend_tables(packed("llama", torch.bfloat16, prune="magnitude", codec=codec))
             for codec in ("exphuff", "auto", "raw")]
    assert set().union(*(codecs for _, _, codecs in files)) >= {"raw", "exphuff"}, [c for _, _, c in files]
    tables = [sum(layer, []) for layer in zip(*(t for t, _, _ in files))]
    refs = [r for layer in zip(*(r for _, r, _ in files)) for refs in layer for r in refs]
    results = emulate(harness, tables, tmp_path)
    assert all(error == NO_ERROR for error, _ in results)
    outs = [o for _, table_outs in results for o in table_outs]
    assert len(outs) == len(refs)
    for got, want in zip(outs, refs):
        np.testing.assert_array_equal(got, want)
