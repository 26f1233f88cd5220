"""The GPU check's kernels (cuda/endor_crc.cu), run on the CPU (no GPU needed), against crc32c.

tests/support/endor_crc_emulate.cu includes the kernel file and runs its per-thread functions for
every thread of every block in the kernels' phase order; every buffer is its own allocation with
guard pages and canaries, each segment placed at the address remainder (mod 128) its descriptor
gives, and the kernel's loads assert that they read inside their segment, byte-exactly. It is
built with the undefined-behaviour sanitizer (a misaligned word load stops it). Tables are built
by endor_gds.decode.gpu_crc.pack_segments, as on a GPU.
"""

from __future__ import annotations

import struct
import subprocess

import crc32c
import pytest
import torch
from nvcc_tools import REPO, build_emulator, require_nvcc

import endor_gds
from endor_gds.decode import gpu_crc
from endor_gds.decode.gpu_crc import PIECE_BYTES, GpuSegment
from endor_gds.stream.backends import crc_segments
from endor_gds.stream.plan import plan_layer

BASE = 0x7F00_0000_0000  # fake device addresses; only their remainder mod 128 reaches the harness
# lengths at every edge of the row and piece layout, and of CRC-32C's 4-byte initial value
EDGE_LENGTHS = (0, 1, 2, 3, 4, 5, 7, 8, 127, 128, 129, 255, 256, 4095, 4096, 4097,
                PIECE_BYTES - 1, PIECE_BYTES, PIECE_BYTES + 1, 2 * PIECE_BYTES + 3)
EDGE_STARTS = (0, 1, 2, 3, 4, 5, 15, 16, 63, 64, 124, 125, 126, 127)  # address mod 128


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    exe = tmp_path_factory.mktemp("emulate") / "endor_crc_emulate"
    build_emulator(require_nvcc(), REPO / "tests" / "support" / "endor_crc_emulate.cu", exe)
    return exe


def _segment(rng, k: int, start: int, data: bytes, crc: int | None = None):
    """A segment of bytes ``data`` at a fake device address (slot ``k`` of 64 MiB, then ``start``
    bytes: its remainder mod 128), stored CRC ``crc`` (default: the right one)."""
    return (GpuSegment(BASE + (k << 26) + start, len(data), crc32c.crc32c(data) if crc is None else crc), data)


def emulate(exe, tables, tmp_path) -> list[tuple[int, list[int]]]:
    """Run both launches of each table (a list of ``(GpuSegment, bytes)``); per table the error
    word and the CRC-32C the verdict computed for each segment."""
    parts = [b"CRC1", gpu_crc.constants().astype("<u4").tobytes(), struct.pack("<I", len(tables))]
    for table in tables:
        segs, pieces = gpu_crc.pack_segments([sg for sg, _ in table])
        parts += [struct.pack("<II", len(segs), len(pieces)), segs.tobytes(), pieces.tobytes()]
        parts += [data for _, data in table]
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(b"".join(parts))
    res = subprocess.run([str(exe), "run", str(src), str(dst)], capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, f"harness failed (rc={res.returncode}):\n{res.stderr[-4000:]}"
    raw, pos, out = dst.read_bytes(), 0, []
    for table in tables:
        (error,) = struct.unpack_from("<Q", raw, pos)
        crcs = list(struct.unpack_from(f"<{len(table)}I", raw, pos + 8))
        pos += 8 + 4 * len(table)
        out.append((error, crcs))
    assert pos == len(raw)
    return out


def _flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << bit % 8
    return bytes(b)


# ---------------------------------------------------------------------------------------------

def test_layout_matches_gpu_crc_py(harness):
    out = subprocess.run([str(harness), "layout"], capture_output=True, text=True, check=True).stdout
    got = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    assert got["seg_size"] == gpu_crc.SEG_DTYPE.itemsize
    assert got["piece_size"] == gpu_crc.PIECE_DTYPE.itemsize
    for dtype in (gpu_crc.SEG_DTYPE, gpu_crc.PIECE_DTYPE):
        for name in dtype.names:
            assert got[name] == dtype.fields[name][1], name
    assert got["consts"] == len(gpu_crc.constants())
    assert got["threads"] == gpu_crc.THREADS and got["row_bytes"] == gpu_crc.ROW_BYTES
    assert got["poly"] == gpu_crc.POLY


def test_every_length_and_alignment_bit_exact(harness, rng, tmp_path):
    """Each edge length at each start remainder, many segments per table; then random lengths up
    to a few pieces at random starts, in one table."""
    tables, k = [], 0
    for length in EDGE_LENGTHS:
        table = []
        for start in EDGE_STARTS:
            table.append(_segment(rng, k, start, rng.bytes(length)))
            k += 1
        tables.append(table)
    tables.append([_segment(rng, i, int(rng.integers(128)), rng.bytes(int(rng.integers(0, 3 * PIECE_BYTES))))
                   for i in range(40)])
    for table, (error, crcs) in zip(tables, emulate(harness, tables, tmp_path)):
        assert crcs == [sg.crc for sg, _ in table]
        assert error == gpu_crc.NO_MISMATCH


def test_multi_mib_segments(harness, rng, tmp_path):
    """Segments of many pieces (the shifts of far-away pieces), beside small ones."""
    table = [_segment(rng, 0, 0, rng.bytes(3 << 20)), _segment(rng, 1, 77, rng.bytes(5)),
             _segment(rng, 2, 125, rng.bytes((2 << 20) + 4099)), _segment(rng, 3, 3, rng.bytes(0))]
    ((error, crcs),) = emulate(harness, [table], tmp_path)
    assert crcs == [sg.crc for sg, _ in table] and error == gpu_crc.NO_MISMATCH


def test_single_bit_flips_name_their_segment(harness, rng, tmp_path):
    """A table of segments at odd starts; each copy of it has one bit flipped in one segment (its
    first and last bit, bits of its first four bytes, random ones): that segment and only that one
    computes the flipped bytes' CRC, and the error word names it with that CRC."""
    lengths = (1, 3, 4, 130, 4097, PIECE_BYTES + 1, 2 * PIECE_BYTES + 77)
    base = [_segment(rng, i, int(rng.integers(128)), rng.bytes(n)) for i, n in enumerate(lengths)]
    tables, flips = [], []
    for i, (sg, data) in enumerate(base):
        bits = {0, 8 * len(data) - 1, min(31, 8 * len(data) - 1)} | {int(b) for b in rng.integers(0, 8 * len(data), 3)}
        for bit in sorted(bits):
            table = list(base)
            table[i] = (sg, _flip(data, bit))
            tables.append(table)
            flips.append((i, bit))
    for (i, bit), table, (error, crcs) in zip(flips, tables, emulate(harness, tables, tmp_path)):
        damaged = crc32c.crc32c(table[i][1])
        assert damaged != base[i][0].crc, (i, bit)
        assert crcs == [damaged if j == i else sg.crc for j, (sg, _) in enumerate(base)], (i, bit)
        assert gpu_crc.mismatch_key(error) == (i, damaged), (i, bit)


def test_first_bad_segment_in_table_order_is_reported(harness, rng, tmp_path):
    """Two bad segments: the error word names the first; a wrong stored CRC counts as bad too;
    an empty segment computes 0."""
    table = [_segment(rng, i, i * 13 % 128, rng.bytes(500 + i)) for i in range(6)]
    table[4] = (table[4][0], _flip(table[4][1], 77))
    table[2] = (GpuSegment(table[2][0].ptr, table[2][0].length, table[2][0].crc ^ 1), table[2][1])
    empty = _segment(rng, 9, 5, b"", crc=0x1234)
    ((error, crcs), (error2, crcs2)) = emulate(harness, [table, [empty]], tmp_path)
    assert gpu_crc.mismatch_key(error) == (2, crcs[2]) and crcs[2] == table[2][0].crc ^ 1
    assert crcs[4] == crc32c.crc32c(table[4][1])
    assert crcs2 == [0] and gpu_crc.mismatch_key(error2) == (0, 0)


def test_extents_of_packed_files(harness, packed, tmp_path):
    """Every extent of a packed file, as CudaBackend lists it (backends.crc_segments over a
    512-byte aligned staging buffer and over one at an odd address): all pass, and a flipped bit
    names the segment of the manifest it is in."""
    path = packed("llama", torch.float16, prune="magnitude", codec="expdict")
    tables, plans = [], []
    with endor_gds.open(path) as f:
        for ext in [f.resident, *f.layers]:
            prefix = "" if ext is f.resident else f"model.layers.{ext.layer}."
            plan = plan_layer(f, ext, prefix)
            data = f._pread(ext.offset, ext.length).tobytes()
            for base in (BASE, BASE + 0x400000 + 19):
                segs = crc_segments(plan, base)
                tables.append([(sg, data[sg.ptr - base:sg.ptr - base + sg.length]) for sg in segs])
                plans.append(plan)
    bad = [list(t) for t in tables[2:4]]  # layer 0, both bases
    i = len(bad[0]) // 2
    for t in bad:
        t[i] = (t[i][0], _flip(t[i][1], 8 * (t[i][0].length // 3) + 5))
    results = emulate(harness, tables + bad, tmp_path)
    for table, (error, crcs) in zip(tables, results):
        assert error == gpu_crc.NO_MISMATCH and crcs == [sg.crc for sg, _ in table]
    for (error, _) in results[len(tables):]:
        assert gpu_crc.mismatch_key(error)[0] == i
        assert plans[2].segment_crcs[i][3] == bad[0][i][0].length
