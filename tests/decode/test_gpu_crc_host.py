"""endor_gds.decode.gpu_crc on a machine without a GPU: import, the arithmetic behind the
kernel's constants (checked against crc32c), the tables' layout, every argument check.

The kernels themselves: test_crc_emulated.py (CPU) and test_gpu_crc.py (GPU).
"""

from __future__ import annotations

import subprocess
import sys

import crc32c
import numpy as np
import pytest

from endor_gds.decode import gpu_crc
from endor_gds.decode.gpu_crc import PIECE_BYTES, PIECE_ROWS, ROW_BYTES, GpuSegment, gf_mul, x_pow
from endor_gds.errors import MissingDependencyError

ONE = 1 << 31


def test_import_needs_no_cupy():
    code = ("import sys, endor_gds.decode.gpu_crc as c; c.pack_segments([c.GpuSegment(16, 5, 0)]); "
            "assert 'cupy' not in sys.modules, 'cupy imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_checker_without_cupy_names_the_package():
    try:
        import cupy  # noqa: F401, PLC0415
    except ImportError:
        with pytest.raises(MissingDependencyError, match=r"pip install 'endor_gds\[gpu\]' \(cupy-cuda13x\)"):
            gpu_crc.GpuCrc()
    else:
        pytest.skip("CuPy is installed: its error (or a GPU) decides")


@pytest.mark.parametrize("la, lb", [(0, 0), (1, 0), (0, 7), (5, 1), (1000, 4097), (33, 123_457)])
def test_shifting_a_crc_is_a_power_of_x(rng, la, lb):
    """The identity the kernel is built on: CRC-32C(A + B) = CRC(A) * x^(8 |B|) + CRC(B)."""
    a, b = rng.bytes(la), rng.bytes(lb)
    assert crc32c.crc32c(a + b) == gf_mul(x_pow(8 * lb), crc32c.crc32c(a)) ^ crc32c.crc32c(b)


def test_negative_powers_invert():
    for n in (0, 1, 8, 31, 32, 1024, 8 * PIECE_BYTES * 12345):
        assert gf_mul(x_pow(n), x_pow(-n)) == ONE
    assert x_pow(0) == ONE and gf_mul(x_pow(3), x_pow(5)) == x_pow(8)


def _raw(message: bytes) -> int:
    """The CRC register after ``message`` from a zero initial value, without the final inversion."""
    return crc32c.crc32c(message) ^ crc32c.crc32c(bytes(len(message)))


def test_constants_are_the_row_tables_and_lane_inverses():
    """Entry 16k + v: a row whose first word holds v in nibble k, the rest zero (what a lane's
    register becomes after XORing that word in and the 128-byte row); then x^(-32c) per lane."""
    c = gpu_crc.constants()
    assert c.dtype == np.uint32 and len(c) == 160 and not c.flags.writeable
    for k in range(8):
        for v in range(16):
            row = (v << 4 * k).to_bytes(4, "little") + bytes(ROW_BYTES - 4)
            assert int(c[16 * k + v]) == _raw(row), (k, v)
    for lane in range(32):
        assert gf_mul(int(c[128 + lane]), x_pow(32 * lane)) == ONE


@pytest.mark.parametrize("start, length", [(0, 0), (127, 0), (126, 3), (0, 1), (1, 127), (0, 128), (5, PIECE_BYTES),
                                           (0, 3 * PIECE_BYTES), (64, 5 * PIECE_BYTES + 1), (125, 2)])
def test_segment_rows_and_pieces(start, length):
    """A segment's rows cover its bytes and its first four (CRC-32C's initial value); its first
    piece is the short one, the others PIECE_ROWS long; each piece's shift brings a register to
    the end of the last row, and the segment's unshift from there back to its last byte."""
    ptr = 0x10000 * 128 + start
    segs, pieces = gpu_crc.pack_segments([GpuSegment(0x80, 9, 1), GpuSegment(ptr, length, 7)])
    assert segs.dtype == gpu_crc.SEG_DTYPE and pieces.dtype == gpu_crc.PIECE_DTYPE
    assert segs[1]["data"] == ptr and segs[1]["length"] == length and segs[1]["expected"] == 7
    rows = (start + max(length, 4) - 1) // ROW_BYTES + 1
    assert int(segs[1]["unshift"]) == x_pow(-8 * (rows * ROW_BYTES - start - length))
    mine = pieces[pieces["seg"] == 1]
    assert pieces["seg"].tolist() == [0] * (len(pieces) - len(mine)) + [1] * len(mine)
    assert mine["first_row"].tolist() == np.concatenate([[0], np.cumsum(mine["rows"])[:-1]]).tolist()
    assert int(mine["rows"].sum()) == rows and 1 <= mine["rows"][0] <= PIECE_ROWS
    assert (mine["rows"][1:] == PIECE_ROWS).all()
    for k, p in enumerate(mine):
        after = rows - int(p["first_row"]) - int(p["rows"])
        assert after == (len(mine) - 1 - k) * PIECE_ROWS
        assert int(p["shift"]) == x_pow(8 * ROW_BYTES * after)


def test_piece_shifts_grow_and_are_reused():
    far = np.array([0, 1, 3000, 7], dtype=np.int64)
    got = gpu_crc._piece_shifts(far)
    assert [int(g) for g in got] == [x_pow(8 * PIECE_BYTES * int(k)) for k in far]
    assert len(gpu_crc._powers) >= 3001


@pytest.mark.parametrize("segments, match", [
    ([], "needs at least one segment"),
    ([GpuSegment(16, -1, 0)], "segment 0: length=-1 must be an integer between 0 and"),
    ([GpuSegment(16, 1 << 40, 0)], "segment 0: length=1099511627776 must be an integer between 0"),
    ([GpuSegment(16, 4.0, 0)], "segment 0: length=4.0"),
    ([GpuSegment(16, 4, 0), GpuSegment(-16, 4, 0)], "segment 1: ptr=-16 is not a device address"),
    ([GpuSegment((1 << 64) - 2, 4, 0)], "ptr=18446744073709551614 is not a device address"),
    ([GpuSegment(0, 4, 0)], "segment 0: ptr is null"),
    ([GpuSegment(16, 4, 1 << 32)], r"segment 0: crc=4294967296 is not a CRC-32C \(an integer below 2\^32\)"),
    ([GpuSegment(16, 4, -1)], "segment 0: crc=-1 is not a CRC-32C"),
])
def test_every_argument_check(segments, match):
    with pytest.raises(ValueError, match=match):
        gpu_crc.pack_segments(segments)


def test_limits_and_types(monkeypatch):
    with pytest.raises(TypeError, match="segment 1 must be a GpuSegment, got tuple"):
        gpu_crc.check_segments([GpuSegment(16, 1, 0), (16, 1, 0)])
    gpu_crc.check_segments([GpuSegment(0, 0, 0)])  # an empty segment reads nothing: null is fine
    monkeypatch.setattr(gpu_crc, "_MAX_SEGMENTS", 2)  # the real limit, 2^24, is too many to build
    with pytest.raises(ValueError, match="a CRC table holds at most 2 segments, got 3"):
        gpu_crc.check_segments([GpuSegment(16, 1, 0)] * 3)
    monkeypatch.setattr(gpu_crc, "_MAX_PIECES", 3)
    with pytest.raises(ValueError, match=f"a CRC table covers at most 3 pieces of {PIECE_BYTES} bytes, got 4"):
        gpu_crc.pack_segments([GpuSegment(16, 2 * PIECE_BYTES, 0), GpuSegment(16, 1, 0)])


def test_error_word_names_segment_and_crc():
    assert gpu_crc.mismatch_key(5 << 32 | 0xDEADBEEF) == (5, 0xDEADBEEF)
    assert gpu_crc.NO_MISMATCH == (1 << 64) - 1


def test_launch_enqueues_resets_both_kernels_and_the_verdict(monkeypatch):
    """GpuCrc's launch on host stand-ins for CuPy (host_cupy) and the kernels: the accumulators and
    error word reset, launch 1 over the pieces and launch 2 over the segments with their grids and
    arguments in the kernels' order, the verdict copied to pinned memory; result() reads it."""
    from host_cupy import fake_cupy  # noqa: PLC0415 - tests/support

    cp = fake_cupy()
    launched = []

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __call__(self, grid, block, args):
            launched.append((self.name, grid, block, args))
            if self.name == gpu_crc.VERDICT_KERNEL:  # as the kernel would: segment 1, CRC 0xABCD
                descs, nsegs, consts, acc, error = args
                assert acc.view(np.uint32).tolist() == [0] * (32 * int(nsegs))  # reset before launch 1
                error[0] = 1 << 32 | 0xABCD

    monkeypatch.setattr(gpu_crc, "_cupy", lambda: cp)
    monkeypatch.setattr(gpu_crc, "kernel_for", lambda device, name, file: Kernel(name))
    crc = gpu_crc.GpuCrc(0)
    segments = [GpuSegment(0x1000, 3 * PIECE_BYTES, 1), GpuSegment(0x99003, 10, 2)]
    table = crc.make_table(segments)
    assert (table.segments, table.pieces) == (2, 4) and repr(table) == "<CrcTable device=0 segments=2 pieces=4>"
    with pytest.raises(RuntimeError, match="has not been launched; call launch"):
        crc.result(table)
    with pytest.raises(TypeError, match="launch\\(\\) needs an explicit stream"):
        crc.launch(table, None)
    table.acc[:] = 7  # what a previous launch left
    crc.launch(table, 1234)
    (p_name, p_grid, p_block, p_args), (v_name, v_grid, v_block, v_args) = launched
    assert (p_name, p_grid, p_block) == (gpu_crc.PIECES_KERNEL, (1,), (gpu_crc.THREADS,))
    assert (v_name, v_grid, v_block) == (gpu_crc.VERDICT_KERNEL, (1,), (gpu_crc.THREADS,))
    segs, pieces = gpu_crc.pack_segments(segments)
    assert p_args[0].tobytes() == segs.tobytes() and p_args[1].tobytes() == pieces.tobytes()
    assert p_args[2] == np.uint32(4) and isinstance(p_args[2], np.uint32)
    assert np.array_equal(p_args[3], gpu_crc.constants()) and p_args[4] is table.acc
    assert v_args[0] is table.descs and v_args[1] == np.uint32(2) and v_args[4] is table.error
    assert crc.result(table) == (1, 0xABCD)
    with pytest.raises(ValueError, match="table lives on device 0, this checker on 1"):
        crc.device = 1
        crc.launch(table, 1234)
