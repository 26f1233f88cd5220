"""GPU decoder: ``cuda/endor_decode.cu`` through CuPy, one kernel launch per layer.

The pipeline builds one :class:`DecodeTable` per (layer, buffer set) when a model is opened and
launches it for every token::

    dec = GpuDecoder(device=0)                       # compiles once per device (cached)
    table = dec.make_table([GpuItem(...), ...])      # checks + uploads the descriptors once
    dec.launch(table, stream)                        # async: no allocation, no host sync
    ...
    dec.check(table)                                 # waits; DecodeError naming tensor and tile

A :class:`GpuItem` is raw device pointers (the layer's segments inside a read buffer, and the
dense output buffer) plus sizes, and for a tensor with the expdict codec (format v2) a
:class:`GpuExpDict` with its streams and dictionary, for one with the exphuff codec (format v3) a
:class:`GpuExpHuff` with its streams and code lengths (a dense exphuff tensor has no bitmap and no
tile offsets: both pointers 0); items of all codecs mix in one table.
:meth:`GpuItem.from_arrays` builds one from CuPy arrays or torch CUDA tensors and checks their
sizes. Outputs are ordinary device memory: allocate them as torch
tensors and launch on ``torch.cuda.current_stream()`` (a ``torch.cuda.Stream`` is accepted as
is), and torch consumes them in stream order, with no extra synchronisation.

Only the CPU-side parts are importable without CuPy (options, dtype table, descriptor layout,
argument checks); CuPy loads at the first :class:`GpuDecoder`, and its absence is a
:class:`~endor_gds.errors.MissingDependencyError` naming the package.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from endor_gds._resources import data_dir
from endor_gds.codec.bitmap import DTYPES, MAX_SPARSE_ELEMS, TILE_ELEMS, WORD_BITS, num_tiles
from endor_gds.codec.expdict import MAX_INDEX_BITS, ExpDict
from endor_gds.codec.exphuff import CHUNKS_PER_TILE, MAX_CODE_BITS, ExpHuff, canonical_codes
from endor_gds.errors import DecodeError, MissingDependencyError

__all__ = [
    "KERNEL_FILE",
    "KERNEL_NAME",
    "NVRTC_OPTIONS",
    "nvcc_options",
    "kernel_source",
    "kernel_for",
    "launch_stream",
    "ELEM_BYTES",
    "elem_bytes",
    "THREADS",
    "ALIGNMENT",
    "DESC_DTYPE",
    "NO_ERROR",
    "REASONS",
    "GpuItem",
    "GpuExpDict",
    "GpuExpHuff",
    "huff_table",
    "huff_tables",
    "smem_bytes",
    "check_items",
    "pack_descriptors",
    "stage_bytes",
    "decode_error_key",
    "error_message",
    "DecodeTable",
    "GpuDecoder",
    "stream_handle",
    "gpu_available",
]

KERNEL_FILE = "endor_decode.cu"
KERNEL_NAME = "endor_decode_bitmap"

# NVRTC options of the run-time compile. tests/decode/test_cuda_compile.py compiles the same source with
# nvcc using nvcc_options(NVRTC_OPTIONS), so CI builds exactly what a GPU host will run.
# (CuPy adds -arch for the device it compiles for.)
NVRTC_OPTIONS: tuple[str, ...] = (
    "--std=c++17",
    f"-DENDOR_TILE_ELEMS={TILE_ELEMS}",  # the kernel's block layout is tied to format.TILE_ELEMS
    "--generate-line-info",  # source lines in profiler reports (Nsight Compute); no run-time cost
)
# NVRTC option -> nvcc spelling; an option missing here fails nvcc_options() (and the compile
# test) until its nvcc equivalent is written down.
_NVCC_SPELLING = {"--std=c++17": "-std=c++17", "--generate-line-info": "-lineinfo"}

# Decoding moves bit patterns, so the kernel has one path per element size: fp16 and bf16 share
# the 2-byte path, fp32 the 4-byte one. Keys are safetensors dtype names (format.DTYPES).
ELEM_BYTES: dict[str, int] = {"F16": 2, "BF16": 2, "F32": 4}

THREADS = TILE_ELEMS // WORD_BITS  # 128 threads per block: one per bitmap word of a tile
STAGE_SLACK = 16  # staging window alignment slack in bytes (endor::kStageSlack)
_MAX_DESCS = 1 << 24  # the error word has 24 bits for the descriptor index
_MAX_GRID = (1 << 31) - 1  # gridDim.x limit: one block per tile of the table

# Pointer alignment the kernel relies on (bytes): 4-byte word loads for bitmap, tile and escape
# offsets, 16-byte vector loads of values and codes (never starting before the segment), 16-byte
# output stores, element loads of escape positions (2) and escape values (elem_bytes, None here).
# Exphuff: tile bits 4, chunk bits 2, the bits stream and the decode table 16 (staged like values).
ALIGNMENT: dict[str, int | None] = {"bitmap": 4, "values": 16, "tile_offsets": 4, "out": 16,
                                    "codes": 16, "escape_offsets": 4, "escape_positions": 2,
                                    "escape_values": None, "bits": 16, "tile_bits": 4,
                                    "chunk_bits": 2, "huff_tables": 16}
CODEC_IDS = {"raw": 0, "expdict": 1, "exphuff": 2}  # endor::Codec
HUFF_TABLE_ENTRIES = 1 << MAX_CODE_BITS  # endor decode table: one u16 per value of the next 12 bits

# Byte layout of `struct endor::Desc` (cuda/endor_decode.cu); the emulation test compares it with
# the compiled struct's offsetof/sizeof.
DESC_DTYPE = np.dtype([
    ("bitmap", "<u8"),
    ("values", "<u8"),
    ("values_capacity", "<u8"),
    ("tile_offsets", "<u8"),
    ("out", "<u8"),
    ("n", "<u8"),
    ("nnz", "<u8"),
    ("first_tile", "<u8"),
    ("elem_bytes", "<u4"),
    ("codec", "<u4"),
    ("codes", "<u8"),
    ("codes_capacity", "<u8"),
    ("escape_offsets", "<u8"),
    ("escape_positions", "<u8"),
    ("escape_values", "<u8"),
    ("escapes", "<u8"),
    ("index_bits", "<u4"),
    ("man_bits", "<u4"),
    ("exponents", "u1", (16,)),
    ("bits", "<u8"),
    ("bits_capacity", "<u8"),
    ("tile_bits", "<u8"),
    ("chunk_bits", "<u8"),
    ("huff_table", "<u8"),
    ("nbits", "<u8"),
    ("exp_bits", "<u4"),
    ("reserved", "<u4"),
])

NO_ERROR = (1 << 64) - 1  # the error word before a launch, and after one where every tile passed
# endor::Reason codes -> what the message says about the tile.
REASONS: dict[int, str] = {
    1: f"its tile offsets are out of range (need non-decreasing offsets from 0 to nnz, at most "
       f"{TILE_ELEMS} values per tile)",
    2: "bits are set past the tensor's last element",
    3: "its number of set bits differs from its tile offsets",
    4: "its escape table is out of range (need non-decreasing escape offsets from 0 to escapes, "
       "at most one escape per value, positions strictly increasing below the tile's value count)",
    5: "its exponent codes do not decode (need tile bit offsets from 0 to the stream's length, "
       "chunk offsets non-decreasing within the tile, empty chunks at its end, every code in the "
       "code table, and each chunk's codes ending where the next chunk starts)",
}


def nvcc_options(options: Sequence[str] = NVRTC_OPTIONS) -> list[str]:
    """The nvcc spelling of NVRTC ``options`` (``-D`` defines are spelled the same)."""
    out = []
    for opt in options:
        if opt.startswith("-D"):
            out.append(opt)
        elif opt in _NVCC_SPELLING:
            out.append(_NVCC_SPELLING[opt])
        else:
            raise ValueError(f"no nvcc spelling known for NVRTC option {opt!r}; add it to "
                             f"endor_gds.decode.gpu._NVCC_SPELLING")
    return out


def kernel_source(file: str = KERNEL_FILE) -> str:
    """The text of ``cuda/<file>`` as shipped (repository or installed wheel); by default the decoder's."""
    return (data_dir("cuda") / file).read_text(encoding="utf-8")


def elem_bytes(dtype) -> int:
    """Element size of a bitmap-decodable dtype (safetensors name or torch dtype).

    ``ValueError`` naming the dtype for anything else (dense-only or unknown dtypes).
    """
    name = dtype if isinstance(dtype, str) else None
    if name is None:
        name = next((d.name for d in DTYPES.values() if d.torch == dtype), None)
    if name not in ELEM_BYTES:
        raise ValueError(f"dtype {dtype!r} cannot be bitmap-decoded on the GPU; supported: "
                         f"{', '.join(ELEM_BYTES)} (torch.float16, torch.bfloat16, torch.float32)")
    return ELEM_BYTES[name]


def stage_bytes(max_elem_bytes: int) -> int:
    """Dynamic shared memory of a raw tile: its values, aligned (endor::stage_bytes)."""
    return TILE_ELEMS * max_elem_bytes + STAGE_SLACK


@dataclass(frozen=True)
class GpuExpDict:
    """The expdict streams of a :class:`GpuItem` (whose ``values_ptr`` points at the residuals)."""

    params: ExpDict  # index width, dictionary, escape count, float layout (expdict.py)
    codes_ptr: int  # packed fields; 16-byte aligned (0 allowed when capacity is 0)
    codes_capacity: int  # bytes readable at codes_ptr, >= ceil(nnz * field_bits / 8)
    escape_offsets_ptr: int  # ceil(n/4096) + 1 uint32; 4-byte aligned
    escape_positions_ptr: int  # params.escapes uint16 (0 allowed when there are none)
    escape_values_ptr: int  # params.escapes elements (0 allowed when there are none)


@dataclass(frozen=True)
class GpuExpHuff:
    """The exphuff streams of a :class:`GpuItem` (whose ``values_ptr`` points at the residuals)."""

    params: ExpHuff  # float layout, code length per exponent, stream length in bits (bound: not None)
    bits_ptr: int  # the MSB-first code stream; 16-byte aligned (0 allowed when capacity is 0)
    bits_capacity: int  # bytes readable at bits_ptr, >= ceil(params.nbits / 8)
    tile_bits_ptr: int  # ceil(n/4096) + 1 uint32; 4-byte aligned
    chunk_bits_ptr: int  # 7 * ceil(n/4096) uint16; 2-byte aligned


@dataclass(frozen=True)
class GpuItem:
    """One tensor to decode: device pointers and sizes (see docs/format.md, section 1)."""

    bitmap_ptr: int  # ceil(n/32) uint32 words; 4-byte aligned (0: a dense exphuff tensor)
    values_ptr: int  # raw: packed values; expdict, exphuff: residuals; 16-byte aligned (0 if capacity 0)
    values_capacity: int  # bytes readable at values_ptr (padded segment): >= nnz * elem_bytes
    tile_offsets_ptr: int  # ceil(n/4096) + 1 uint32; 4-byte aligned (0: a dense exphuff tensor)
    out_ptr: int  # n * elem_bytes dense output; 16-byte aligned, not overlapping any input
    n: int  # elements, 1 <= n <= 2^32 - 1
    nnz: int  # packed values, <= n
    elem_bytes: int  # 2 (fp16, bf16) or 4 (fp32); see elem_bytes()
    label: str = "tensor"  # named in errors (the tensor's name in the manifest)
    expdict: GpuExpDict | None = None  # codec expdict (format v2); None: raw values
    exphuff: GpuExpHuff | None = None  # codec exphuff (format v3); at most one of the two

    @property
    def dense(self) -> bool:
        """A dense exphuff tensor: no bitmap, no tile offsets, every element a value."""
        return self.exphuff is not None and self.bitmap_ptr == 0 and self.tile_offsets_ptr == 0

    @classmethod
    def from_arrays(cls, bitmap, values, tile_offsets, out, *, label: str = "tensor",
                    expdict: ExpDict | None = None, exphuff: ExpHuff | None = None) -> GpuItem:
        """An item over CuPy arrays / torch CUDA tensors, with their sizes checked.

        ``out`` holds the ``n`` elements (its element size decides the path), ``values`` the
        ``nnz`` packed values of the same element size, ``bitmap`` and ``tile_offsets`` 4-byte
        words. With ``expdict`` (the tensor's parameters), ``values`` is a dict of its five
        streams (``expdict.STREAM_KINDS`` -> array); with ``exphuff`` (its bound parameters), a
        dict of its four (``exphuff.STREAM_KINDS``: residuals and bits bytes, tile_bits uint32,
        chunk_bits uint16), and ``bitmap`` and ``tile_offsets`` are both None for a dense tensor.
        All must be C-contiguous device memory.
        """
        y = _array_info(out, f"{label}: out")
        n, eb = y["size"], y["itemsize"]
        if eb not in (2, 4):
            raise ValueError(f"{label}: out has {eb}-byte elements; bitmap decoding supports 2 "
                             f"(fp16/bf16) and 4 (fp32)")
        if y["readonly"]:
            raise ValueError(f"{label}: out is read-only")
        if exphuff is not None:
            return cls._from_huff_arrays(bitmap, values, tile_offsets, y, label, exphuff)
        b, o = (_array_info(a, f"{label}: {name}") for a, name in
                ((bitmap, "bitmap"), (tile_offsets, "tile_offsets")))
        _check_bitmap_arrays(label, b, o, n)
        common = dict(bitmap_ptr=b["ptr"], tile_offsets_ptr=o["ptr"], out_ptr=y["ptr"], n=n,
                      elem_bytes=eb, label=label)
        if expdict is None:
            v = _array_info(values, f"{label}: values")
            if v["itemsize"] != eb:
                raise ValueError(f"{label}: values are {v['itemsize']}-byte, out is {eb}-byte")
            return cls(values_ptr=v["ptr"], values_capacity=v["size"] * eb, nnz=v["size"], **common)
        s = {k: _array_info(a, f"{label}: {k}") for k, a in values.items()}
        want = {"residuals": 1, "codes": 1, "escape_offsets": 4, "escape_positions": 2,
                "escape_values": eb}
        for k, size in want.items():
            if k not in s or s[k]["itemsize"] != size:
                raise ValueError(f"{label}: expdict stream {k} must be an array of {size}-byte items")
        nnz = s["residuals"]["size"] // expdict.layout.residual_bytes
        if s["escape_offsets"]["size"] != num_tiles(n) + 1 or \
                s["escape_positions"]["size"] != expdict.escapes or \
                s["escape_values"]["size"] != expdict.escapes:
            raise ValueError(f"{label}: escape_offsets must be {num_tiles(n) + 1} entries, escape "
                             f"positions and values {expdict.escapes}")
        ed = GpuExpDict(expdict, s["codes"]["ptr"], s["codes"]["size"], s["escape_offsets"]["ptr"],
                        s["escape_positions"]["ptr"], s["escape_values"]["ptr"])
        return cls(values_ptr=s["residuals"]["ptr"], values_capacity=s["residuals"]["size"],
                   nnz=nnz, expdict=ed, **common)

    @classmethod
    def _from_huff_arrays(cls, bitmap, values, tile_offsets, y: dict, label: str,
                          params: ExpHuff) -> GpuItem:
        n, eb = y["size"], y["itemsize"]
        if (bitmap is None) != (tile_offsets is None):
            raise ValueError(f"{label}: a dense exphuff tensor has neither bitmap nor tile_offsets; "
                             f"a sparse one both")
        bptr = optr = 0
        if bitmap is not None:
            b, o = (_array_info(a, f"{label}: {name}") for a, name in
                    ((bitmap, "bitmap"), (tile_offsets, "tile_offsets")))
            _check_bitmap_arrays(label, b, o, n)
            bptr, optr = b["ptr"], o["ptr"]
        s = {k: _array_info(a, f"{label}: {k}") for k, a in values.items()}
        want = {"residuals": 1, "bits": 1, "tile_bits": 4, "chunk_bits": 2}
        for k, size in want.items():
            if k not in s or s[k]["itemsize"] != size:
                raise ValueError(f"{label}: exphuff stream {k} must be an array of {size}-byte items")
        ntiles = num_tiles(n)
        if s["tile_bits"]["size"] != ntiles + 1 or s["chunk_bits"]["size"] != (CHUNKS_PER_TILE - 1) * ntiles:
            raise ValueError(f"{label}: tile_bits must be {ntiles + 1} entries, chunk_bits "
                             f"{(CHUNKS_PER_TILE - 1) * ntiles} for n={n}")
        eh = GpuExpHuff(params, s["bits"]["ptr"], s["bits"]["size"], s["tile_bits"]["ptr"],
                        s["chunk_bits"]["ptr"])
        return cls(bitmap_ptr=bptr, values_ptr=s["residuals"]["ptr"],
                   values_capacity=s["residuals"]["size"], tile_offsets_ptr=optr, out_ptr=y["ptr"],
                   n=n, nnz=s["residuals"]["size"] // params.layout.residual_bytes, elem_bytes=eb,
                   label=label, exphuff=eh)


def _check_bitmap_arrays(label: str, b: dict, o: dict, n: int) -> None:
    """``bitmap`` and ``tile_offsets`` (as _array_info gives them) fit a tensor of ``n`` elements."""
    words = -(-n // WORD_BITS)
    if b["itemsize"] != 4 or b["size"] != words:
        raise ValueError(f"{label}: bitmap must be {words} uint32 words for n={n}, got "
                         f"{b['size']} of {b['itemsize']} bytes")
    if o["itemsize"] != 4 or o["size"] != num_tiles(n) + 1:
        raise ValueError(f"{label}: tile_offsets must be {num_tiles(n) + 1} uint32 for n={n}, "
                         f"got {o['size']} of {o['itemsize']} bytes")


def _array_info(a, what: str) -> dict:
    """ptr, size, itemsize, readonly of a C-contiguous torch CUDA tensor or CUDA array interface."""
    import torch  # noqa: PLC0415 - a dependency; imported here to keep module import light

    if isinstance(a, torch.Tensor):  # before __cuda_array_interface__: torch has none for bf16
        if not a.is_cuda:
            raise ValueError(f"{what} is a CPU tensor; the GPU decoder needs device memory")
        if not a.is_contiguous():
            raise ValueError(f"{what} must be C-contiguous")
        return {"ptr": a.data_ptr(), "size": a.numel(), "itemsize": a.element_size(),
                "readonly": False}
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is None:
        raise TypeError(f"{what} must be a CuPy array or a torch CUDA tensor, got {type(a).__name__}")
    shape = tuple(cai["shape"])
    itemsize = np.dtype(cai["typestr"]).itemsize
    size = int(np.prod(shape, dtype=np.int64)) if shape else 1
    strides = cai.get("strides")
    if strides is not None and size > 1:
        expect, acc = [], itemsize
        for dim in reversed(shape):
            expect.append(acc)
            acc *= dim
        if tuple(s for s, d in zip(strides, shape) if d > 1) != \
                tuple(s for s, d in zip(reversed(expect), shape) if d > 1):
            raise ValueError(f"{what} must be C-contiguous")
    ptr, readonly = cai["data"]
    return {"ptr": int(ptr), "size": size, "itemsize": itemsize, "readonly": bool(readonly)}


def smem_bytes(item: GpuItem) -> int:
    """Dynamic shared memory a tile of ``item`` needs (endor::smem_bytes): raw, its values window;
    expdict, the rebuilt values, the residual window, the codes window (widest field) and the
    field table (one element per field value of the widest field)."""
    if item.exphuff is not None:
        return _huff_smem_bytes(item)
    if item.expdict is None:
        return stage_bytes(item.elem_bytes)
    layout = item.expdict.params.layout
    max_field_bits = MAX_INDEX_BITS + layout.high_bits
    codes_offset = TILE_ELEMS * item.elem_bytes + TILE_ELEMS * layout.residual_bytes + STAGE_SLACK
    table_offset = codes_offset + TILE_ELEMS // 8 * max_field_bits + 2 * 16
    return table_offset + (1 << max_field_bits) * item.elem_bytes


def _huff_smem_bytes(item: GpuItem) -> int:
    """Exphuff (endor::smem_bytes): the rebuilt values (the decode table before them), the residual
    window, the bits window (the longest units of 4096 values, 32 bytes of alignment, 16 bytes the
    bit readers may read past it), the units (8 chunks of 512 bytes, 16 apart)."""
    layout = item.exphuff.params.layout
    bits_offset = TILE_ELEMS * item.elem_bytes + TILE_ELEMS * layout.residual_bytes + STAGE_SLACK
    units_offset = bits_offset + TILE_ELEMS // 8 * (MAX_CODE_BITS + layout.high_bits) + 3 * 16
    return units_offset + CHUNKS_PER_TILE * (TILE_ELEMS // CHUNKS_PER_TILE + 16)


def huff_table(params: ExpHuff) -> np.ndarray:
    """The kernel's decode table of an exphuff code: for each value of the next 12 bits of the
    stream, ``exponent << 4 | code length`` (0 where no code starts with those bits), uint16[4096].
    Canonical codes (exphuff.canonical_codes); ``ValueError`` unless ``params.check()`` passes."""
    params.check()
    lengths = np.asarray(params.lengths, dtype=np.int64)
    codes = canonical_codes(lengths)
    table = np.zeros(HUFF_TABLE_ENTRIES, dtype="<u2")
    for sym in np.flatnonzero(lengths):
        free = MAX_CODE_BITS - int(lengths[sym])  # bits after the code: every continuation
        lo = int(codes[sym]) << free
        table[lo:lo + (1 << free)] = sym << 4 | int(lengths[sym])
    return table


def huff_tables(items: Sequence[GpuItem]) -> np.ndarray:
    """The decode tables of the exphuff items, in table order (uint16 ``[k, 4096]``): uploaded
    by make_table, whose address pack_descriptors writes into their descriptors."""
    tables = [huff_table(it.exphuff.params) for it in items if it.exphuff is not None]
    return np.stack(tables) if tables else np.zeros((0, HUFF_TABLE_ENTRIES), dtype="<u2")


def _check_pointers(where: str, ptrs: dict[str, tuple[int, int]], elem_bytes: int) -> None:
    """Each ``name: (pointer, bytes behind it)`` is a device address aligned as the kernel loads
    it; null only where nothing is read."""
    for name, (ptr, size) in ptrs.items():
        if not isinstance(ptr, int) or ptr < 0 or ptr >= 1 << 64:
            raise ValueError(f"{where}: {name}_ptr={ptr!r} is not a device address")
        if ptr == 0 and size:
            raise ValueError(f"{where}: {name}_ptr is null")
        align = ALIGNMENT[name] or elem_bytes
        if ptr % align:
            raise ValueError(f"{where}: {name}_ptr={ptr:#x} must be {align}-byte aligned")


def _check_expdict(where: str, it: GpuItem) -> None:
    ed = it.expdict
    if not isinstance(ed, GpuExpDict):
        raise TypeError(f"{where}: expdict must be a GpuExpDict, got {type(ed).__name__}")
    p = ed.params
    try:
        p.check()
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if p.layout.itemsize != it.elem_bytes:
        raise ValueError(f"{where}: expdict values of {p.layout.name} are {p.layout.itemsize}-byte, "
                         f"elem_bytes={it.elem_bytes}")
    need = p.stream_nbytes(it.nnz)
    if it.values_capacity < need["residuals"] or ed.codes_capacity < need["codes"]:
        raise ValueError(f"{where}: {it.nnz} values need {need['residuals']} residual and "
                         f"{need['codes']} code bytes, got capacities {it.values_capacity} and "
                         f"{ed.codes_capacity}")
    if not 0 <= p.escapes <= it.nnz:
        raise ValueError(f"{where}: escapes={p.escapes} must be between 0 and nnz={it.nnz}")
    _check_pointers(where, {"codes": (ed.codes_ptr, ed.codes_capacity),
                            "escape_offsets": (ed.escape_offsets_ptr, 1),
                            "escape_positions": (ed.escape_positions_ptr, p.escapes),
                            "escape_values": (ed.escape_values_ptr, p.escapes)}, it.elem_bytes)


def _check_exphuff(where: str, it: GpuItem) -> None:
    eh = it.exphuff
    if not isinstance(eh, GpuExpHuff):
        raise TypeError(f"{where}: exphuff must be a GpuExpHuff, got {type(eh).__name__}")
    if it.expdict is not None:
        raise ValueError(f"{where}: an item has one value codec: expdict or exphuff, not both")
    p = eh.params
    try:
        p.check()
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if p.nbits is None:
        raise ValueError(f"{where}: the exphuff code is bound to no stream (nbits is None)")
    if p.layout.itemsize != it.elem_bytes:
        raise ValueError(f"{where}: exphuff values of {p.layout.name} are {p.layout.itemsize}-byte, "
                         f"elem_bytes={it.elem_bytes}")
    residuals, bits = it.nnz * p.layout.residual_bytes, -(-p.nbits // 8)
    if it.values_capacity < residuals or eh.bits_capacity < bits:
        raise ValueError(f"{where}: {it.nnz} values need {residuals} residual bytes and the "
                         f"{p.nbits}-bit stream {bits} bytes, got capacities {it.values_capacity} "
                         f"and {eh.bits_capacity}")
    if (it.bitmap_ptr == 0) != (it.tile_offsets_ptr == 0):
        raise ValueError(f"{where}: a dense exphuff tensor has neither bitmap_ptr nor "
                         f"tile_offsets_ptr (both 0); a sparse one both")
    if it.dense and it.nnz != it.n:
        raise ValueError(f"{where}: a dense exphuff tensor (no bitmap) stores all n={it.n} "
                         f"elements, got nnz={it.nnz}")
    _check_pointers(where, {"bits": (eh.bits_ptr, eh.bits_capacity), "tile_bits": (eh.tile_bits_ptr, 1),
                            "chunk_bits": (eh.chunk_bits_ptr, 1)}, it.elem_bytes)


def check_items(items: Sequence[GpuItem]) -> None:
    """Every check of a table's arguments, in one place (``ValueError`` naming item and limit).

    These are the facts the kernel takes for granted (cuda/endor_decode.cu, "Safety"); what comes
    from the file (bitmap, tile offsets) is checked by the kernel itself.
    """
    if not items:
        raise ValueError("a decode table needs at least one tensor")
    if len(items) > _MAX_DESCS:
        raise ValueError(f"a decode table holds at most {_MAX_DESCS} tensors, got {len(items)}")
    total = 0
    for i, it in enumerate(items):
        if not isinstance(it, GpuItem):
            raise TypeError(f"item {i} must be a GpuItem, got {type(it).__name__}")
        where = f"item {i} ({it.label})"
        if it.elem_bytes not in (2, 4):
            raise ValueError(f"{where}: elem_bytes={it.elem_bytes}; the kernel decodes 2-byte "
                             f"(fp16/bf16) and 4-byte (fp32) elements")
        if not 1 <= it.n <= MAX_SPARSE_ELEMS:
            raise ValueError(f"{where}: n={it.n} must be between 1 and {MAX_SPARSE_ELEMS}")
        if not 0 <= it.nnz <= it.n:
            raise ValueError(f"{where}: nnz={it.nnz} must be between 0 and n={it.n}")
        raw = it.expdict is None and it.exphuff is None
        if raw and it.values_capacity < it.nnz * it.elem_bytes:
            raise ValueError(f"{where}: values_capacity={it.values_capacity} bytes is less than "
                             f"nnz * elem_bytes = {it.nnz * it.elem_bytes}")
        if it.exphuff is not None:  # first: whether bitmap and tile offsets may be null
            _check_exphuff(where, it)
        sparse = 0 if it.dense else 1  # bytes behind bitmap and tile offsets: none when dense
        _check_pointers(where, {"bitmap": (it.bitmap_ptr, sparse), "values": (it.values_ptr, it.values_capacity),
                                "tile_offsets": (it.tile_offsets_ptr, sparse), "out": (it.out_ptr, 1)},
                        it.elem_bytes)
        if it.expdict is not None:
            _check_expdict(where, it)
        total += num_tiles(it.n)
    if total > _MAX_GRID:
        raise ValueError(f"a decode table covers at most {_MAX_GRID} tiles (one block each), "
                         f"got {total}")


def pack_descriptors(items: Sequence[GpuItem], huff_tables_ptr: int = 0) -> np.ndarray:
    """The checked items as the kernel's descriptor array (``DESC_DTYPE``, table order).

    ``huff_tables_ptr``: the device address of :func:`huff_tables` ``(items)`` (16-byte aligned);
    the k-th exphuff item's descriptor points at its table, ``huff_tables_ptr + 8192 * k``. 0
    leaves those pointers null: only for looking at descriptors, never for a launch.
    """
    check_items(items)
    if huff_tables_ptr % ALIGNMENT["huff_tables"] or huff_tables_ptr < 0:
        raise ValueError(f"huff_tables_ptr={huff_tables_ptr:#x} must be a 16-byte aligned device address")
    descs = np.zeros(len(items), dtype=DESC_DTYPE)
    first, huff = 0, 0
    for d, it in zip(descs, items):
        d["bitmap"], d["values"], d["values_capacity"] = it.bitmap_ptr, it.values_ptr, it.values_capacity
        d["tile_offsets"], d["out"] = it.tile_offsets_ptr, it.out_ptr
        d["n"], d["nnz"], d["first_tile"], d["elem_bytes"] = it.n, it.nnz, first, it.elem_bytes
        if it.expdict is not None:
            ed, p = it.expdict, it.expdict.params
            d["codec"] = CODEC_IDS["expdict"]
            d["codes"], d["codes_capacity"] = ed.codes_ptr, ed.codes_capacity
            d["escape_offsets"], d["escape_positions"] = ed.escape_offsets_ptr, ed.escape_positions_ptr
            d["escape_values"], d["escapes"] = ed.escape_values_ptr, p.escapes
            d["index_bits"], d["man_bits"] = p.index_bits, p.layout.man_bits
            d["exponents"][: len(p.exponents)] = p.exponents
        if it.exphuff is not None:
            eh, p = it.exphuff, it.exphuff.params
            d["codec"], d["man_bits"], d["exp_bits"] = CODEC_IDS["exphuff"], p.layout.man_bits, p.layout.exp_bits
            d["bits"], d["bits_capacity"], d["nbits"] = eh.bits_ptr, eh.bits_capacity, p.nbits
            d["tile_bits"], d["chunk_bits"] = eh.tile_bits_ptr, eh.chunk_bits_ptr
            d["huff_table"] = huff_tables_ptr + 2 * HUFF_TABLE_ENTRIES * huff if huff_tables_ptr else 0
            huff += 1
        first += num_tiles(it.n)
    return descs


def decode_error_key(key: int) -> tuple[int, int, int]:
    """``(descriptor index, tile, reason)`` of a set error word (``desc << 40 | tile << 8 | reason``)."""
    return key >> 40, (key >> 8) & ((1 << 32) - 1), key & 0xFF


def error_message(items: Sequence[GpuItem], key: int) -> str:
    """The :class:`DecodeError` text for a set error word."""
    desc, tile, reason = decode_error_key(key)
    it = items[desc]
    first = tile * TILE_ELEMS
    last = min(it.n, first + TILE_ELEMS) - 1
    what = "cannot be decoded" if reason == 5 else "disagrees with its tile offsets or bitmap"
    return (f"{it.label}: tile {tile} (elements {first}..{last}) {what}: {REASONS[reason]} "
            f"(corrupted file? run `endor-gds verify`); the outputs of this launch must not be used")


# ---------------------------------------------------------------------------------------------
# CuPy side: loaded lazily.

def _cupy():
    try:
        import cupy  # noqa: PLC0415 - GPU library, loaded on first use only
    except Exception as exc:  # ImportError, or a CUDA library error raised while importing
        raise MissingDependencyError(
            f"the GPU decoder and checks need CuPy and a CUDA driver ({type(exc).__name__}: {exc}); install "
            f"it with: pip install 'endor_gds[gpu]' (cupy-cuda13x)"
        ) from exc
    return cupy


def gpu_available() -> tuple[bool, str]:
    """``(True, device name)`` when CuPy loads and sees a GPU, else ``(False, why not)``."""
    try:
        cp = _cupy()
        count = cp.cuda.runtime.getDeviceCount()
    except MissingDependencyError as exc:
        return False, str(exc)
    except Exception as exc:  # noqa: BLE001 - cudaErrorNoDevice / InsufficientDriver etc.
        return False, f"{type(exc).__name__}: {exc}"
    if count < 1:
        return False, "no CUDA device"
    name = cp.cuda.runtime.getDeviceProperties(0)["name"]
    return True, name.decode() if isinstance(name, bytes) else str(name)


_modules: dict[tuple[int, str, str | None], Any] = {}  # one RawModule per file: its kernels share it
_kernels: dict[tuple[int, str, str | None, str], Any] = {}
_kernels_lock = threading.Lock()


def kernel_for(device: int, name: str = KERNEL_NAME, file: str = KERNEL_FILE, source: str | None = None):
    """Kernel ``name`` of ``cuda/<file>`` (of ``source`` text instead, when given) for ``device``,
    built with ``NVRTC_OPTIONS``: NVRTC once per device and source in a process (CuPy also keeps
    an on-disk cache), then reused. The one place kernels are loaded (the decoder, the GPU check)."""
    with _kernels_lock:
        fn = _kernels.get((device, file, source, name))
        if fn is None:
            cp = _cupy()
            with cp.cuda.Device(device):
                module = _modules.get((device, file, source))
                if module is None:
                    module = _modules[(device, file, source)] = cp.RawModule(
                        code=kernel_source(file) if source is None else source, options=NVRTC_OPTIONS)
                fn = module.get_function(name)
            _kernels[(device, file, source, name)] = fn
        return fn


def launch_stream(streams: dict, cp, device: int, table_device: int, stream, what: str) -> tuple[int, Any]:
    """The handle of the explicit ``stream`` (CuPy's, torch's or an int) a launch of a table built
    on ``table_device`` goes on, by the ``what`` of ``device``, and CuPy's wrapper of it, made once
    per handle and kept in ``streams`` so that a launch allocates nothing."""
    if table_device != device:
        raise ValueError(f"table lives on device {table_device}, this {what} on {device}")
    if stream is None:
        raise TypeError("launch() needs an explicit stream (e.g. torch.cuda.current_stream())")
    handle = stream_handle(stream)
    s = streams.get(handle)
    if s is None:
        s = streams[handle] = cp.cuda.ExternalStream(handle, device)
    return handle, s


def stream_handle(stream) -> int:
    """The ``cudaStream_t`` of a CuPy stream, a ``torch.cuda.Stream`` or a raw int handle."""
    if isinstance(stream, bool):
        raise TypeError("stream must be a CuPy stream, a torch.cuda.Stream or an int handle, got a bool")
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream / ExternalStream
        handle = getattr(stream, attr, None)
        if isinstance(handle, int):
            return handle
    raise TypeError(f"stream must be a CuPy stream, a torch.cuda.Stream or an int handle, got "
                    f"{type(stream).__name__}")


@dataclass(eq=False, kw_only=True)
class ErrorWordTable:
    """How a table's launches report: an 8-byte word on the device into which the kernels
    ``atomicMin`` their first failure (all ones: none), reset before the kernels, copied after them
    to a pinned host word, and an event recorded after that copy, which the host waits on. The
    decoder's tables and the GPU check's (:mod:`endor_gds.decode.gpu_crc`) both report this way."""

    error: Any = field(repr=False)  # cupy uint64[1]: all ones, or the first failure's key
    host_error: np.ndarray = field(repr=False)  # pinned uint64[1]: copy of `error` after a launch
    done: Any = field(repr=False)  # cupy Event recorded after that copy
    pinned: Any = field(repr=False)  # the pinned allocation behind host_error (kept alive here)
    launched: bool = False  # whether there is a launch to look at

    @staticmethod
    def allocate(cp) -> dict:
        """The word, its pinned host copy and the event, on CuPy's current device (at table time:
        a pinned allocation is slow-ish); pass them to the table's constructor."""
        pinned = cp.cuda.alloc_pinned_memory(8)
        host_error = np.frombuffer(pinned, dtype=np.uint64, count=1)
        host_error[0] = NO_ERROR
        return dict(error=cp.asarray(np.array([NO_ERROR], dtype=np.uint64)), host_error=host_error,
                    done=cp.cuda.Event(block=False, disable_timing=True), pinned=pinned)

    def reset(self, rt, handle: int) -> None:
        """Enqueue on ``handle``, before the kernels: the word back to all ones."""
        rt.memsetAsync(self.error.data.ptr, 0xFF, 8, handle)

    def report(self, rt, handle: int, stream) -> None:
        """Enqueue on ``handle`` (``stream`` its CuPy stream), after the kernels: the copy to the
        host word and the event."""
        rt.memcpyAsync(self.host_error.ctypes.data, self.error.data.ptr, 8, rt.memcpyDeviceToHost, handle)
        self.done.record(stream)
        self.launched = True

    def reported(self, call: str) -> int:
        """Wait for the last launch's copy: its word (``call`` names the caller for the error)."""
        if not self.launched:
            raise RuntimeError(f"{self!r} has not been launched; call launch() before {call}()")
        self.done.synchronize()
        return int(self.host_error[0])


@dataclass(eq=False)
class DecodeTable(ErrorWordTable):
    """One layer's descriptors on the device, reusable for every launch (see GpuDecoder); its
    error word: NO_ERROR, or the first bad (desc, tile, reason)."""

    device: int  # CUDA device the table, the buffers and the kernel live on
    items: tuple[GpuItem, ...]  # in table order (error messages name their labels)
    total_tiles: int  # grid size: one block per tile
    smem_bytes: int  # dynamic shared memory per block: the largest smem_bytes() of the items
    descs: Any = field(repr=False)  # cupy uint8 array: the packed DESC_DTYPE records
    args: tuple = field(repr=False)  # kernel arguments, built once
    huff_tables: Any = field(repr=False, default=None)  # cupy uint16 [k, 4096]: exphuff decode tables

    def __repr__(self) -> str:
        return (f"<DecodeTable device={self.device} tensors={len(self.items)} "
                f"tiles={self.total_tiles} smem={self.smem_bytes}B>")


class GpuDecoder:
    """Rebuilds dense tensors on one GPU from bitmap + values + tile offsets (one launch per table).

    ``launch`` is asynchronous on the given stream and allocates nothing; ``check`` waits for the
    launch and raises :class:`~endor_gds.errors.DecodeError` for a corrupted tensor. A table must
    not be launched on two streams at once (it has one error word). ``source``: the text of
    another version of the kernel file (same ``Desc`` layout and arguments) to build instead of
    the packaged one, for a benchmark to compare two versions in one process.
    """

    def __init__(self, device: int = 0, source: str | None = None):
        if source is not None and ('extern "C" __global__' not in source or
                                   f" {KERNEL_NAME}(" not in source):
            raise ValueError(f"a kernel source for GpuDecoder must define extern \"C\" __global__ "
                             f"{KERNEL_NAME}(...) with the Desc table of {KERNEL_FILE}")
        self.source = source
        self._cp = _cupy()
        self.device = int(device)
        self._kernel = kernel_for(self.device, source=source)
        self._streams: dict[int, Any] = {}  # handle -> cupy ExternalStream wrapper (no allocation)

    def __repr__(self) -> str:
        built = "" if self.source is None else " source=given"
        return f"<GpuDecoder device={self.device} kernel={KERNEL_NAME}{built}>"

    def make_table(self, items: Sequence[GpuItem]) -> DecodeTable:
        """Check ``items`` and upload their descriptors (slow-ish: once per layer and buffer set)."""
        items = tuple(items)
        check_items(items)  # all argument checks happen here
        cp = self._cp
        with cp.cuda.Device(self.device):
            tables = huff_tables(items)  # the exphuff codes' decode tables, 8 KB each
            d_tables = cp.asarray(tables) if len(tables) else None
            descs = pack_descriptors(items, 0 if d_tables is None else d_tables.data.ptr)
            d_descs = cp.asarray(descs.view(np.uint8))
            word = ErrorWordTable.allocate(cp)
            cp.cuda.runtime.deviceSynchronize()  # the uploads above are complete before any launch
        total = int(descs["first_tile"][-1]) + num_tiles(items[-1].n)
        smem = max(smem_bytes(it) for it in items)
        args = (d_descs, np.uint32(len(items)), word["error"])
        return DecodeTable(device=self.device, items=items, total_tiles=total, smem_bytes=smem,
                           descs=d_descs, args=args, huff_tables=d_tables, **word)

    def launch(self, table: DecodeTable, stream) -> None:
        """Decode every tensor of ``table`` on ``stream`` (asynchronous; one kernel launch).

        Enqueues: reset of the error word, the kernel, a copy of the error word to pinned host
        memory, an event. ``stream``: CuPy stream, ``torch.cuda.Stream`` or int handle.
        """
        handle, s = launch_stream(self._streams, self._cp, self.device, table.device, stream, "decoder")
        cp = self._cp
        rt = cp.cuda.runtime
        with cp.cuda.Device(self.device), s:
            table.reset(rt, handle)
            self._kernel((table.total_tiles,), (THREADS,), table.args, shared_mem=table.smem_bytes)
            table.report(rt, handle, s)

    def check(self, table: DecodeTable) -> None:
        """Wait for the table's last launch; ``DecodeError`` naming tensor and tile if one was bad."""
        key = table.reported("check")
        if key != NO_ERROR:
            raise DecodeError(error_message(table.items, key))

    def decode(self, items: Sequence[GpuItem], stream=None) -> None:
        """make_table + launch + check, for tests and benchmarks.

        ``stream=None`` means torch's current stream on this device (so the outputs are ordered
        before whatever torch runs next), or CuPy's current stream where torch has no CUDA.
        """
        table = self.make_table(items)
        if stream is None:
            import torch  # noqa: PLC0415 - heavy, and only needed here on first use

            if torch.cuda.is_available():
                stream = torch.cuda.current_stream(self.device)
            else:
                with self._cp.cuda.Device(self.device):
                    stream = self._cp.cuda.get_current_stream()
        self.launch(table, stream)
        self.check(table)
