"""The .endor container: header page, page-aligned segments grouped in extents, JSON manifest.

::

    offset 0      header page (4096 bytes): magic, version, manifest offset/length/CRC, file length
    offset 4096   extent "resident"   embeddings, final norm, lm_head ... (dense or bitmap)
                  extent "layer.0"    every segment of decoder layer 0, back to back
                  extent "layer.1"    ...
                  (format v4: extents "layer.<i>.expert.<e>", one per expert, after their layer;
                   format v5, tensor-parallel: extents "layer.<i>.rank.<r>" instead of "layer.<i>")
                  extent "files"      tokenizer files, as opaque bytes
                  manifest            UTF-8 JSON, page-aligned, zero-padded
    end

Every segment starts at a multiple of 4096 and its length is padded with zeros to a multiple of
4096, so one layer is one aligned contiguous range: one O_DIRECT or GPUDirect read. Each segment
carries a CRC-32C (Castagnoli) of its padded bytes.

Nothing in the file is trusted: :class:`EndorFile` checks the header, bounds the manifest, checks
every field's type and range, every offset against the file size and its extent, sizes against
shapes and dtypes, and every tile offset table, before any tensor is read. Any failure is a
:class:`~endor_gds.errors.FormatError` naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path

import crc32c as _crc32c
import numpy as np
import torch

from endor_gds import defaults
from endor_gds._checks import (
    check_choice,
    check_dict,
    check_fraction,
    check_generation_config,
    check_int,
    check_list,
    check_str,
    fail,
    plain_name,
    show,
)
from endor_gds.codec.bitmap import (
    DTYPES,
    MAX_SPARSE_ELEMS,
    PAGE,
    TILE_ELEMS,
    DType,
    check_tile_offsets,
    decode_bitmap_reference,
    pad_to_page,
    segment_nbytes,
)
from endor_gds.codec.expdict import (
    LAYOUTS,
    MAX_INDEX_BITS,
    STREAM_KINDS,
    ExpDict,
    Streams,
    check_escapes,
    decode_values_reference,
)
from endor_gds.codec.exphuff import MAX_CODE_BITS, ExpHuff, HuffStreams, check_bit_offsets, dense_tile_offsets
from endor_gds.codec.exphuff import STREAM_KINDS as HUFF_KINDS
from endor_gds.codec.exphuff import decode_values_reference as huff_values_reference
from endor_gds.errors import ArgumentError, ChecksumError, FormatError
from endor_gds.read.readers import read_fully
from endor_gds.shards import MAX_SIZE, STYLES

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "SUPPORTED_VERSIONS",
    "format_version_for",
    "Segment",
    "TensorEntry",
    "Extent",
    "Writer",
    "EndorFile",
    "crc32c",
]

MAGIC = b"ENDORGDS"
FORMAT_VERSION = 5  # the newest version this code writes
SUPPORTED_VERSIONS = (1, 2, 3, 4, 5)
# Codecs each version may hold. A file is written as the lowest version that holds its codecs, so
# files without expdict tensors stay readable by version-1 readers, and without exphuff tensors by
# version-2 readers. Version 4 adds extents of kind "expert" (a mixture-of-experts layer's experts,
# one extent each): only a file that has them is version 4. Version 5 adds extents of kind "shard"
# (a tensor-parallel pack: each layer one extent per rank) and the manifest's "tensor_parallel".
VERSION_CODECS = {1: ("raw",), 2: ("raw", "expdict"), 3: ("raw", "expdict", "exphuff"),
                  4: ("raw", "expdict", "exphuff"), 5: ("raw", "expdict", "exphuff")}
EXPERTS_VERSION = 4
SHARDS_VERSION = 5
# magic, version, flags, manifest offset, manifest length, file length, manifest CRC; then the
# header's own CRC over these 44 bytes.
_HEADER = struct.Struct("<8sIIQQQI")
_HEADER_CRC = struct.Struct("<I")

# Bounds on what a manifest may ask for, so a hostile file cannot make us allocate or loop
# without limit. Real models are far below them (Llama-2-70B: ~700 tensors, manifest ~300 KB).
MAX_MANIFEST_BYTES = 64 << 20
MAX_TENSORS = 1 << 20
MAX_RANK = 8
MAX_NUMEL = 1 << 40
MAX_FILES = 64


def crc32c(data, value: int = 0) -> int:
    return _crc32c.crc32c(data, value=value)


def format_version_for(codecs, experts: bool = False, shards: bool = False) -> int:
    """The lowest format version that holds every codec in ``codecs`` (and expert extents, and
    tensor-parallel shard extents)."""
    codecs = set(codecs)
    return min(v for v, allowed in VERSION_CODECS.items()
               if codecs <= set(allowed) and (v >= EXPERTS_VERSION or not experts)
               and (v >= SHARDS_VERSION or not shards))


def shard_prefix(rank: int) -> str:
    """What the names of rank ``rank``'s tensors in a tensor-parallel file start with (the model's
    parameter name follows): ``rank.1.model.layers.0.self_attn.q_proj.weight``."""
    return f"rank.{rank}."


@dataclass(frozen=True)
class Segment:
    kind: str
    offset: int
    length: int  # padded to a page
    nbytes: int  # payload bytes (the rest of `length` is zero padding)
    crc32c: int  # of all `length` bytes

    def as_dict(self) -> dict:
        return {"kind": self.kind, "offset": self.offset, "length": self.length,
                "nbytes": self.nbytes, "crc32c": self.crc32c}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: DType
    encoding: str  # "dense" | "bitmap"
    codec: str  # "raw" (format v1) | "expdict" (format v2, bitmap only) | "exphuff" (format v3)
    nnz: int
    extent: str
    segments: dict[str, Segment]
    expdict: ExpDict | None = None  # the codec's parameters when codec == "expdict"
    exphuff: ExpHuff | None = None  # the codec's parameters when codec == "exphuff"

    @property
    def needs_decode(self) -> bool:
        """Whether the tensor's bytes must be decoded (anything but dense raw data)."""
        return self.encoding == "bitmap" or self.codec != "raw"

    @property
    def params(self) -> ExpDict | ExpHuff | None:
        """The value codec's parameters (None for codec raw)."""
        return self.expdict if self.expdict is not None else self.exphuff

    def values(self, segs: dict):
        """The stored values over the tensor's segment bytes (kind -> uint8 array, no copies): raw
        bit patterns, or the codec's streams."""
        if self.expdict is not None:
            return Streams.from_bytes(self.expdict, segs)
        if self.exphuff is not None:
            return HuffStreams.from_bytes(self.exphuff, segs)
        return segs["values" if self.encoding == "bitmap" else "data"].view(self.dtype.bits)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def dense_nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def stored_nbytes(self) -> int:
        return sum(s.length for s in self.segments.values())


@dataclass
class Extent:
    name: str
    kind: str  # "resident" | "layer" | "expert" | "shard" | "files"
    offset: int
    length: int
    layer: int | None = None
    tensors: list[str] = field(default_factory=list)
    expert: int | None = None  # kind "expert": which of its layer's experts
    rank: int | None = None  # kind "shard": whose shard of its layer


# --------------------------------------------------------------------------------------------
# Writing


class Writer:
    """Writes the container sequentially into a binary file opened for writing at position 0.

    Usage: ``begin_extent`` / ``write_segment``... / ``end_extent`` for each extent, then
    ``finish(manifest)``, which writes the manifest and finally the header page.
    """

    def __init__(self, f):
        self._f = f
        self._f.write(b"\0" * PAGE)  # header page, filled in by finish()
        self.pos = PAGE
        self.extents: list[dict] = []
        self._open: dict | None = None
        self._zeros = bytes(PAGE)

    def begin_extent(self, name: str, kind: str, layer: int | None = None,
                     expert: int | None = None, rank: int | None = None) -> None:
        if self._open is not None:
            raise RuntimeError(f"extent {self._open['name']} is still open")
        self._open = {"name": name, "kind": kind, "offset": self.pos}
        if layer is not None:
            self._open["layer"] = layer
        if expert is not None:
            self._open["expert"] = expert
        if rank is not None:
            self._open["rank"] = rank

    def write_segment(self, kind: str, data) -> Segment:
        """Write one segment (bytes or a contiguous numpy array) padded to a page."""
        if self._open is None:
            raise RuntimeError("write_segment outside an extent")
        view = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) \
            else memoryview(data).cast("B")
        nbytes = len(view)
        length = pad_to_page(nbytes)
        crc = crc32c(view)
        self._f.write(view)
        if length > nbytes:
            pad = self._zeros[: length - nbytes]
            crc = crc32c(pad, crc)
            self._f.write(pad)
        seg = Segment(kind, self.pos, length, nbytes, crc)
        self.pos += length
        return seg

    def end_extent(self) -> dict:
        ext = self._open
        if ext is None:
            raise RuntimeError("end_extent without begin_extent")
        ext["length"] = self.pos - ext["offset"]
        self.extents.append(ext)
        self._open = None
        return ext

    def finish(self, manifest: dict) -> int:
        """Write manifest and header; returns the file length."""
        if self._open is not None:
            raise RuntimeError(f"extent {self._open['name']} was not ended")
        manifest = dict(manifest, extents=self.extents)
        blob = json.dumps(manifest, separators=(",", ":"), sort_keys=False).encode()
        if len(blob) > MAX_MANIFEST_BYTES:
            raise FormatError(f"manifest is {len(blob)} bytes, above the {MAX_MANIFEST_BYTES} limit")
        moff = self.pos
        self._f.write(blob)
        self._f.write(self._zeros[: pad_to_page(len(blob)) - len(blob)])
        file_length = moff + pad_to_page(len(blob))
        version = manifest["format_version"]
        if version not in SUPPORTED_VERSIONS:
            raise FormatError(f"cannot write format version {version!r}; this endor_gds writes "
                              f"{', '.join(map(str, SUPPORTED_VERSIONS))}")
        head = _HEADER.pack(MAGIC, version, 0, moff, len(blob), file_length, crc32c(blob))
        head += _HEADER_CRC.pack(crc32c(head))
        self._f.seek(0)
        self._f.write(head)
        self._f.seek(file_length)
        return file_length


# --------------------------------------------------------------------------------------------
# Reading and validation


def _check_prune(path, prune: dict) -> None:
    """The fields of the (informational) prune block that `inspect` prints or formats, as the
    packer writes them: a fuzzed manifest with a list where a number belongs must be a
    FormatError at open, not a TypeError in a tool, and a method name no terminal escape."""
    if prune.get("method") is not None:
        check_str(path, "prune.method", prune["method"])
    for key in ("sparsity", "detected_sparsity"):
        if prune.get(key) is not None:
            check_fraction(path, f"prune.{key}", prune[key])
    if prune.get("detected_sparsity_range") is not None:
        span = check_list(path, "prune.detected_sparsity_range", prune["detected_sparsity_range"], 2)
        if len(span) != 2:
            raise fail(path, f"prune.detected_sparsity_range must be [low, high], got {show(span)}")
        for v in span:
            check_fraction(path, "prune.detected_sparsity_range item", v)
    for name in check_list(path, "prune.unrouted_experts", prune.get("unrouted_experts", []), MAX_TENSORS):
        check_str(path, "prune.unrouted_experts item", name)  # extent names, printed by inspect


_SEGMENT_KINDS = tuple(dict.fromkeys(("data", "bitmap", "values", "tile_offsets") + STREAM_KINDS + HUFF_KINDS))


def _check_not_a_checkpoint(path: str) -> None:
    """The commonest wrong path is the Hugging Face checkpoint itself: say to pack it first."""
    if os.path.isdir(path):
        p = Path(path)
        if (p / "config.json").is_file() or any(p.glob("*.safetensors")):
            raise ArgumentError(f"{path} is a checkpoint folder, not an .endor file: pack it first "
                                f"(endor-gds pack {path} model.endor) and open model.endor")
        raise ArgumentError(f"{path} is a folder, not an .endor file")


class EndorFile:
    """An opened, validated .endor file. ``endor_gds.open(path)`` returns one.

    Attributes: ``manifest`` (dict), ``config`` (the model's config.json), ``architecture``,
    ``tensors`` (name → :class:`TensorEntry`), ``extents`` (name → :class:`Extent`), ``layers``
    (extents of the decoder layers by index), ``resident`` (the resident extent), ``tied``,
    ``files`` (embedded file name → :class:`Segment`).

    ``verify_reads``: check each segment's CRC-32C every time it is read (``ChecksumError`` on a
    mismatch). ``None`` (the default) follows the global option ``endor_gds.defaults``
    ``verify_reads`` (env ``ENDOR_VERIFY_READS``) at each read; a read's own ``verify=``
    argument, when given, overrides both.
    """

    def __init__(self, path, *, check_tiles: bool = True, verify_reads: bool | None = None):
        self.path = os.fspath(path)
        self._fd = None
        if not (verify_reads is None or isinstance(verify_reads, bool)):
            raise ArgumentError(f"verify_reads must be True, False or None (the default), got {verify_reads!r}")
        self.verify_reads = verify_reads
        _check_not_a_checkpoint(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._load(check_tiles)
        except BaseException:
            # close() also forgets the descriptor: __del__ must not close it a second time, when
            # its number may already belong to another open file.
            self.close()
            raise

    # -- construction -------------------------------------------------------------------------

    def _pread(self, offset: int, length: int) -> np.ndarray:
        buf = np.empty(length, dtype=np.uint8)
        if length:
            read_fully(self._fd, memoryview(buf), offset, path=self.path, direct=False, retries=3)
        return buf

    def _load(self, check_tiles: bool) -> None:
        p = self.path
        self.opened_stat = os.fstat(self._fd)  # a later change on disk is named by what changed
        self.file_size = self.opened_stat.st_size
        if self.file_size < PAGE:
            raise fail(p, f"file is {self.file_size} bytes, smaller than the {PAGE}-byte header page "
                           f"(not an .endor file, or truncated)")
        page = self._pread(0, PAGE).tobytes()
        head = page[: _HEADER.size + _HEADER_CRC.size]
        magic, version, flags, moff, mlen, flen, mcrc = _HEADER.unpack_from(head)
        if magic != MAGIC:
            # a safetensors file starts with its header's length, then the JSON header
            what = "a safetensors file: pack its checkpoint folder first with endor-gds pack" \
                if page[8:9] == b"{" else "not an .endor file"
            raise fail(p, f"bad magic {magic!r}, expected {MAGIC!r} ({what})")
        (hcrc,) = _HEADER_CRC.unpack_from(head, _HEADER.size)
        if crc32c(head[: _HEADER.size]) != hcrc:
            raise ChecksumError(f"{p}: header page checksum mismatch (corrupted header)", segment="header")
        if version not in SUPPORTED_VERSIONS:
            raise fail(p, f"format version {version} is not supported by this endor_gds "
                           f"(supports {', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade endor_gds")
        self.format_version = version
        if flags != 0:
            raise fail(p, f"header flags {flags:#x} are not supported by format version {version} "
                           f"(must be 0)")
        # Bytes that no CRC covers must be zero, so that any change to the file is noticed.
        if any(page[len(head):]):
            raise fail(p, "header page is not zero after its fields (corrupted header)")
        if flen != self.file_size:
            raise fail(p, f"file is {self.file_size} bytes but its header says {flen} "
                           f"({'truncated' if self.file_size < flen else 'extended'} file?)")
        if moff % PAGE or moff < PAGE or mlen > MAX_MANIFEST_BYTES or moff + pad_to_page(mlen) != flen:
            raise fail(p, f"manifest range offset={moff} length={mlen} is invalid for a "
                           f"{flen}-byte file (page-aligned, at most {MAX_MANIFEST_BYTES} bytes, "
                           f"ending the file)")
        tail = self._pread(moff, flen - moff).tobytes()
        blob = tail[:mlen]
        if crc32c(blob) != mcrc:
            raise ChecksumError(f"{p}: manifest checksum mismatch (corrupted manifest)", segment="manifest")
        if any(tail[mlen:]):
            raise fail(p, "manifest padding is not zero (corrupted file)")
        try:
            manifest = json.loads(blob)
        except (ValueError, RecursionError) as exc:
            raise fail(p, f"manifest is not valid JSON ({type(exc).__name__})") from None
        self.manifest = check_dict(p, "manifest", manifest)
        self._manifest_offset = moff
        self._validate(check_tiles)

    def _validate(self, check_tiles: bool) -> None:
        p, m = self.path, self.manifest
        if m.get("format") != "endor":
            raise fail(p, f"manifest format is {show(m.get('format'))}, expected 'endor'")
        check_int(p, "format_version", m.get("format_version"), self.format_version, self.format_version)
        check_int(p, "tile_elems", m.get("tile_elems"), TILE_ELEMS, TILE_ELEMS)
        check_choice(p, "checksum", m.get("checksum"), ("crc32c",))
        self.architecture = check_str(p, "architecture", m.get("architecture"), 64)
        self.config = check_dict(p, "config", m.get("config"))
        if m.get("prune") is not None:  # read by tools (inspect)
            _check_prune(p, check_dict(p, "prune", m["prune"]))
        if m.get("generation_config") is not None:  # read by the runtime
            check_generation_config(p, m["generation_config"])
        tied = check_dict(p, "tied", m.get("tied", {}))
        self.tied = {check_str(p, "tied name", k): check_str(p, "tied target", v) for k, v in tied.items()}

        # Extents: page-aligned, inside the data area, not overlapping, names unique and telling
        # their kind ("resident", "files", "layer.<i>", "layer.<i>.expert.<e>", "layer.<i>.rank.<r>"),
        # as the packer writes them.
        kinds = ("resident", "layer", "files") + (("expert",) if self.format_version >= EXPERTS_VERSION else ()) \
            + (("shard",) if self.format_version >= SHARDS_VERSION else ())
        self.extents: dict[str, Extent] = {}
        for i, e in enumerate(check_list(p, "extents", m.get("extents"), MAX_TENSORS)):
            e = check_dict(p, f"extents[{i}]", e)
            name = check_str(p, f"extents[{i}].name", e.get("name"))
            kind = check_choice(p, f"extent {name} kind", e.get("kind"), kinds)
            off = check_int(p, f"extent {name} offset", e.get("offset"), PAGE, self._manifest_offset)
            length = check_int(p, f"extent {name} length", e.get("length"), 0, self._manifest_offset - off)
            if off % PAGE or length % PAGE:
                raise fail(p, f"extent {name} offset={off} length={length} is not {PAGE}-aligned")
            layer = expert = rank = None
            if kind in ("layer", "expert", "shard"):
                layer = check_int(p, f"extent {name} layer", e.get("layer"), 0, MAX_TENSORS)
            if kind == "expert":
                expert = check_int(p, f"extent {name} expert", e.get("expert"), 0, MAX_TENSORS)
            if kind == "shard":
                rank = check_int(p, f"extent {name} rank", e.get("rank"), 0, MAX_SIZE - 1)
            want = {"layer": f"layer.{layer}", "expert": f"layer.{layer}.expert.{expert}",
                    "shard": f"layer.{layer}.rank.{rank}"}.get(kind, kind)
            if name != want:
                raise fail(p, f"extent {name} of kind {kind} must be named {want!r}")
            if name in self.extents:
                raise fail(p, f"extent {name} appears twice")
            self.extents[name] = Extent(name, kind, off, length, layer, expert=expert, rank=rank)
        spans = sorted((e.offset, e.offset + e.length, e.name) for e in self.extents.values())
        for (a0, a1, an), (b0, _b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise fail(p, f"extents {an} and {bn} overlap")
        layer_ext = sorted((e for e in self.extents.values() if e.kind == "layer"), key=lambda e: e.layer)
        if [e.layer for e in layer_ext] != list(range(len(layer_ext))):
            raise fail(p, "decoder layer extents must be numbered 0..L-1 exactly once each")
        self.layers = layer_ext
        # experts[i]: layer i's expert extents by expert index (0..E-1 exactly once each)
        self.experts: dict[int, list[Extent]] = {}
        for ext in sorted((e for e in self.extents.values() if e.kind == "expert"),
                          key=lambda e: (e.layer, e.expert)):
            if ext.layer >= len(layer_ext):
                raise fail(p, f"expert extent {ext.name} belongs to layer {ext.layer}, but the file "
                               f"has {len(layer_ext)} layer extents")
            self.experts.setdefault(ext.layer, []).append(ext)
        for i, exts in self.experts.items():
            if [e.expert for e in exts] != list(range(len(exts))):
                raise fail(p, f"the expert extents of layer {i} must be numbered 0..E-1 exactly once "
                               f"each (found {[e.expert for e in exts][:8]})")
        self._validate_shards()
        self.resident = self.extents.get("resident")

        # Tensors: names, shapes, dtypes, encodings, segment sizes and places.
        self.tensors: dict[str, TensorEntry] = {}
        seg_spans = []
        for i, t in enumerate(check_list(p, "tensors", m.get("tensors"), MAX_TENSORS)):
            entry = self._tensor_entry(check_dict(p, f"tensors[{i}]", t), i)
            if entry.name in self.tensors:
                raise fail(p, f"tensor {entry.name} appears twice")
            ext = self.extents.get(entry.extent)
            if ext is None or ext.kind == "files":
                raise fail(p, f"tensor {entry.name} names unknown extent {show(entry.extent)}")
            # in a tensor-parallel file, rank r's tensors (and only they) are named rank.<r>.<name>;
            # older files may hold any name
            misnamed = not entry.name.startswith(shard_prefix(ext.rank)) if ext.kind == "shard" \
                else self.tensor_parallel is not None and entry.name.startswith("rank.")
            if misnamed:
                raise fail(p, f"tensor {entry.name} in extent {ext.name}: the tensors of rank r's shard "
                               f"extents, and only they, are named {shard_prefix(0)[:-2]}<r>.<name>")
            for seg in entry.segments.values():
                if seg.offset < ext.offset or seg.offset + seg.length > ext.offset + ext.length:
                    raise fail(p, f"tensor {entry.name} segment {seg.kind} at {seg.offset}+{seg.length} "
                                   f"lies outside its extent {ext.name}")
                seg_spans.append((seg.offset, seg.offset + seg.length, f"{entry.name}:{seg.kind}"))
            ext.tensors.append(entry.name)
            self.tensors[entry.name] = entry
        self.files: dict[str, Segment] = {}
        for i, f in enumerate(check_list(p, "files", m.get("files", []), MAX_FILES)):
            f = check_dict(p, f"files[{i}]", f)
            name = check_str(p, f"files[{i}].name", f.get("name"), 128)
            if not plain_name(name):
                raise fail(p, f"embedded file name {show(name)} is not a plain file name "
                               f"([A-Za-z0-9._-], no leading dot)")
            if name in self.files:
                raise fail(p, f"embedded file {name} appears twice")
            seg = self._segment(f, f"file {name}", ("file",))
            ext = self.extents.get("files")
            if ext is None or seg.offset < ext.offset or seg.offset + seg.length > ext.offset + ext.length:
                raise fail(p, f"embedded file {name} lies outside the files extent")
            self.files[name] = seg
            seg_spans.append((seg.offset, seg.offset + seg.length, f"file:{name}"))
        seg_spans.sort()
        for (a0, a1, an), (b0, _b1, bn) in zip(seg_spans, seg_spans[1:]):
            if b0 < a1:
                raise fail(p, f"segments {an} and {bn} overlap")
        for alias, target in self.tied.items():
            if target not in self.tensors or alias in self.tensors:
                raise fail(p, f"tied tensor {alias} -> {target} does not resolve to one stored tensor")
        self._tile_offsets: dict[str, np.ndarray] = {}
        if check_tiles:
            for entry in self.tensors.values():
                if entry.encoding == "bitmap":
                    self.tile_offsets(entry.name)
                if entry.expdict is not None:
                    self._check_escapes(entry)
                if entry.exphuff is not None:
                    self._check_bit_offsets(entry)

    def _validate_shards(self) -> None:
        """A tensor-parallel file (format v5): the manifest's ``tensor_parallel`` (``size``, the
        ``ranks`` the file holds, ``pack_id``, ``plan``) and, for every layer, one shard extent per
        rank it holds; no unsplit layer extents, no expert extents."""
        p, m = self.path, self.manifest
        shards = [e for e in self.extents.values() if e.kind == "shard"]
        self.tensor_parallel: dict | None = None
        # shards[i][r]: rank r's extent of layer i
        self.shards: dict[int, dict[int, Extent]] = {}
        if m.get("tensor_parallel") is None:
            if shards:
                raise fail(p, f"extent {shards[0].name} is a shard, but the manifest has no tensor_parallel entry")
            return
        if self.format_version < SHARDS_VERSION:
            raise fail(p, f"tensor_parallel needs format version {SHARDS_VERSION}, the file is "
                           f"version {self.format_version}")
        tp = check_dict(p, "tensor_parallel", m["tensor_parallel"])
        size = check_int(p, "tensor_parallel size", tp.get("size"), 1, MAX_SIZE)
        ranks = [check_int(p, "tensor_parallel ranks[]", r, 0, size - 1)
                 for r in check_list(p, "tensor_parallel ranks", tp.get("ranks"), MAX_SIZE)]
        if not ranks or ranks != sorted(set(ranks)):
            raise fail(p, f"tensor_parallel ranks must be distinct ranks in increasing order, got {ranks[:8]}")
        plan = check_dict(p, "tensor_parallel plan", tp.get("plan"))
        self.tensor_parallel = {
            "size": size, "ranks": ranks,
            "pack_id": check_str(p, "tensor_parallel pack_id", tp.get("pack_id"), 64),
            "plan": {check_str(p, "tensor_parallel plan module", k):
                     check_choice(p, f"tensor_parallel plan of {k}", v, STYLES) for k, v in plan.items()},
        }
        if self.layers or self.experts:
            raise fail(p, "a tensor-parallel file holds its layers as shard extents only "
                           f"(found {(self.layers or self.experts[min(self.experts)])[0].name})")
        for ext in sorted(shards, key=lambda e: (e.layer, e.rank)):
            self.shards.setdefault(ext.layer, {})[ext.rank] = ext
        if sorted(self.shards) != list(range(len(self.shards))):
            raise fail(p, "the shard extents' layers must be numbered 0..L-1")
        for i, by_rank in self.shards.items():
            if sorted(by_rank) != ranks:
                raise fail(p, f"layer {i} has shard extents of ranks {sorted(by_rank)[:8]}, the file "
                               f"holds ranks {ranks[:8]}")

    @property
    def num_layers(self) -> int:
        return len(self.shards) if self.tensor_parallel is not None else len(self.layers)

    def layer_extents(self, rank: int | None = None) -> list[Extent]:
        """The decoder layers' extents in order: in a tensor-parallel file, rank ``rank``'s shards."""
        if self.tensor_parallel is None:
            return list(self.layers)
        if rank not in self.tensor_parallel["ranks"]:
            raise ArgumentError(f"{self.path} holds the shards of ranks {self.tensor_parallel['ranks']} of a "
                                f"{self.tensor_parallel['size']}-rank pack, not rank {rank}")
        return [self.shards[i][rank] for i in range(len(self.shards))]

    def layer_prefix(self, rank: int | None = None) -> str:
        """What a layer's tensor names start with before the layer path: ``""``, or in a
        tensor-parallel file ``rank.<r>.``."""
        return "" if self.tensor_parallel is None else shard_prefix(rank)

    def model_tensors(self, rank: int | None = None) -> dict[str, TensorEntry]:
        """The tensors one model (one rank's, in a tensor-parallel file) computes with, by its
        parameter names: the resident ones and its layers'."""
        if self.tensor_parallel is None:
            return dict(self.tensors)
        prefix = shard_prefix(rank)
        out = {n: e for n, e in self.tensors.items() if not n.startswith("rank.")}
        for ext in self.layer_extents(rank):
            out.update((n[len(prefix):], self.tensors[n]) for n in ext.tensors)
        return out

    def fingerprint(self) -> str:
        """What every rank's file of one tensor-parallel pack shares, hashed: the pack's id, size and
        plan, the model (architecture, config, ties) and the resident tensors (names, shapes,
        dtypes, CRCs). Ranks compare it at start, so a file of another pack, or one with other
        resident weights, is named before any step runs."""
        tp = dict(self.tensor_parallel or {})
        tp.pop("ranks", None)
        resident = [(e.name, list(e.shape), e.dtype.name, [s.crc32c for s in e.segments.values()])
                    for n, e in sorted(self.tensors.items()) if e.extent == "resident"]
        blob = json.dumps({"tp": tp, "architecture": self.architecture, "config": self.config,
                           "tied": self.tied, "resident": resident}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def _segment(self, s, where: str, kinds=_SEGMENT_KINDS) -> Segment:
        p = self.path
        s = check_dict(p, where, s)
        kind = check_choice(p, f"{where} kind", s.get("kind"), kinds)
        off = check_int(p, f"{where} offset", s.get("offset"), PAGE, self._manifest_offset)
        length = check_int(p, f"{where} length", s.get("length"), 0, self._manifest_offset - off)
        nbytes = check_int(p, f"{where} nbytes", s.get("nbytes"), 0, length)
        crc = check_int(p, f"{where} crc32c", s.get("crc32c"), 0, 0xFFFFFFFF)
        if off % PAGE or length != pad_to_page(nbytes):
            raise fail(p, f"{where}: offset={off} length={length} nbytes={nbytes} break the "
                           f"{PAGE}-byte page rule")
        return Segment(kind, off, length, nbytes, crc)

    def _tensor_entry(self, t: dict, i: int) -> TensorEntry:
        p = self.path
        name = check_str(p, f"tensors[{i}].name", t.get("name"))
        shape_raw = check_list(p, f"tensor {name} shape", t.get("shape"), MAX_RANK)
        shape = tuple(check_int(p, f"tensor {name} shape", s, 0, MAX_NUMEL) for s in shape_raw)
        numel = 1
        for s in shape:  # Python integers: the product cannot overflow before it is compared
            numel *= s
        if numel > MAX_NUMEL:
            raise fail(p, f"tensor {name} shape {list(shape)} has {numel} elements, above {MAX_NUMEL}")
        dtype = DTYPES[check_choice(p, f"tensor {name} dtype", t.get("dtype"), tuple(DTYPES))]
        encoding = check_choice(p, f"tensor {name} encoding", t.get("encoding"), ("dense", "bitmap"))
        codec = check_choice(p, f"tensor {name} codec", t.get("codec", "raw"),
                        VERSION_CODECS[self.format_version])
        if codec == "expdict" and encoding != "bitmap":
            raise fail(p, f"tensor {name}: codec {codec} needs encoding 'bitmap', got {encoding!r}")
        if encoding == "bitmap" and not dtype.sparse:
            raise fail(p, f"tensor {name}: dtype {dtype.name} cannot be bitmap-encoded")
        if encoding == "bitmap" and numel > MAX_SPARSE_ELEMS:
            raise fail(p, f"tensor {name}: a bitmap-encoded tensor holds at most {MAX_SPARSE_ELEMS} "
                           f"elements (uint32 tile offsets), shape {list(shape)} has {numel}")
        nnz = check_int(p, f"tensor {name} nnz", t.get("nnz"), 0, numel)
        if codec == "exphuff" and encoding == "dense" and nnz != numel:
            raise fail(p, f"tensor {name}: a dense exphuff tensor stores all {numel} elements, nnz is {nnz}")
        expdict = exphuff = None
        for key in ("expdict", "exphuff"):
            if key in t and codec != key:
                raise fail(p, f"tensor {name}: {key} parameters given for codec {codec!r}")
        if codec == "expdict":
            expdict = self._expdict(name, t.get("expdict"), dtype, nnz)
        elif codec == "exphuff":
            exphuff = self._exphuff(name, t.get("exphuff"), dtype, numel)
        extent = check_str(p, f"tensor {name} extent", t.get("extent"))
        segs: dict[str, Segment] = {}
        for j, s in enumerate(check_list(p, f"tensor {name} segments", t.get("segments"), 8)):
            seg = self._segment(s, f"tensor {name} segment {j}")
            if seg.kind in segs:
                raise fail(p, f"tensor {name} has two {seg.kind} segments")
            segs[seg.kind] = seg
        expected = segment_nbytes(encoding, numel, nnz, dtype.itemsize, expdict or exphuff)
        got = {k: s.nbytes for k, s in segs.items()}
        if got != expected:
            raise fail(p, f"tensor {name} ({encoding}/{codec}, shape {list(shape)}, {dtype.name}, "
                           f"nnz={nnz}) needs segments {expected}, manifest has {got}")
        return TensorEntry(name, shape, dtype, encoding, codec, nnz, extent, segs, expdict, exphuff)

    def _expdict(self, name: str, raw, dtype: DType, nnz: int) -> ExpDict:
        """The checked ``expdict`` object of a tensor (see docs/format.md, codec expdict)."""
        p = self.path
        raw = check_dict(p, f"tensor {name} expdict", raw)
        layout = LAYOUTS.get(dtype.name)
        if layout is None:
            raise fail(p, f"tensor {name}: dtype {dtype.name} cannot use codec expdict "
                           f"(supported: {', '.join(LAYOUTS)})")
        b = check_int(p, f"tensor {name} expdict index_bits", raw.get("index_bits"), 1, MAX_INDEX_BITS)
        exps = check_list(p, f"tensor {name} expdict exponents", raw.get("exponents"), 1 << b)
        top = (1 << layout.exp_bits) - 1
        exps = tuple(check_int(p, f"tensor {name} expdict exponent", e, 0, top) for e in exps)
        if len(exps) != 1 << b or len(set(exps)) != len(exps):
            raise fail(p, f"tensor {name} expdict exponents must be {1 << b} distinct integers "
                           f"(index_bits={b}), got {len(exps)} with {len(set(exps))} distinct")
        escapes = check_int(p, f"tensor {name} expdict escapes", raw.get("escapes"), 0, nnz)
        return ExpDict(layout, b, exps, escapes)

    def _exphuff(self, name: str, raw, dtype: DType, numel: int) -> ExpHuff:
        """The checked ``exphuff`` object of a tensor (see docs/format.md, codec exphuff)."""
        p = self.path
        raw = check_dict(p, f"tensor {name} exphuff", raw)
        layout = LAYOUTS.get(dtype.name)
        if layout is None:
            raise fail(p, f"tensor {name}: dtype {dtype.name} cannot use codec exphuff "
                           f"(supported: {', '.join(LAYOUTS)})")
        if numel > MAX_SPARSE_ELEMS:
            raise fail(p, f"tensor {name}: an exphuff tensor holds at most {MAX_SPARSE_ELEMS} elements")
        count = 1 << layout.exp_bits
        lengths = check_list(p, f"tensor {name} exphuff code_lengths", raw.get("code_lengths"), count)
        lengths = tuple(check_int(p, f"tensor {name} exphuff code length", x, 0, MAX_CODE_BITS) for x in lengths)
        nbits = check_int(p, f"tensor {name} exphuff bits", raw.get("bits"), 0, (1 << 32) - 1)
        params = ExpHuff(layout, lengths, nbits)
        try:
            params.check()
        except ValueError as exc:
            raise fail(p, f"tensor {name} exphuff: {exc} (code_lengths must be {count} integers)") from None
        return params

    # -- reading ------------------------------------------------------------------------------

    def resolve(self, name: str) -> TensorEntry:
        """The stored entry for ``name`` (following ties); ``KeyError`` when absent."""
        target = self.tied.get(name, name)
        if target not in self.tensors:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        return self.tensors[target]

    def _verify(self, verify: bool | None) -> bool:
        """Whether a read checks CRCs: its own argument, else the file's, else the global option."""
        if verify is not None:
            return bool(verify)
        if self.verify_reads is not None:
            return bool(self.verify_reads)
        return defaults.get("verify_reads")

    def read_segment(self, seg: Segment, *, verify: bool | None = None,
                     label: str | None = None) -> np.ndarray:
        """A segment's payload bytes (``nbytes``), checking its CRC first when verifying.

        ``label`` names the segment in errors, as :meth:`verify` does (``"<tensor>:<kind>"``,
        ``"file <name>"``).
        """
        raw = self._pread(seg.offset, seg.length)
        if self._verify(verify):
            crc = crc32c(raw)
            if crc != seg.crc32c:
                label = label or seg.kind
                raise ChecksumError(
                    f"{self.path}: segment {label} (offset {seg.offset}, {seg.length} bytes) fails "
                    f"its CRC-32C: stored {seg.crc32c:#010x}, computed {crc:#010x}", segment=label)
        return raw[: seg.nbytes]

    def tile_offsets(self, name: str) -> np.ndarray:
        """The validated tile offset table of a bitmap tensor (read once, then cached)."""
        entry = self.resolve(name)
        cached = self._tile_offsets.get(entry.name)
        if cached is None:
            raw = self.read_segment(entry.segments["tile_offsets"], label=f"{entry.name}:tile_offsets")
            cached = raw.view("<u4")
            check_tile_offsets(cached, entry.numel, entry.nnz, f"{self.path}: tensor {entry.name}")
            self._tile_offsets[entry.name] = cached
        return cached

    def _tables(self, entry: TensorEntry, kinds: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The tensor's segments of ``kinds``, read (and checked), its other segments empty: what a
        check of its tables needs, never its large value streams (an open reads no weights)."""
        empty = np.zeros(0, dtype=np.uint8)
        return {k: self.read_segment(s, label=f"{entry.name}:{k}") if k in kinds else empty
                for k, s in entry.segments.items()}

    def _check_escapes(self, entry: TensorEntry) -> None:
        """Escape offsets and positions of an expdict tensor, checked at open (DecodeError)."""
        segs = self._tables(entry, ("escape_offsets", "escape_positions", "escape_values"))
        check_escapes(entry.values(segs), self.tile_offsets(entry.name), f"{self.path}: tensor {entry.name}")

    def _check_bit_offsets(self, entry: TensorEntry) -> None:
        """Tile and chunk bit offsets of an exphuff tensor, checked at open (DecodeError)."""
        segs = self._tables(entry, ("tile_bits", "chunk_bits"))
        check_bit_offsets(entry.values(segs), self.value_tiles(entry.name), f"{self.path}: tensor {entry.name}")

    def value_tiles(self, name: str) -> np.ndarray:
        """Where each tile's values start among a tensor's stored values: the validated tile offsets
        of a bitmap tensor, every element's place for a dense one."""
        entry = self.resolve(name)
        return self.tile_offsets(name) if entry.encoding == "bitmap" else dense_tile_offsets(entry.numel)

    def read_tensor_bits(self, name: str, *, verify: bool | None = None) -> np.ndarray:
        """Flat numpy array of the tensor's bit patterns, through the reference decoders."""
        entry = self.resolve(name)
        verify = self._verify(verify)
        segs = {k: self.read_segment(s, verify=verify, label=f"{entry.name}:{k}")
                for k, s in entry.segments.items()}
        if not entry.needs_decode:
            return entry.values(segs)
        where = f"{self.path}: tensor {entry.name}"
        offsets = self.value_tiles(entry.name)
        values = entry.values(segs)
        if entry.expdict is not None:
            values = decode_values_reference(values, offsets, entry.nnz, where)
        elif entry.exphuff is not None:
            values = huff_values_reference(values, offsets, entry.nnz, where)
        if entry.encoding == "dense":
            return values
        return decode_bitmap_reference(segs["bitmap"].view("<u4"), values, offsets, entry.numel,
                                       where=where)

    def read_tensor(self, name: str, *, verify: bool | None = None) -> torch.Tensor:
        """The dense tensor (CPU, its own dtype and shape), through the reference decoder."""
        entry = self.resolve(name)
        bits = self.read_tensor_bits(name, verify=verify)
        return torch.from_numpy(bits.view(np.uint8).copy()).view(entry.dtype.torch).reshape(entry.shape)

    def read_file(self, name: str) -> bytes:
        """An embedded file (tokenizer) as bytes, CRC-checked."""
        seg = self.files[name]
        return self.read_segment(seg, verify=True, label=f"file {name}").tobytes()

    def extract_files(self, folder) -> dict[str, Path]:
        """Write the embedded files (tokenizer) into ``folder`` (created if needed).

        Returns ``{name: path}``. Every file is read and CRC-checked before anything is written,
        so a damaged file leaves the folder as it was. Names are plain file names (checked at
        open and again here), so nothing can land outside ``folder``; each file is written under
        a temporary name and renamed into place, so an entry already at that name (a symlink
        planted there, say) is replaced, never followed.
        """
        for name in self.files:
            if not plain_name(name):
                raise fail(self.path, f"embedded file name {show(name)} is not a plain file name")
        blobs = {name: self.read_file(name) for name in self.files}
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name, data in blobs.items():
                tmp = f".{name}.{secrets.token_hex(4)}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                             dir_fd=dir_fd)
                try:
                    with os.fdopen(fd, "wb") as out:
                        out.write(data)
                    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except BaseException:
                    try:
                        os.unlink(tmp, dir_fd=dir_fd)
                    except FileNotFoundError:
                        pass
                    raise
        finally:
            os.close(dir_fd)
        return {name: folder / name for name in blobs}

    def verify(self, chunk_bytes: int = 64 << 20):
        """Yield a :class:`ChecksumError` for every segment whose CRC-32C does not match.

        Reads the file sequentially in large chunks, so it runs at the disk's streaming speed.
        """
        segs = [(s, f"{e.name}:{s.kind}") for e in self.tensors.values() for s in e.segments.values()]
        segs += [(s, f"file {n}") for n, s in self.files.items()]
        segs.sort(key=lambda x: x[0].offset)
        for seg, label in segs:
            crc = 0
            for start in range(0, seg.length, chunk_bytes):
                n = min(chunk_bytes, seg.length - start)
                crc = crc32c(self._pread(seg.offset + start, n), crc)
            if crc != seg.crc32c:
                yield ChecksumError(
                    f"{self.path}: segment {label} (offset {seg.offset}, {seg.length} bytes) fails "
                    f"its CRC-32C: stored {seg.crc32c:#010x}, computed {crc:#010x}", segment=label)

    def summary(self) -> dict:
        """What ``endor-gds inspect --json`` prints."""
        tensors, layers = [], []
        dense_total = stored_total = 0
        by_codec: dict[str, list[int]] = {}  # codec -> [tensors, dense bytes, stored bytes, elements]
        for e in self.tensors.values():
            tensors.append({
                "name": e.name, "shape": list(e.shape), "dtype": e.dtype.name,
                "encoding": e.encoding, "codec": e.codec, "nnz": e.nnz,
                "density": (e.nnz / e.numel) if e.numel else 0.0,
                "extent": e.extent, "dense_bytes": e.dense_nbytes, "stored_bytes": e.stored_nbytes,
                # stored bits per element: every segment with its page padding
                "bits_per_element": 8 * e.stored_nbytes / e.numel if e.numel else 0.0,
                "expdict": e.expdict.manifest() if e.expdict is not None else None,
                "exphuff": e.exphuff.manifest() if e.exphuff is not None else None,
                "segments": [{"kind": s.kind, "offset": s.offset, "length": s.length,
                              "nbytes": s.nbytes} for s in e.segments.values()],
            })
            dense_total += e.dense_nbytes
            stored_total += e.stored_nbytes
            if e.needs_decode:
                acc = by_codec.setdefault(e.codec, [0, 0, 0, 0])
                for i, x in enumerate((1, e.dense_nbytes, e.stored_nbytes, e.numel)):
                    acc[i] += x
        encoded_dense, encoded_stored, encoded_numel = (sum(a[i] for a in by_codec.values()) for i in (1, 2, 3))
        shards = [e for by_rank in self.shards.values() for e in by_rank.values()]
        for ext in self.layers or shards:
            entries = [self.tensors[n] for n in ext.tensors]
            dense = sum(e.dense_nbytes for e in entries)
            nnz = sum(e.nnz for e in entries)
            numel = sum(e.numel for e in entries)
            layers.append({"index": ext.layer, "rank": ext.rank, "offset": ext.offset, "length": ext.length,
                           "tensors": len(entries), "density": nnz / numel if numel else 0.0,
                           "dense_bytes": dense, "stored_bytes": ext.length,
                           "ratio": dense / ext.length if ext.length else 0.0})
        return {
            "path": self.path,
            "format_version": self.format_version,
            "architecture": self.architecture,
            "file_bytes": self.file_size,
            "tile_elems": TILE_ELEMS,
            "prune": self.manifest.get("prune"),
            "tied": self.tied,
            "files": sorted(self.files),
            "resident": None if self.resident is None else
                {"offset": self.resident.offset, "length": self.resident.length,
                 "tensors": len(self.resident.tensors)},
            "layers": layers,  # in a tensor-parallel file, each rank's shard of each layer
            "tensor_parallel": self.tensor_parallel,
            # mixture-of-experts layers: expert extents per layer and their bytes (one read each)
            "experts": {str(i): {"count": len(exts), "stored_bytes": sum(e.length for e in exts),
                                 "largest_bytes": max(e.length for e in exts)}
                        for i, exts in sorted(self.experts.items())},
            "tensors": tensors,
            "totals": {
                "dense_bytes": dense_total,
                "stored_bytes": stored_total,
                "ratio": dense_total / stored_total if stored_total else 0.0,
                # the tensors stored encoded (bitmap, or dense entropy-coded): all but plain data
                "encoded_dense_bytes": encoded_dense,
                "encoded_stored_bytes": encoded_stored,
                "encoded_ratio": encoded_dense / encoded_stored if encoded_stored else None,
                "encoded_bits_per_element": 8 * encoded_stored / encoded_numel if encoded_numel else None,
                "codecs": {c: by_codec.get(c, [0])[0] for c in VERSION_CODECS[self.format_version]},
                "codec_bits_per_element": {c: 8 * a[2] / a[3] for c, a in by_codec.items() if a[3]},
            },
        }

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self) -> str:
        return (f"<EndorFile {self.path!r} v{self.format_version} {self.architecture} "
                f"layers={len(self.layers)} tensors={len(self.tensors)}>")

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

