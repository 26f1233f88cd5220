"""The CUDA decode kernel's own code, run on the CPU (no GPU needed), against the numpy reference.

tests/endor_decode_emulate.cu includes cuda/endor_decode.cu and runs its per-thread functions for
every thread of every block in the kernel's phase order; the harness allocates every buffer the
kernel touches on its own, with guard pages and canaries, and the same inputs also run under
valgrind. Descriptors are built by endor_gds.kernels.pack_descriptors, as on a GPU.
"""

from __future__ import annotations

import shutil
import struct
import subprocess

import numpy as np
import pytest
from bitgen import SIZES
from decode_cases import COUNT_MISMATCH, Tensor, corrupt_cases, key, make_tensor
from nvcc_tools import REPO, STRICT, require_nvcc, run_nvcc

from endor_gds import kernels
from endor_gds.errors import DecodeError
from endor_gds.format import TILE_ELEMS

NO_ERROR = kernels.NO_ERROR


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    nvcc = require_nvcc()
    exe = tmp_path_factory.mktemp("emulate") / "endor_decode_emulate"
    src = REPO / "tests" / "endor_decode_emulate.cu"
    res = run_nvcc(nvcc, ["-DENDOR_EMULATE", "-O2", "-g", "-arch=sm_80", *STRICT, "-Xcompiler",
                          "-Wall,-Wextra,-Werror,-Wno-unknown-pragmas,-fno-strict-aliasing",
                          "-o", str(exe), str(src)])
    assert res.returncode == 0, f"building the emulation harness failed:\n{res.stderr}"
    return exe


def _input_bytes(tables: list[list[Tensor]]) -> bytes:
    parts = [b"EMU1", struct.pack("<I", len(tables))]
    for table in tables:
        # Fake, aligned device addresses: the harness substitutes its own buffers.
        items = [kernels.GpuItem(bitmap_ptr=0x100000 * (4 * k + 1), values_ptr=0x100000 * (4 * k + 2),
                                 values_capacity=len(t.values), tile_offsets_ptr=0x100000 * (4 * k + 3),
                                 out_ptr=0x100000 * (4 * k + 4), n=t.n, nnz=t.nnz,
                                 elem_bytes=t.elem_bytes, label=t.label)
                 for k, t in enumerate(table)]
        parts += [struct.pack("<I", len(table)), kernels.pack_descriptors(items).tobytes()]
        for t in table:
            parts += [t.bitmap.astype("<u4").tobytes(), t.values, t.offsets.astype("<u4").tobytes()]
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
    return tables


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
    for eb in (2, 4):
        for name, (bad, want) in corrupt_cases(rng, eb).items():
            # desc 0 and 2 are good: the error must name desc 1
            tables.append([make_tensor(rng, 9000, 2, 0.5, "page", "good0"), bad,
                           make_tensor(rng, 4097, 4, 0.3, "exact", "good2")])
            expected.append((f"eb{eb} {name}", want))
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
    accepted = rejected = 0
    for (t,), (error, (out,)) in zip(tables, emulate(harness, tables, tmp_path)):
        try:
            ref = t.reference()
        except DecodeError:
            assert error != NO_ERROR
            rejected += 1
        else:
            assert error == NO_ERROR
            np.testing.assert_array_equal(out, ref)
            accepted += 1
    assert accepted > 5 and rejected > 50  # both sides of the decision were exercised


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
