"""How a tensor is stored: dense, or bitmap + packed values + tile offsets. The spec in code.

``docs/format.md`` is the prose version of this module; the two are kept in step by the tests.

A tensor of ``n`` elements (row-major, flattened) is stored either

* ``dense``: its bytes as they are, or
* ``bitmap`` (codec ``raw``), three segments:

  - ``bitmap``: ``ceil(n / 32)`` little-endian uint32 words; bit ``j`` of word ``w`` is 1 when
    element ``32*w + j`` is non-zero. Bits past ``n`` in the last word are 0.
  - ``values``: the ``nnz`` non-zero elements in row-major order, in the tensor's own dtype.
  - ``tile_offsets``: ``ntiles + 1`` little-endian uint32, ``ntiles = ceil(n / TILE_ELEMS)``;
    entry ``t`` is the number of non-zeros before tile ``t`` (so entry 0 is 0 and the last is
    ``nnz``). A tile is ``TILE_ELEMS`` consecutive elements; with its offset any tile decodes on
    its own, which is what lets a GPU block or a CPU thread take one tile without a global scan.

Format v2 adds a second value codec for bitmap tensors, ``expdict`` (:mod:`endor_gds.codec.expdict`):
the values stream is replaced by residuals, exponent-dictionary codes and a per-tile escape list;
bitmap and tile offsets are unchanged. :func:`endor_gds.packing.policy.choose_storage` picks, per tensor, the
smallest of dense, bitmap + ``raw`` and bitmap + ``expdict``.

"Zero" is the all-zero *bit pattern*. The encoder and decoders only move bit patterns (as
unsigned integers of the element's width), so -0.0, NaN payloads, subnormals and infinities come
back bit-exactly.

The decoders here are the *reference*: plain numpy, written to be read. The fast ones (the C
decoder in csrc/, the CUDA kernel in cuda/) are tested bit-exactly against them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from endor_gds.errors import DecodeError

__all__ = [
    "PAGE",
    "TILE_ELEMS",
    "WORD_BITS",
    "DType",
    "DTYPES",
    "dtype_of",
    "bits_view",
    "pad_to_page",
    "num_tiles",
    "Encoded",
    "encode_bitmap",
    "decode_bitmap_reference",
    "check_tile_offsets",
    "segment_nbytes",
    "stored_nbytes",
    "choose_encoding",
    "break_even_density",
]

PAGE = 4096  # every segment starts at a multiple of this and is padded to it (O_DIRECT and GDS)
WORD_BITS = 32  # bitmap word width
TILE_ELEMS = 4096  # elements per tile: 128 bitmap words = one CUDA block of 128 threads
MAX_SPARSE_ELEMS = (1 << 32) - 1  # tile offsets are uint32, so nnz (and n) must fit


@dataclass(frozen=True)
class DType:
    """A tensor dtype as stored: safetensors name, size, torch dtype, and its bit-pattern view."""

    name: str
    itemsize: int
    torch: torch.dtype
    bits: np.dtype  # unsigned integer of the same width: decoders move bits, never values
    sparse: bool  # may be bitmap-encoded (floating point types the runtime computes in)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in [
        DType("F16", 2, torch.float16, np.dtype("<u2"), True),
        DType("BF16", 2, torch.bfloat16, np.dtype("<u2"), True),
        DType("F32", 4, torch.float32, np.dtype("<u4"), True),
        DType("F64", 8, torch.float64, np.dtype("<u8"), False),
        DType("I64", 8, torch.int64, np.dtype("<u8"), False),
        DType("I32", 4, torch.int32, np.dtype("<u4"), False),
        DType("I16", 2, torch.int16, np.dtype("<u2"), False),
        DType("I8", 1, torch.int8, np.dtype("u1"), False),
        DType("U8", 1, torch.uint8, np.dtype("u1"), False),
        DType("BOOL", 1, torch.bool, np.dtype("u1"), False),
    ]
}
_BY_TORCH = {d.torch: d for d in DTYPES.values()}


def dtype_of(x) -> DType:
    """The :class:`DType` of a torch dtype or a safetensors dtype name (``ValueError`` otherwise)."""
    d = _BY_TORCH.get(x) if isinstance(x, torch.dtype) else DTYPES.get(x)
    if d is None:
        supported = ", ".join(DTYPES)
        raise ValueError(f"unsupported dtype {x!r}; supported: {supported}")
    return d


def bits_view(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous CPU tensor's bit patterns (no copy)."""
    d = dtype_of(t.dtype)
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().view(d.bits)


def pad_to_page(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


def num_tiles(n: int) -> int:
    return -(-n // TILE_ELEMS)


@dataclass
class Encoded:
    """A bitmap-encoded tensor: the three segments, as numpy arrays."""

    bitmap: np.ndarray  # uint32 little-endian, ceil(n/32) words
    values: np.ndarray  # unsigned bit patterns of the non-zeros, nnz elements
    tile_offsets: np.ndarray  # uint32 little-endian, ntiles + 1
    n: int

    @property
    def nnz(self) -> int:
        return int(self.values.size)

    def segments(self) -> dict[str, np.ndarray]:
        return {"bitmap": self.bitmap, "values": self.values, "tile_offsets": self.tile_offsets}


def encode_bitmap(bits: np.ndarray) -> Encoded:
    """Encode a flat array of bit patterns (uint16 or uint32)."""
    bits = np.ascontiguousarray(bits).reshape(-1)
    n = int(bits.size)
    if n > MAX_SPARSE_ELEMS:
        raise ValueError(f"a bitmap-encoded tensor holds at most {MAX_SPARSE_ELEMS} elements, got {n}")
    nonzero = bits != 0
    padded = np.zeros(-(-n // WORD_BITS) * WORD_BITS, dtype=bool)
    padded[:n] = nonzero
    bitmap = np.packbits(padded, bitorder="little").view("<u4")
    values = bits[nonzero]
    ntiles = num_tiles(n)
    tiled = np.zeros(ntiles * TILE_ELEMS, dtype=bool)
    tiled[:n] = nonzero
    per_tile = tiled.reshape(ntiles, TILE_ELEMS).sum(axis=1, dtype=np.uint64)
    tile_offsets = np.zeros(ntiles + 1, dtype="<u4")
    tile_offsets[1:] = np.cumsum(per_tile)
    return Encoded(bitmap=bitmap, values=values, tile_offsets=tile_offsets, n=n)


def check_tile_offsets(tile_offsets: np.ndarray, n: int, nnz: int, where: str = "tensor") -> None:
    """Raise :class:`DecodeError` unless the offsets are a valid table for ``n`` elements.

    Valid: ``ntiles + 1`` entries, first 0, last ``nnz``, non-decreasing, and no tile claiming
    more values than it has elements. Decoders may then index ``values`` by these offsets without
    reading out of bounds; a bitmap that disagrees with them is caught tile by tile while decoding.
    """
    ntiles = num_tiles(n)
    offs = np.asarray(tile_offsets)
    if offs.shape != (ntiles + 1,):
        raise DecodeError(f"{where}: tile offset table has {offs.size} entries, expected {ntiles + 1}")
    if int(offs[0]) != 0 or int(offs[-1]) != nnz:
        raise DecodeError(
            f"{where}: tile offsets must run from 0 to nnz={nnz}, got {int(offs[0])}..{int(offs[-1])}"
        )
    if ntiles:
        steps = np.diff(offs.astype(np.int64))
        bad = np.flatnonzero((steps < 0) | (steps > TILE_ELEMS))
        if bad.size:
            t = int(bad[0])
            raise DecodeError(
                f"{where}: tile {t} claims {int(steps[t])} values (offsets must be non-decreasing "
                f"and a tile holds at most {TILE_ELEMS})"
            )


def decode_bitmap_reference(
    bitmap: np.ndarray, values: np.ndarray, tile_offsets: np.ndarray, n: int, where: str = "tensor"
) -> np.ndarray:
    """Rebuild the flat bit patterns from the three segments (reference decoder).

    Raises :class:`DecodeError` when the bitmap, the values and the tile offsets disagree.
    """
    nwords = -(-n // WORD_BITS)
    if bitmap.size != nwords:
        raise DecodeError(f"{where}: bitmap has {bitmap.size} words, expected {nwords} for n={n}")
    check_tile_offsets(tile_offsets, n, int(values.size), where)
    mask = np.unpackbits(np.ascontiguousarray(bitmap).view(np.uint8), bitorder="little").view(bool)
    if mask[n:].any():
        raise DecodeError(f"{where}: bitmap has bits set past the last element (n={n})")
    mask = mask[:n]
    ntiles = num_tiles(n)
    tiled = np.zeros(ntiles * TILE_ELEMS, dtype=bool)
    tiled[:n] = mask
    per_tile = tiled.reshape(ntiles, TILE_ELEMS).sum(axis=1)
    bad = np.flatnonzero(per_tile != np.diff(tile_offsets.astype(np.int64)))
    if bad.size:
        t = int(bad[0])
        raise DecodeError(
            f"{where}: tile {t} has {int(per_tile[t])} bits set but its offsets claim "
            f"{int(tile_offsets[t + 1]) - int(tile_offsets[t])} values"
        )
    out = np.zeros(n, dtype=values.dtype)
    out[mask] = values
    return out


def segment_nbytes(encoding: str, n: int, nnz: int, itemsize: int, params=None) -> dict[str, int]:
    """Unpadded byte length of each segment of a tensor with this encoding, in file order.

    ``params``: the value codec's parameters (:class:`~endor_gds.codec.expdict.ExpDict` of a bitmap
    tensor, :class:`~endor_gds.codec.exphuff.ExpHuff` of a bitmap or a dense one), whose streams
    replace ``values`` (``data`` for a dense tensor); None for codec ``raw``.
    """
    if encoding not in ("dense", "bitmap"):
        raise ValueError(f"unknown encoding {encoding!r}")
    positions = {"bitmap": 4 * -(-n // WORD_BITS), "tile_offsets": 4 * (num_tiles(n) + 1)} \
        if encoding == "bitmap" else {}
    if params is not None:  # a dense tensor's stored values are all its elements
        return {**positions, **params.segment_nbytes(n, nnz if encoding == "bitmap" else n)}
    if encoding == "dense":
        return {"data": n * itemsize}
    return {"bitmap": positions["bitmap"], "values": nnz * itemsize, "tile_offsets": positions["tile_offsets"]}


def stored_nbytes(encoding: str, n: int, nnz: int, itemsize: int, params=None) -> int:
    """Bytes the tensor occupies in the file: its segments, each padded to a page."""
    return sum(pad_to_page(b) for b in segment_nbytes(encoding, n, nnz, itemsize, params).values())


def choose_encoding(dtype: DType, shape: tuple[int, ...], nnz: int) -> str:
    """``bitmap`` when allowed and strictly smaller on disk, else ``dense``.

    1-D tensors (norms, biases) are always dense: they are tiny and the runtime uses them as is.
    """
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if not dtype.sparse or len(shape) < 2 or n == 0 or n > MAX_SPARSE_ELEMS:
        return "dense"
    if stored_nbytes("bitmap", n, nnz, dtype.itemsize) < stored_nbytes("dense", n, nnz, dtype.itemsize):
        return "bitmap"
    return "dense"


def break_even_density(itemsize: int) -> float:
    """Density below which bitmap + values is smaller than dense (padding ignored).

    bitmap 1 bit + density * 8 * itemsize bits + 32 bits per tile  <  8 * itemsize bits
    → density < 1 - 1 / (8 * itemsize) - 4 / (TILE_ELEMS * itemsize).
    fp16/bf16: 0.9370, fp32: 0.9685.
    """
    return 1.0 - 1.0 / (8 * itemsize) - 4.0 / (TILE_ELEMS * itemsize)
