"""GPU check of a staged extent: ``cuda/endor_crc.cu`` through CuPy, two launches per extent.

The CRC-32C of every segment of an extent in device memory, compared with the manifest's, without
copying a byte to the host. :class:`~endor_gds.stream.backends.CudaBackend` builds one
:class:`CrcTable` per (layer, buffer set) and launches it after each read::

    crc = GpuCrc(device=0)                                       # compiles once per device (cached)
    table = crc.make_table([GpuSegment(ptr, length, crc32c), ...])  # checks + uploads once
    crc.launch(table, stream)                                    # async: no allocation, no host sync
    ...
    crc.result(table)   # waits: None, or (index of the first bad segment, the CRC-32C it has)

How (the kernel's header has the details; docs/format.md, "How the GPU checks an extent", the
why): memory is cut into 128-byte rows; a warp folds up to :data:`PIECE_ROWS` rows of a segment
(a *piece*, 32 KiB), lane ``c`` the 4-byte column ``c`` of each row, through bank-private nibble
tables in shared memory; each lane's register is moved to the end of its segment by a
multiplication by a power of x (the piece's ``shift``) and XORed into the segment's accumulator;
a second launch folds the 32 accumulators of each segment into its CRC-32C and compares it.

Only the CPU-side parts are importable without CuPy (constants, descriptor layout, argument
checks, the arithmetic the constants come from); CuPy loads at the first :class:`GpuCrc`.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from endor_gds.decode.gpu import ErrorWordTable, _cupy, kernel_for, launch_stream

__all__ = [
    "KERNEL_FILE",
    "PIECES_KERNEL",
    "VERDICT_KERNEL",
    "THREADS",
    "LANES",
    "ROW_BYTES",
    "PIECE_ROWS",
    "PIECE_BYTES",
    "POLY",
    "SEG_DTYPE",
    "PIECE_DTYPE",
    "NO_MISMATCH",
    "GpuSegment",
    "gf_mul",
    "x_pow",
    "constants",
    "check_segments",
    "pack_segments",
    "mismatch_key",
    "CrcTable",
    "GpuCrc",
]

KERNEL_FILE = "endor_crc.cu"
PIECES_KERNEL = "endor_crc_pieces"
VERDICT_KERNEL = "endor_crc_verdict"

THREADS = 256  # 8 warps a block: 8 pieces (launch 1), 8 segments (launch 2); endor_crc::kThreads
LANES = 32
ROW_BYTES = 4 * LANES  # a warp's coalesced load: one 4-byte word per lane
# Rows of a piece, one warp's work: 32 KiB. Its fixed costs (one multiplication by the piece's
# shift, ~230 instructions a lane, its descriptors, one atomic XOR) are ~3 % of folding its 256
# rows (~30 instructions a row); smaller pieces would pay more of them, larger ones would leave
# SMs idle on small extents (a 100 MB extent is ~3,200 pieces: ~25 of an H200's 64 warps per SM).
PIECE_ROWS = 256
PIECE_BYTES = PIECE_ROWS * ROW_BYTES
POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected: bit 31 is the coefficient of x^0
_ONE = 1 << 31  # the polynomial 1
_X = 1 << 30  # the polynomial x
_X_INV = ((POLY << 1) & 0xFFFFFFFF) | 1  # x^-1 mod P: P = x * (x^-1) + 1, P's constant term 1
_MAX_SEGMENTS = 1 << 24  # the error word holds the segment index in its high 32 bits
_MAX_PIECES = (1 << 32) - 1  # u32 piece indices; the grid is a quarter of it at most
_MAX_LENGTH = (1 << 32) * ROW_BYTES // 2  # a segment's rows are u32 row numbers: 256 GiB

# Byte layouts of `struct endor_crc::Seg` and `Piece` (cuda/endor_crc.cu); the emulation test
# compares them with the compiled structs' offsetof/sizeof.
SEG_DTYPE = np.dtype([("data", "<u8"), ("length", "<u8"), ("expected", "<u4"), ("unshift", "<u4")])
PIECE_DTYPE = np.dtype([("seg", "<u4"), ("first_row", "<u4"), ("rows", "<u4"), ("shift", "<u4")])

NO_MISMATCH = (1 << 64) - 1  # the error word before a launch, and after one where every segment passed


@dataclass(frozen=True)
class GpuSegment:
    """One segment to check: device address (any alignment), length in bytes, its CRC-32C."""

    ptr: int  # 0 allowed only when length is 0
    length: int
    crc: int  # the CRC-32C stored for it (the manifest's)


# ---------------------------------------------------------------------------------------------
# GF(2)[x] mod P, in the bit order of the CRC register (the kernel's gf_mul, endor_crc.cu).

def gf_mul(a: int, b: int) -> int:
    """``a * b mod P``; ``gf_mul(x_pow(8 * n), crc)`` is ``crc`` followed by ``n`` zero bytes."""
    p = 0
    for i in range(32):
        if a >> (31 - i) & 1:
            p ^= b
        b = (b >> 1) ^ (POLY if b & 1 else 0)
    return p


def _mul_by(a: np.ndarray, b: int) -> np.ndarray:
    """``a * b mod P`` for every element of a uint32 array ``a`` (the columns of b's matrix)."""
    out = np.zeros(a.shape, dtype=np.uint32)
    for i in range(32):
        out ^= np.where((a >> np.uint32(31 - i)) & np.uint32(1), np.uint32(b), np.uint32(0))
        b = (b >> 1) ^ (POLY if b & 1 else 0)
    return out


@functools.lru_cache(maxsize=64)
def x_pow(n: int) -> int:
    """``x^n mod P`` for any integer ``n`` (negative: a power of x^-1)."""
    base, n = (_X, n) if n >= 0 else (_X_INV, -n)
    r = _ONE
    while n:
        if n & 1:
            r = gf_mul(r, base)
        base, n = gf_mul(base, base), n >> 1
    return r


@functools.cache
def constants() -> np.ndarray:
    """The kernel's 160 constants (uint32): the nibble tables, ``(v << 4k) * x^1024`` at
    ``16k + v``, then ``x^(-32c)`` for each lane ``c``: what brings lane c's accumulator, 4c bytes
    past its segment's last row, back to it."""
    x1024 = x_pow(1024)
    tables = [gf_mul(v << (4 * k), x1024) for k in range(8) for v in range(16)]
    lanes = [x_pow(-32 * c) for c in range(LANES)]
    out = np.array(tables + lanes, dtype=np.uint32)
    out.flags.writeable = False
    return out


@functools.cache
def _unshifts() -> np.ndarray:
    """``x^(-8t)`` for t = 0..255: a segment ends t bytes before the end of its last row."""
    return np.array([x_pow(-8 * t) for t in range(256)], dtype=np.uint32)


_powers = np.array([_ONE], dtype=np.uint32)  # x^(1024 * PIECE_ROWS * k) at k, grown on demand
_powers_lock = threading.Lock()


def _piece_shifts(k: np.ndarray) -> np.ndarray:
    """``x^(1024 * PIECE_ROWS * k)``: a piece with ``k`` full pieces after it in its segment."""
    global _powers
    need = int(k.max(initial=0)) + 1
    with _powers_lock:
        while len(_powers) < need:  # doubling: [0, n) times x^(piece bits * n) is [n, 2n)
            _powers = np.concatenate([_powers, _mul_by(_powers, x_pow(8 * PIECE_BYTES * len(_powers)))])
        powers = _powers
    return powers[k]


# ---------------------------------------------------------------------------------------------
# Tables.

def check_segments(segments: Sequence[GpuSegment]) -> None:
    """Every check of a table's arguments, in one place (``ValueError`` naming segment and limit).
    Nothing is required of a pointer's alignment: the kernel reads whole words only where they
    are aligned and inside the segment."""
    if not segments:
        raise ValueError("a CRC table needs at least one segment")
    if len(segments) > _MAX_SEGMENTS:
        raise ValueError(f"a CRC table holds at most {_MAX_SEGMENTS} segments, got {len(segments)}")
    for i, sg in enumerate(segments):
        if not isinstance(sg, GpuSegment):
            raise TypeError(f"segment {i} must be a GpuSegment, got {type(sg).__name__}")
        if not isinstance(sg.length, int) or not 0 <= sg.length <= _MAX_LENGTH:
            raise ValueError(f"segment {i}: length={sg.length!r} must be an integer between 0 and {_MAX_LENGTH}")
        if not isinstance(sg.ptr, int) or not 0 <= sg.ptr < (1 << 64) - sg.length:
            raise ValueError(f"segment {i}: ptr={sg.ptr!r} is not a device address")
        if sg.ptr == 0 and sg.length:
            raise ValueError(f"segment {i}: ptr is null")
        if not isinstance(sg.crc, int) or not 0 <= sg.crc < 1 << 32:
            raise ValueError(f"segment {i}: crc={sg.crc!r} is not a CRC-32C (an integer below 2^32)")


def pack_segments(segments: Sequence[GpuSegment]) -> tuple[np.ndarray, np.ndarray]:
    """The checked segments as the kernel's tables: ``SEG_DTYPE`` records (table order) and the
    ``PIECE_DTYPE`` records covering their rows (segment by segment; the first piece of each
    segment is the short one, so every other piece is PIECE_ROWS long and its shift a power of
    x^(1024 * PIECE_ROWS)). A segment's rows are those of its bytes and of its first four bytes
    (the inverted initial value of a segment shorter than four bytes runs past its end)."""
    check_segments(segments)
    segs = np.zeros(len(segments), dtype=SEG_DTYPE)
    segs["data"] = [sg.ptr for sg in segments]
    segs["length"] = [sg.length for sg in segments]
    segs["expected"] = [sg.crc for sg in segments]
    start = (segs["data"] % ROW_BYTES).astype(np.int64)
    length = segs["length"].astype(np.int64)
    rows = (start + np.maximum(length, 4) - 1) // ROW_BYTES + 1
    segs["unshift"] = _unshifts()[rows * ROW_BYTES - start - length]
    counts = (rows + PIECE_ROWS - 1) // PIECE_ROWS
    total = int(counts.sum())
    if total > _MAX_PIECES:
        raise ValueError(f"a CRC table covers at most {_MAX_PIECES} pieces of {PIECE_BYTES} bytes, got {total}")
    pieces = np.zeros(total, dtype=PIECE_DTYPE)
    seg = np.repeat(np.arange(len(segments), dtype=np.int64), counts)
    j = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)  # piece in segment
    after = np.repeat(counts, counts) - 1 - j  # full pieces after it
    seg_rows = np.repeat(rows, counts)
    pieces["seg"] = seg
    pieces["rows"] = np.where(j == 0, seg_rows - (np.repeat(counts, counts) - 1) * PIECE_ROWS, PIECE_ROWS)
    pieces["first_row"] = np.where(j == 0, 0, seg_rows - (after + 1) * PIECE_ROWS)
    pieces["shift"] = _piece_shifts(after)
    return segs, pieces


def mismatch_key(key: int) -> tuple[int, int]:
    """``(segment index, computed CRC-32C)`` of a set error word (``index << 32 | crc``)."""
    return key >> 32, key & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# CuPy side: loaded lazily.

@dataclass(eq=False)
class CrcTable(ErrorWordTable):
    """One extent's segments on the device, reusable for every launch (see GpuCrc); its error
    word: NO_MISMATCH, or the first bad (segment, CRC)."""

    device: int  # CUDA device the table, the staged bytes and the kernels live on
    segments: int  # how many (their order is the caller's: result() names one by index)
    pieces: int  # warps of launch 1: at least one per segment (an empty one has its initial value's row)
    descs: Any = field(repr=False)  # cupy uint8: SEG_DTYPE records
    piece_descs: Any = field(repr=False)  # cupy uint8: PIECE_DTYPE records
    acc: Any = field(repr=False)  # cupy uint32 [segments, 32]: the lanes' registers, zeroed per launch

    def __repr__(self) -> str:
        return f"<CrcTable device={self.device} segments={self.segments} pieces={self.pieces}>"


class GpuCrc:
    """Checks the CRC-32C of device-memory segments against the stored ones, one table at a time.

    ``launch`` is asynchronous on the given stream and allocates nothing; ``result`` waits for
    the launch (an event: microseconds once the kernels are done) and returns the first bad
    segment. A table must not be launched on two streams at once (it has one error word).
    """

    def __init__(self, device: int = 0):
        self._cp = _cupy()
        self.device = int(device)
        self._pieces = kernel_for(self.device, PIECES_KERNEL, KERNEL_FILE)
        self._verdict = kernel_for(self.device, VERDICT_KERNEL, KERNEL_FILE)
        with self._cp.cuda.Device(self.device):
            self._consts = self._cp.asarray(constants())
        self._streams: dict[int, Any] = {}  # handle -> cupy ExternalStream wrapper (no allocation)

    def __repr__(self) -> str:
        return f"<GpuCrc device={self.device}>"

    def make_table(self, segments: Sequence[GpuSegment]) -> CrcTable:
        """Check ``segments`` and upload their tables (slow-ish: once per layer and buffer set)."""
        segs, pieces = pack_segments(segments)
        cp = self._cp
        with cp.cuda.Device(self.device):
            d_segs = cp.asarray(segs.view(np.uint8))
            d_pieces = cp.asarray(pieces.view(np.uint8))
            acc = cp.zeros(len(segs) * LANES, dtype=np.uint32)
            word = ErrorWordTable.allocate(cp)
            cp.cuda.runtime.deviceSynchronize()  # the uploads above are complete before any launch
        return CrcTable(device=self.device, segments=len(segs), pieces=len(pieces), descs=d_segs,
                        piece_descs=d_pieces, acc=acc, **word)

    def launch(self, table: CrcTable, stream) -> None:
        """Check every segment of ``table`` on ``stream`` (asynchronous): enqueues the resets of
        the accumulators and the error word, both kernels, a copy of the error word to pinned host
        memory, an event. ``stream``: CuPy stream, ``torch.cuda.Stream`` or int handle."""
        handle, s = launch_stream(self._streams, self._cp, self.device, table.device, stream, "checker")
        cp = self._cp
        rt = cp.cuda.runtime
        warps = THREADS // LANES
        with cp.cuda.Device(self.device), s:
            rt.memsetAsync(table.acc.data.ptr, 0, table.acc.nbytes, handle)
            table.reset(rt, handle)
            self._pieces((-(-table.pieces // warps),), (THREADS,),
                         (table.descs, table.piece_descs, np.uint32(table.pieces), self._consts, table.acc))
            self._verdict((-(-table.segments // warps),), (THREADS,),
                          (table.descs, np.uint32(table.segments), self._consts, table.acc, table.error))
            table.report(rt, handle, s)

    def result(self, table: CrcTable) -> tuple[int, int] | None:
        """Wait for the table's last launch: None when every segment matched, else ``(index,
        computed CRC-32C)`` of the first one that did not, in table order."""
        key = table.reported("result")
        return None if key == NO_MISMATCH else mismatch_key(key)
