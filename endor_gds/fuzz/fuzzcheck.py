"""The oracle of the .endor fuzzer (issue 7): runs one mutated file through every reader and
judges the outcome. Shared by tests/fuzz/test_fuzz_format.py and bench/fuzz_format.py.

A case keeps every promise when it ends in one of:

* ``open: <EndorError subclass>`` — :class:`EndorFile` refused the file;
* ``read: <EndorError subclass>`` — it opened, and ``verify()`` or a read refused a segment;
* ``ok: identical`` — every tensor and embedded file reads exactly as in the unmutated file;
* ``ok: valid, different`` — only for *hostile* mutants (the mutator recomputed the CRCs over
  its change, as a crafted file would): the file reads without error but holds other data. It
  is accepted only if every structural invariant of docs/format.md holds, checked here by
  :func:`spec_violations`, an implementation of the spec independent of container.py and
  the codec modules.

and, in every case: every error is an ``EndorError`` whose message names the file (and is at
most 2000 characters); the reference decoder (``read_tensor``) and the C decoder
(``CpuDecoder``, run on buffers fenced by inaccessible pages so that any out-of-bounds access
is a segfault) agree bit for bit on every tensor that needs decoding (bitmap, or a value codec:
dense exphuff too), or both raise ``DecodeError``; a tensor read with
``verify=True`` raises ``ChecksumError`` exactly when ``verify()`` reports one of its segments;
a non-hostile change to the bytes is always noticed (every byte of a packed file is covered by
a CRC or must be zero); ``extract_files`` writes exactly the embedded files into its folder and
nothing elsewhere; the case finishes within ``time_limit`` and its peak traced allocation
(tracemalloc: Python and numpy) stays under ``max(64 MiB, 4 x file size)``.

Anything else is an *escape*, reported with the case's op and detail so it can be replayed.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import signal
import struct
import time
import traceback
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from endor_gds.cli.main import main as cli_main
from endor_gds.codec.bitmap import PAGE, TILE_ELEMS, WORD_BITS, pad_to_page
from endor_gds.container import EndorFile, crc32c
from endor_gds.errors import ChecksumError, DecodeError, EndorError
from endor_gds.fuzz.fence import fenced_copy, fenced_empty
from endor_gds.fuzz.fuzzlib import HEADER, Base, Mutant

MiB = 1 << 20
MAX_MESSAGE = 2000


class Escape(Exception):
    """A broken promise found by the oracle (as opposed to a bad file correctly refused)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


class CaseTimeout(BaseException):
    """Raised by the per-case alarm; BaseException so that no library handler swallows it."""


@dataclass
class Result:
    outcome: str  # the histogram key
    escape: str | None  # None when the case kept every promise
    peak_bytes: int
    seconds: float


def alloc_limit(file_bytes: int) -> int:
    return max(64 * MiB, 4 * file_bytes)


# ---------------------------------------------------------------------------------------------
# The spec, checked independently of container.py and the codecs


_DT = {"F16": (2, True), "BF16": (2, True), "F32": (4, True), "F64": (8, False),
       "I64": (8, False), "I32": (4, False), "I16": (2, False), "I8": (1, False),
       "U8": (1, False), "BOOL": (1, False)}
# codecs expdict (format v2) and exphuff (v3): (exponent bits, residual bytes, residual bits left
# for the field / after the code)
_EXPDICT = {"F16": (5, 1, 3), "BF16": (8, 1, 0), "F32": (8, 3, 0)}
_MAX_CODE = 12  # exphuff: longest code, in bits
_CHUNK = 512  # exphuff: values per chunk; 4096 / 512 = 8 chunks per tile, 7 stored offsets
_PLAIN = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")
_CONTROL = re.compile("[\x00-\x1f\x7f]")
# version 5's tensor_parallel: the most ranks, the longest pack_id and plan module, the styles
_MAX_RANKS, _MAX_PACK_ID, _MAX_MODULE = 1024, 64, 1024
_STYLES = ("colwise", "rowwise", "replicated")


def _is_int(v) -> bool:
    return type(v) is int  # noqa: E721 - bool is not an int here


def _text(v, limit: int) -> bool:
    """A non-empty string of at most ``limit`` characters, none a control character (tools print it)."""
    return type(v) is str and 0 < len(v) <= limit and not _CONTROL.search(v)


def spec_violations(data: bytes, m) -> list[str]:
    """Every rule of docs/format.md that ``data`` (with parsed manifest ``m``) breaks."""
    bad: list[str] = []

    def need(ok, what):
        if not ok:
            bad.append(what)
        return ok

    magic, version, flags, moff, mlen, flen, mcrc = HEADER.unpack_from(data)
    need(magic == b"ENDORGDS", "magic")
    need(version in (1, 2, 3, 4, 5) and flags == 0, f"version {version} / flags {flags}")
    need(crc32c(data[:44]) == struct.unpack_from("<I", data, 44)[0], "header CRC")
    need(not any(data[48:PAGE]), "header page is not zero after the fields")
    need(flen == len(data), "file length")
    need(moff % PAGE == 0 and moff >= PAGE and mlen <= 64 * MiB, "manifest range")
    need(moff + pad_to_page(mlen) == flen, "the manifest does not end the file")
    need(crc32c(data[moff:moff + mlen]) == mcrc, "manifest CRC")
    need(not any(data[moff + mlen:]), "manifest padding is not zero")
    if not need(type(m) is dict, "manifest is not an object"):
        return bad
    need(m.get("format") == "endor" and _is_int(m.get("format_version"))
         and m["format_version"] == version, "format / format_version")
    need(_is_int(m.get("tile_elems")) and m["tile_elems"] == TILE_ELEMS, "tile_elems")
    need(m.get("checksum") == "crc32c", "checksum")
    need(type(m.get("architecture")) is str, "architecture")
    need(type(m.get("config")) is dict, "config")
    need(m.get("prune") is None or type(m.get("prune")) is dict, "prune")
    need(m.get("generation_config") is None or type(m.get("generation_config")) is dict,
         "generation_config")

    def in_range(off, length, lo, hi):
        return _is_int(off) and _is_int(length) and off % PAGE == 0 and length % PAGE == 0 \
            and length >= 0 and lo <= off and off + length <= hi

    extents = {}
    for e in m.get("extents") if type(m.get("extents")) is list else [None]:
        if not need(type(e) is dict and type(e.get("name")) is str, f"extent {e!r:.80}"):
            continue
        name, kind = e["name"], e.get("kind")
        need(name not in extents, f"extent {name} twice")
        need(in_range(e.get("offset"), e.get("length"), PAGE, moff), f"extent {name} range")
        if kind == "layer":
            need(_is_int(e.get("layer")) and name == f"layer.{e.get('layer')}", f"extent {name} layer")
        elif kind == "expert":  # version 4: expert e of layer i, named layer.<i>.expert.<e>
            need(version >= 4, f"extent {name}: kind expert in a version {version} file")
            need(_is_int(e.get("layer")) and _is_int(e.get("expert"))
                 and name == f"layer.{e['layer']}.expert.{e['expert']}", f"extent {name} layer/expert")
        elif kind == "shard":  # version 5: rank r's shard of layer i, named layer.<i>.rank.<r>
            need(version >= 5, f"extent {name}: kind shard in a version {version} file")
            need(_is_int(e.get("layer")) and _is_int(e.get("rank"))
                 and name == f"layer.{e['layer']}.rank.{e['rank']}", f"extent {name} layer/rank")
        else:
            need(kind in ("resident", "files") and name == kind, f"extent {name} kind {kind!r}")
        extents[name] = e
    layers = sorted(e["layer"] for e in extents.values() if e.get("kind") == "layer"
                    and _is_int(e.get("layer")))
    need(layers == list(range(len(layers))), "layers are not numbered 0..L-1")
    experts: dict = {}  # layer -> the expert numbers of its expert extents
    for e in extents.values():
        if e.get("kind") == "expert" and _is_int(e.get("layer")) and _is_int(e.get("expert")):
            experts.setdefault(e["layer"], []).append(e["expert"])
    for i, nums in sorted(experts.items()):
        need(0 <= i < len(layers), f"expert extents of layer {i}, but {len(layers)} layers")
        need(sorted(nums) == list(range(len(nums))), f"experts of layer {i} are not numbered 0..E-1")
    _shard_rules(m.get("tensor_parallel"), extents, version, bool(layers or experts), need)
    spans = sorted((e["offset"], e["offset"] + e["length"]) for e in extents.values()
                   if _is_int(e.get("offset")) and _is_int(e.get("length")))
    need(all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "extents overlap")

    seg_spans = []

    def segment(s, ext, label, kinds):
        if not need(type(s) is dict and s.get("kind") in kinds, f"{label}: segment kind"):
            return None
        off, length, nbytes = s.get("offset"), s.get("length"), s.get("nbytes")
        if not need(_is_int(nbytes) and _is_int(length) and length == pad_to_page(nbytes)
                    and _is_int(s.get("crc32c")) and 0 <= s["crc32c"] < 1 << 32, f"{label}: sizes"):
            return None
        lo, hi = (ext["offset"], ext["offset"] + ext["length"]) if ext else (0, -1)
        need(in_range(off, length, max(lo, PAGE), hi), f"{label}: outside its extent")
        seg_spans.append((off, off + length, label))
        return s

    names = set()
    for t in m.get("tensors") if type(m.get("tensors")) is list else [None]:
        if not need(type(t) is dict and type(t.get("name")) is str and 0 < len(t["name"]) <= 1024,
                    f"tensor {t!r:.80}"):
            continue
        name = t["name"]
        need(name not in names, f"tensor {name} twice")
        names.add(name)
        shape = t.get("shape")
        if not need(type(shape) is list and len(shape) <= 8 and all(_is_int(s) and s >= 0 for s in shape),
                    f"tensor {name} shape"):
            continue
        numel = 1
        for s in shape:
            numel *= s
        need(numel <= 1 << 40, f"tensor {name} numel")
        dt = _DT.get(t.get("dtype")) if type(t.get("dtype")) is str else None
        enc, nnz, codec = t.get("encoding"), t.get("nnz"), t.get("codec", "raw")
        if not need(dt is not None and enc in ("dense", "bitmap") and _is_int(nnz)
                    and 0 <= nnz <= numel, f"tensor {name} dtype/encoding/nnz"):
            continue
        # version 1: codec raw only; version 2: expdict too, for bitmap tensors only; version 3:
        # exphuff too, for bitmap and dense tensors; version 4: version 3's codecs (it adds expert
        # extents, checked above)
        if not need(codec == "raw" or (codec == "expdict" and version >= 2 and enc == "bitmap")
                    or (codec == "exphuff" and version >= 3),
                    f"tensor {name} codec {codec!r:.40} (version {version}, {enc})"):
            continue
        for key in ("expdict", "exphuff"):
            need(codec == key or key not in t, f"tensor {name}: {key} object on codec {codec}")
        ed = t.get("expdict") if codec == "expdict" else None
        eh = t.get("exphuff") if codec == "exphuff" else None
        layout = _EXPDICT.get(t["dtype"])
        if codec == "expdict":
            b = ed.get("index_bits") if type(ed) is dict else None
            ex = ed.get("exponents") if type(ed) is dict else None
            if not need(layout is not None and _is_int(b) and 1 <= b <= 4 and type(ex) is list
                        and len(ex) == 1 << b and all(_is_int(e) and 0 <= e < 1 << layout[0] for e in ex)
                        and len(set(ex)) == len(ex) and _is_int(ed.get("escapes"))
                        and 0 <= ed["escapes"] <= nnz, f"tensor {name}: expdict parameters"):
                continue
        if codec == "exphuff":
            cl = eh.get("code_lengths") if type(eh) is dict else None
            nbits = eh.get("bits") if type(eh) is dict else None
            # 2^E lengths in 0..12 whose Kraft sum (in units of 2^-12) is at most 1
            if not need(layout is not None and numel < 1 << 32 and type(cl) is list
                        and len(cl) == 1 << layout[0] and all(_is_int(x) and 0 <= x <= _MAX_CODE for x in cl)
                        and sum(1 << (_MAX_CODE - x) for x in cl if x) <= 1 << _MAX_CODE
                        and _is_int(nbits) and 0 <= nbits < 1 << 32, f"tensor {name}: exphuff parameters"):
                continue
            need(enc == "bitmap" or nnz == numel, f"tensor {name}: dense exphuff with nnz {nnz} of {numel}")
        ntiles = -(-numel // TILE_ELEMS)
        if enc == "bitmap":
            need(dt[1] and numel < 1 << 32, f"tensor {name}: bitmap needs F16/BF16/F32, < 2^32 elements")
            want = {"bitmap": 4 * -(-numel // WORD_BITS), "values": nnz * dt[0],
                    "tile_offsets": 4 * (ntiles + 1)}
        else:
            want = {"data": numel * dt[0]}
        if ed is not None:
            del want["values"]
            want.update(residuals=nnz * layout[1], codes=-(-nnz * (b + layout[2]) // 8),
                        escape_offsets=4 * (ntiles + 1),
                        escape_positions=2 * ed["escapes"], escape_values=dt[0] * ed["escapes"])
        if eh is not None:
            want.pop("values", None)
            want.pop("data", None)
            want.update(residuals=nnz * layout[1], bits=-(-nbits // 8), tile_bits=4 * (ntiles + 1),
                        chunk_bits=2 * 7 * ntiles)
        ext = extents.get(t.get("extent")) if type(t.get("extent")) is str else None
        if need(ext is not None and ext.get("kind") in ("resident", "layer", "expert", "shard"),
                f"tensor {name} extent"):
            # version 5: the tensors of a shard extent start with its rank.<r>.; in a tensor-parallel
            # file no other tensor starts with rank. (older files may name a tensor so)
            shard = ext.get("kind") == "shard"
            prefixed = name.startswith("rank.")
            need(name.startswith(f"rank.{ext.get('rank')}.") if shard
                 else not (prefixed and m.get("tensor_parallel") is not None),
                 f"tensor {name}: rank prefix in extent {ext.get('name')}")
        segs = t.get("segments") if type(t.get("segments")) is list else []
        got = {}
        for s in segs:
            s = segment(s, ext, f"tensor {name}", set(want))
            if s is not None:
                need(s["kind"] not in got, f"tensor {name}: {s['kind']} twice")
                got[s["kind"]] = s
        need({k: s["nbytes"] for k, s in got.items()} == want and len(segs) == len(want),
             f"tensor {name}: segment sizes")
        if bad or (enc == "dense" and eh is None):  # tables are read only where sizes and places are right
            continue
        offs = np.minimum(np.arange(ntiles + 1, dtype=np.int64) * TILE_ELEMS, numel)  # dense exphuff
        if enc == "bitmap":
            s = got["tile_offsets"]
            offs = np.frombuffer(data, "<u4", count=s["nbytes"] // 4, offset=s["offset"]).astype(np.int64)
            steps = np.diff(offs)
            if not need(offs.size == ntiles + 1 and offs[0] == 0 and offs[-1] == nnz
                        and (steps >= 0).all() and (steps <= TILE_ELEMS).all(), f"tensor {name}: tile offsets"):
                continue
        if ed is not None:
            _escape_rules(data, got, offs, ed["escapes"], f"tensor {name}", need)
        if eh is not None:
            _bit_rules(data, got, offs, cl, nbits, layout[2], f"tensor {name}", need)

    files = m.get("files", [])
    need(type(files) is list and len(files) <= 64, "files")
    fnames = set()
    for f in files if type(files) is list else []:
        if not need(type(f) is dict and type(f.get("name")) is str and _PLAIN.match(f["name"])
                    and not f["name"].startswith("."), f"file name {f!r:.80}"):
            continue
        need(f["name"] not in fnames, f"file {f['name']} twice")
        fnames.add(f["name"])
        ext = extents.get("files")
        segment(f, ext, f"file {f['name']}", {"file"})
    seg_spans.sort()
    need(all(a[1] <= b[0] for a, b in zip(seg_spans, seg_spans[1:])), "segments overlap")

    tied = m.get("tied", {})
    if need(type(tied) is dict, "tied"):
        for alias, target in tied.items():
            need(type(target) is str and alias not in names and target in names,
                 f"tie {alias} -> {target!r:.80}")
    return bad


def _shard_rules(tp, extents: dict, version: int, unsplit: bool, need) -> None:
    """docs/format.md, version 5: ``tensor_parallel`` (null: no entry) is there exactly when shard
    extents are, only in version 5, and is ``{size: 1..1024, ranks: distinct, increasing, below
    size, at least one, pack_id: a string of at most 64 characters, plan: {module: style}}``; its
    file stores each layer as nothing but one shard extent per rank of ``ranks`` (``unsplit``:
    the file has layer or expert extents), the layers numbered 0..L-1."""
    shards: dict = {}  # layer -> the ranks of its shard extents
    for e in extents.values():
        if e.get("kind") == "shard" and _is_int(e.get("layer")) and _is_int(e.get("rank")):
            shards.setdefault(e["layer"], []).append(e["rank"])
    if tp is None:
        need(not any(e.get("kind") == "shard" for e in extents.values()), "shard extents without tensor_parallel")
        return
    need(version >= 5, f"tensor_parallel in a version {version} file")
    need(not unsplit, "layer or expert extents in a tensor-parallel file")
    need(sorted(shards) == list(range(len(shards))), "shard layers are not numbered 0..L-1")
    if not need(type(tp) is dict, "tensor_parallel is not an object"):
        return
    size, ranks, plan = tp.get("size"), tp.get("ranks"), tp.get("plan")
    size_ok = need(_is_int(size) and 1 <= size <= _MAX_RANKS, "tensor_parallel size")
    if need(type(ranks) is list and len(ranks) > 0 and all(_is_int(x) for x in ranks)
            and ranks == sorted(set(ranks)) and ranks[0] >= 0 and (not size_ok or ranks[-1] < size),
            "tensor_parallel ranks"):
        for i, got in sorted(shards.items()):
            need(sorted(got) == ranks, f"layer {i} has shard extents of ranks {sorted(got)[:8]}")
    need(_text(tp.get("pack_id"), _MAX_PACK_ID), "tensor_parallel pack_id")
    need(type(plan) is dict and all(_text(k, _MAX_MODULE) and v in _STYLES for k, v in plan.items()),
         "tensor_parallel plan")


def _escape_rules(data: bytes, got: dict, offs: np.ndarray, nesc: int, label: str, need) -> None:
    """docs/format.md, codec expdict: escape offsets run from 0 to escapes, each tile has at most
    as many escapes as values, and its positions rise strictly below its value count."""
    s, p = got["escape_offsets"], got["escape_positions"]
    eo = np.frombuffer(data, "<u4", count=s["nbytes"] // 4, offset=s["offset"]).astype(np.int64)
    pos = np.frombuffer(data, "<u2", count=p["nbytes"] // 2, offset=p["offset"]).astype(np.int64)
    counts = np.diff(offs)
    if not need(eo.size == offs.size and eo[0] == 0 and eo[-1] == nesc and pos.size == nesc
                and (np.diff(eo) >= 0).all() and (np.diff(eo) <= counts).all(),
                f"{label}: escape offsets"):
        return
    for t in range(counts.size):
        tile = pos[eo[t]:eo[t + 1]]
        need((tile < counts[t]).all() and (np.diff(tile) > 0).all(), f"{label}: escape positions "
                                                                      f"of tile {t}")


def _bit_rules(data: bytes, got: dict, offs: np.ndarray, lengths: list, nbits: int, high: int,
               label: str, need) -> None:
    """docs/format.md, codec exphuff: tile_bits runs from 0 to bits, non-decreasing; the values of
    each tile (``offs``) are cut into chunks of 512, chunk c > 0 starting ``chunk_bits[7t + c - 1]``
    bits after the tile, the last ending where the next tile starts; every chunk spans between
    its value count times the shortest and times the longest unit (a code, then ``high`` bits)."""
    s, c = got["tile_bits"], got["chunk_bits"]
    tb = np.frombuffer(data, "<u4", count=s["nbytes"] // 4, offset=s["offset"]).astype(np.int64)
    cb = np.frombuffer(data, "<u2", count=c["nbytes"] // 2, offset=c["offset"]).astype(np.int64)
    ntiles = offs.size - 1
    if not need(tb.size == ntiles + 1 and tb[0] == 0 and tb[-1] == nbits and (np.diff(tb) >= 0).all()
                and cb.size == 7 * ntiles, f"{label}: tile bits"):
        return
    codes = [x for x in lengths if x]
    shortest = (min(codes) if codes else 0) + high  # no code at all: only decoding can refuse
    longest = (max(codes) if codes else 0) + high
    starts = np.concatenate([tb[:-1, None], tb[:-1, None] + cb.reshape(ntiles, 7), tb[1:, None]], axis=1)
    spans = np.diff(starts, axis=1)  # [ntiles, 8]
    counts = np.clip(np.diff(offs)[:, None] - _CHUNK * np.arange(8), 0, _CHUNK)
    wrong = np.argwhere((spans < counts * shortest) | (spans > counts * longest))
    if wrong.size:
        t, k = (int(x) for x in wrong[0])
        need(False, f"{label}: tile {t} chunk {k} spans {int(spans[t, k])} bits for "
                    f"{int(counts[t, k])} values of {shortest}-{longest} bits")


# ---------------------------------------------------------------------------------------------
# One case


def _check_message(exc: EndorError, path: Path) -> None:
    msg = str(exc)
    if str(path) not in msg or len(msg) > MAX_MESSAGE:
        raise Escape("bad error message", f"{type(exc).__name__} ({len(msg)} chars) does not name "
                                          f"the file in at most {MAX_MESSAGE} chars: {msg[:300]!r}")


def _try(fn, path: Path):
    """("ok", value) or ("err", EndorError); anything else propagates as an escape."""
    try:
        return "ok", fn()
    except EndorError as exc:
        _check_message(exc, path)
        return "err", exc


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # reshape: 0-dim too


def _c_decode(f: EndorFile, entry, decoder, path: Path) -> bytes:
    """The C decoder on the file's raw segments (no CRC check), fenced on every side."""
    segs = {k: fenced_copy(f.read_segment(s, verify=False)) for k, s in entry.segments.items()}
    out = fenced_empty(entry.numel * entry.dtype.itemsize)
    out.fill(0xA5)  # an element the decoder forgets to write shows up as a mismatch
    # raw values, expdict Streams or exphuff HuffStreams; a dense exphuff tensor has no bitmap
    bitmap, offs = (segs[k].view("<u4") if k in segs else None for k in ("bitmap", "tile_offsets"))
    decoder.decode([(bitmap, entry.values(segs), offs, out.view(entry.dtype.bits))],
                   where=[f"{path}: tensor {entry.name}"])
    return out.tobytes()


def _judge(base: Base, mutant: Mutant, path: Path, workdir: Path, decoder) -> str:
    try:
        f = EndorFile(path)
    except EndorError as exc:
        _check_message(exc, path)
        return f"open: {type(exc).__name__}"
    with f:
        broken = spec_violations(mutant.data, f.manifest)
        if broken:
            raise Escape("invalid file accepted", "; ".join(broken[:3]))
        failed = []
        crc_bad = set()
        for err in f.verify():
            _check_message(err, path)
            crc_bad.add(err.segment)
            failed.append(err)
        different = False
        for name in list(f.tensors) + list(f.tied):
            entry = f.resolve(name)
            labels = {f"{entry.name}:{k}" for k in entry.segments}
            ver = _try(lambda: f.read_tensor(name, verify=True), path)
            # The unchecked read, compared with the checked one and with the C decoder. For an
            # exphuff tensor whose checked read succeeded on the same bytes (no bad CRC) it is
            # that read: the exphuff reference decoder allocates in a 512-step loop and takes
            # ~0.15 s a tensor under tracemalloc, 13x its time without (raw and expdict tensors,
            # cheap to decode, are still read twice).
            reuse = entry.codec == "exphuff" and ver[0] == "ok" and not labels & crc_bad
            raw = ("ok", _bits(ver[1])) if reuse else \
                _try(lambda: f.read_tensor_bits(name, verify=False).tobytes(), path)
            if entry.needs_decode:
                c = _try(lambda: _c_decode(f, entry, decoder, path), path)
                both_ok = raw[0] == c[0] == "ok" and raw[1] == c[1]
                both_refuse = raw[0] == c[0] == "err" and isinstance(raw[1], DecodeError) \
                    and isinstance(c[1], DecodeError)
                if not (both_ok or both_refuse):
                    raise Escape("decoders disagree", f"tensor {name}: reference {raw[0]} "
                                                      f"({raw[1] if raw[0] == 'err' else ''}), C {c[0]}")
            if labels & crc_bad:
                if ver[0] == "ok" or not isinstance(ver[1], ChecksumError):
                    raise Escape("verify=True read missed a bad CRC", f"tensor {name}: {ver}")
            elif ver[0] == "err" and isinstance(ver[1], ChecksumError):
                raise Escape("ChecksumError on a segment verify() passes", f"tensor {name}")
            if ver[0] == "err":
                failed.append(ver[1])
                continue
            t = ver[1]
            if t.dtype != entry.dtype.torch or tuple(t.shape) != entry.shape:
                raise Escape("wrong tensor shape/dtype", f"{name}: {t.dtype} {tuple(t.shape)}")
            got = _bits(t)
            if raw[0] != "ok" or raw[1] != got:
                raise Escape("verify changed the data", f"tensor {name}")
            if base.tensors.get(name) != got:
                if not mutant.hostile:
                    raise Escape("silent corruption", f"tensor {name} differs from the packed data "
                                                      f"and no CRC was recomputed")
                different = True
        contents = {}
        for fname in f.files:
            r = _try(lambda: f.read_file(fname), path)
            if (f"file {fname}" in crc_bad) != (r[0] == "err" and isinstance(r[1], ChecksumError)):
                raise Escape("read_file and verify() disagree", f"file {fname}: {r}")
            if r[0] == "err":
                failed.append(r[1])
                continue
            contents[fname] = r[1]
            if base.files.get(fname) != r[1]:
                if not mutant.hostile:
                    raise Escape("silent corruption", f"embedded file {fname}")
                different = True
        _check_extract(f, contents, workdir, path)
        _try(f.summary, path)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = cli_main(["inspect", str(path), "--tensors"])
        if rc != 0:
            raise Escape("inspect fails on a file that opens", f"exit status {rc}")
    if failed:
        return f"read: {type(failed[0]).__name__}"
    if mutant.data != base.data and not mutant.hostile:
        raise Escape("undetected change", "the bytes changed, no CRC was recomputed, yet open, "
                                          "verify() and every read succeed")
    return "ok: valid, different" if different else "ok: identical"


def _check_extract(f: EndorFile, contents: dict, workdir: Path, path: Path) -> None:
    dest = workdir / "extracted"
    dest.mkdir(exist_ok=True)
    before = sorted(p.name for p in workdir.iterdir())
    r = _try(lambda: f.extract_files(dest), path)
    written = sorted(p.name for p in dest.iterdir()) if dest.is_dir() else []
    after = sorted(p.name for p in workdir.iterdir())
    if after != before:
        raise Escape("extract_files wrote outside its folder", f"{after}")
    if r[0] == "err":
        if written:
            raise Escape("extract_files left files after an error", f"{written}")
        return
    if len(contents) != len(f.files):
        raise Escape("extract_files succeeded although read_file failed", f"{sorted(f.files)}")
    if written != sorted(contents) or any((dest / n).read_bytes() != b for n, b in contents.items()):
        raise Escape("extract_files wrote the wrong files", f"{written} vs {sorted(contents)}")
    for n in written:
        (dest / n).unlink()


def _alarm(signum, frame):
    raise CaseTimeout()


def run_case(base: Base, mutant: Mutant, workdir, decoder, *, time_limit: float = 30.0) -> Result:
    """Write ``mutant`` to ``workdir``, run every reader over it, and judge the outcome."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for leftover in workdir.iterdir():  # files only: removing folders is slow on some file systems
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    path = workdir / "case.endor"
    path.write_bytes(mutant.data)
    started_here = not tracemalloc.is_tracing()
    if started_here:
        tracemalloc.start()
    tracemalloc.reset_peak()
    floor = tracemalloc.get_traced_memory()[0]
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, time_limit)
    t0 = time.perf_counter()
    escape = None
    try:
        outcome = _judge(base, mutant, path, workdir, decoder)
    except CaseTimeout:
        outcome, escape = "ESCAPE hang", f"no result within {time_limit} s"
    except Escape as exc:
        outcome, escape = f"ESCAPE {exc.kind}", str(exc)
    except Exception as exc:  # noqa: BLE001 - any other exception type is exactly what we hunt
        outcome = f"ESCAPE {type(exc).__name__}"
        escape = "".join(traceback.format_exception(exc, limit=-6))[-3000:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] - floor
    if started_here:
        tracemalloc.stop()
    if escape is None and peak > alloc_limit(len(mutant.data)):
        outcome = "ESCAPE allocation"
        escape = f"peak traced allocation {peak} bytes for a {len(mutant.data)}-byte file"
    return Result(outcome, escape, peak, seconds)
