"""The GPU check on a GPU: CRC-32C of device buffers bit-exact against crc32c, at every edge of
the row and piece layout, at odd addresses; single-bit flips named; tables reused across
launches and streams. Skipped without a GPU (see conftest.py); the same kernels run on the CPU in
test_crc_emulated.py.
"""

from __future__ import annotations

import crc32c
import numpy as np
import pytest
import torch

from endor_gds.decode.gpu_crc import PIECE_BYTES, GpuSegment

pytestmark = pytest.mark.gpu

LENGTHS = (0, 1, 2, 3, 4, 5, 127, 128, 129, 4095, 4096, 4097, PIECE_BYTES - 1, PIECE_BYTES,
           PIECE_BYTES + 1, 3 * PIECE_BYTES + 5, (5 << 20) + 3)
STARTS = (0, 1, 3, 4, 16, 63, 125, 127)


@pytest.fixture(scope="module")
def crc():
    from endor_gds.decode.gpu_crc import GpuCrc  # noqa: PLC0415 - needs CuPy

    return GpuCrc(0)


def _extent(rng, pairs):
    """One device buffer holding a segment per ``(start mod 128, length)``, each at its own 128-byte
    aligned slot plus ``start``; (buffer, host copy, [(offset, length)])."""
    spans, pos = [], 0
    for start, length in pairs:
        pos = -(-pos // 128) * 128 + start
        spans.append((pos, length))
        pos += length
    host = np.frombuffer(rng.bytes(pos + 128), dtype=np.uint8).copy()
    dev = torch.from_numpy(host).cuda()
    assert dev.data_ptr() % 128 == 0
    return dev, host, spans


def _segments(dev, host, spans, wrong=None):
    """GpuSegments over ``dev``; the stored CRC of segment ``wrong`` off by one bit."""
    out = []
    for i, (off, length) in enumerate(spans):
        c = crc32c.crc32c(host[off:off + length].tobytes())
        out.append(GpuSegment(dev.data_ptr() + off, length, c ^ (i == wrong)))
    return out


def _run(crc, table):
    crc.launch(table, torch.cuda.current_stream())
    return crc.result(table)


def test_every_segment_bit_exact(crc, rng):
    """All pass together; then each with a wrong stored CRC in turn: the result names it with the
    CRC-32C crc32c computes for its bytes."""
    pairs = [(s, n) for n in LENGTHS for s in STARTS[(n % 5):(n % 5) + 3]]
    dev, host, spans = _extent(rng, pairs)
    assert _run(crc, crc.make_table(_segments(dev, host, spans))) is None
    for i, (off, length) in enumerate(spans):
        got = _run(crc, crc.make_table(_segments(dev, host, spans, wrong=i)))
        assert got == (i, crc32c.crc32c(host[off:off + length].tobytes())), (i, off % 128, length)


def test_single_bit_flips_on_the_device(crc, rng):
    """One table, launched again after each flip of one bit in device memory (first, last and
    random bits of every segment): the first bad segment and its CRC; restored, it passes."""
    dev, host, spans = _extent(rng, [(5, 9000), (127, 1), (0, 2 * PIECE_BYTES + 77), (64, 3)])
    table = crc.make_table(_segments(dev, host, spans))
    for i, (off, length) in enumerate(spans):
        for bit in {0, 8 * length - 1, int(rng.integers(8 * length))}:
            pos = off + bit // 8
            dev[pos] ^= 1 << bit % 8
            flipped = host[off:off + length].copy()
            flipped[bit // 8] ^= 1 << bit % 8
            assert _run(crc, table) == (i, crc32c.crc32c(flipped.tobytes())), (i, bit)
            dev[pos] ^= 1 << bit % 8
    assert _run(crc, table) is None


def test_streams_and_misuse(crc, rng):
    import cupy as cp  # noqa: PLC0415 - GPU test

    dev, host, spans = _extent(rng, [(3, 1000)])
    table = crc.make_table(_segments(dev, host, spans, wrong=0))
    with pytest.raises(RuntimeError, match="has not been launched"):
        crc.result(table)
    with pytest.raises(TypeError, match="needs an explicit stream"):
        crc.launch(table, None)
    want = (0, crc32c.crc32c(host[3:1003].tobytes()))
    for stream in (torch.cuda.Stream(), cp.cuda.Stream(non_blocking=True), torch.cuda.current_stream().cuda_stream):
        crc.launch(table, stream)
        assert crc.result(table) == want
    empty = crc.make_table([GpuSegment(0, 0, 0), GpuSegment(0, 0, 5)])  # nothing read: CRC-32C 0
    assert _run(crc, empty) == (1, 0)
