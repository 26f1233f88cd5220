"""The mutation engine for fuzzing .endor files (issue 7), shared by tests/fuzz/test_fuzz_format.py
(hypothesis, a few hundred cases in CI) and bench/fuzz_format.py (long runs). The oracle that
judges each mutated file is endor_gds/fuzz/fuzzcheck.py.

A *corpus* is a handful of real files packed from tiny random checkpoints (bitmap tensors from
magnitude pruning in fp16, bf16 and fp32 with partial tiles and partial bitmap words, a
dense-only file, embedded tokenizer files, tied embeddings; format v1 files (codec raw), format
v2 files whose linear weights use the expdict codec, with escapes in their tiles, and format v3
files whose linear weights use the exphuff codec, bitmap and dense, with partial chunks and codes
up to the 12-bit limit; a format v4 file of a mixture-of-experts model, its experts' slices in
extents of kind "expert"; a format v5 file packed for tensor parallelism over two ranks, each
layer in one extent of kind "shard" per rank). A *mutator* turns one corpus file into a :class:`Mutant`: the new bytes,
a line saying what changed, and ``hostile``:

* ``hostile=False`` — plain damage (bit flips, overwrites, truncation, extension) with no
  checksum recomputed. Every byte of a packed file is covered by a CRC or must be zero, so
  open + ``verify()`` must notice any such change.
* ``hostile=True`` — the mutator recomputed the CRCs over its change (header CRC, manifest CRC,
  a segment's CRC), as a crafted file would. Such a file may be valid and simply hold other
  data; it must then satisfy every structural invariant, which the oracle checks.

Everything is a pure function of ``(corpus file, op name, random.Random)``, so a case is
reproduced from its seed alone.
"""

from __future__ import annotations

import copy
import json
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

import endor_gds
from endor_gds.codec.bitmap import PAGE, TILE_ELEMS, WORD_BITS, num_tiles, pad_to_page
from endor_gds.codec.expdict import LAYOUTS
from endor_gds.codec.exphuff import CHUNKS_PER_TILE
from endor_gds.container import crc32c
from endor_gds.packing.prune import magnitude_prune
from endor_gds.shards import STYLES

HEADER = struct.Struct("<8sIIQQQI")  # magic, version, flags, moff, mlen, flen, manifest CRC
HEADER_FIELDS = ("magic", "version", "flags", "moff", "mlen", "flen", "mcrc")
U32, U64 = (1 << 32) - 1, (1 << 64) - 1


# ---------------------------------------------------------------------------------------------
# Corpus


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    family: str
    dtype: torch.dtype
    prune: str
    sparsity: float
    tokenizer: bool
    overrides: tuple  # config overrides, as sorted (key, value) pairs
    codec: str = "raw"  # pack(codec=...): "raw" keeps a version-1 file
    outliers: bool = False  # rare far exponents and special values: escapes, long Huffman codes
    tp: int | None = None  # pack(tp=...): a tensor-parallel (version-5) file of that many ranks


_SMALL = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)

# Tiny on purpose (250-560 KB files, mostly page padding): a case opens the file and reads every
# tensor several ways, and the bench runs tens of thousands of cases on two cores. Shapes are
# chosen so that bitmap tensors have partial tiles (176 x 64 = 2.75 tiles) and partial bitmap
# words (72 x 90 = 6480 elements, 6480 % 32 = 16), and dense exphuff tensors partial tiles and
# partial 512-value chunks (64 x 90 = 5760 = 4096 + 3 * 512 + 128; 16 x 90 = 1440).
CORPUS = (
    CorpusSpec("llama-f16-magnitude", "llama", torch.float16, "magnitude", 0.5, False,
               tuple(sorted(dict(_SMALL, hidden_size=64, intermediate_size=176).items()))),
    CorpusSpec("qwen2-f32-magnitude-files", "qwen2", torch.float32, "magnitude", 0.6, True,
               tuple(sorted(dict(_SMALL, hidden_size=72, intermediate_size=90).items()))),
    CorpusSpec("opt-bf16-magnitude-tied", "opt", torch.bfloat16, "magnitude", 0.7, True,
               tuple(sorted(dict(_SMALL, hidden_size=64, ffn_dim=176,
                                 word_embed_proj_dim=64).items()))),
    CorpusSpec("llama-f16-dense-files-tied", "llama", torch.float16, "none", 0.0, True,
               tuple(sorted(dict(_SMALL, hidden_size=64, intermediate_size=176,
                                 tie_word_embeddings=True).items()))),
    # format v2: every linear weight with codec expdict; outliers give escapes in most tiles
    CorpusSpec("llama-bf16-expdict-outliers", "llama", torch.bfloat16, "magnitude", 0.5, False,
               tuple(sorted(dict(_SMALL, hidden_size=64, intermediate_size=176).items())),
               codec="expdict", outliers=True),
    CorpusSpec("qwen2-f16-expdict-files", "qwen2", torch.float16, "magnitude", 0.4, True,
               tuple(sorted(dict(_SMALL, hidden_size=72, intermediate_size=90).items())),
               codec="expdict", outliers=True),
    # format v3, codec exphuff. codec="exphuff" stores each linear weight as the smaller of dense
    # and bitmap exphuff: here the 22528-element MLP matrices at 70 % come out bitmap, the
    # attention matrices (4096 elements and fewer: a page per segment either way, and bitmap has
    # two more segments) dense, so one file holds both. Outliers give codes of 9-10 bits.
    # One decoder layer each: the reference exphuff decoder takes ~0.15 s a tensor under the
    # oracle's tracemalloc, so every exphuff tensor costs each case that reads the file.
    CorpusSpec("llama-f16-exphuff-outliers", "llama", torch.float16, "magnitude", 0.7, False,
               tuple(sorted(dict(_SMALL, num_hidden_layers=1, hidden_size=64, intermediate_size=352).items())),
               codec="exphuff", outliers=True),
    # unpruned: every linear weight dense exphuff, no bitmap; the long tail of small exponents
    # of N(0, 0.02) weights gives codes up to the 12-bit limit
    CorpusSpec("opt-bf16-exphuff-dense-tied", "opt", torch.bfloat16, "none", 0.0, False,
               tuple(sorted(dict(_SMALL, num_hidden_layers=1, hidden_size=64, ffn_dim=90,
                                 word_embed_proj_dim=64).items())),
               codec="exphuff"),
    CorpusSpec("qwen2-f32-exphuff-dense-files", "qwen2", torch.float32, "none", 0.0, True,
               tuple(sorted(dict(_SMALL, num_hidden_layers=1, hidden_size=16, intermediate_size=90).items())),
               codec="exphuff"),
    # format v4: a mixture-of-experts model, 2 layers of 4 experts, each expert's slices in its
    # own extent layer.<i>.expert.<e> (codec raw: a v4 file has v3's codecs, and raw is the
    # cheapest to read). At 70 % the [192, 64] gate_up slices come out bitmap (partial tiles),
    # the [64, 96] down slices dense (a page each either way): both encodings in expert extents.
    CorpusSpec("qwen3_moe-bf16-magnitude-experts", "qwen3_moe", torch.bfloat16, "magnitude", 0.7, False,
               tuple(sorted(dict(_SMALL, hidden_size=64, head_dim=16, num_experts=4,
                                 moe_intermediate_size=96).items()))),
    # format v5: tensor-parallel over 2 ranks, each layer in extents layer.<i>.rank.0 and .rank.1
    # holding that rank's shards, named rank.<r>.<parameter> (codec raw, as above). At 70 % the
    # MLP shards ([176, 64] and [64, 176]: partial tiles) come out bitmap, the attention shards
    # (2048 elements and fewer) and the norms every rank holds whole dense.
    CorpusSpec("llama-bf16-magnitude-tp2", "llama", torch.bfloat16, "magnitude", 0.7, False,
               tuple(sorted(dict(_SMALL, hidden_size=64, intermediate_size=352).items())), tp=2),
)


def _outliers(sparsity: float):
    """A per-tensor pruner for pack(): magnitude pruning, then every 29th survivor of a linear
    weight scaled by one of 2^+-3 .. 2^+-14 (24 rare exponents: more than a 16-entry dictionary
    holds) and a few special bit patterns (-0.0, a subnormal, a NaN payload), so the exponent
    dictionary leaves escapes in the tiles."""
    powers = torch.tensor([p for k in range(3, 15) for p in (k, -k)], dtype=torch.float32)

    def prune(name: str, t: torch.Tensor) -> torch.Tensor:
        if t.dim() < 2 or not t.is_floating_point():
            return t
        t = magnitude_prune(t, sparsity).clone()
        flat = t.view(-1)
        live = torch.nonzero(flat).reshape(-1)
        pick = live[::29]
        scale = torch.pow(2.0, powers[torch.arange(pick.numel()) % powers.numel()])
        flat[pick] = (flat[pick].float() * scale).to(t.dtype)
        ints = flat.view(torch.int16 if t.element_size() == 2 else torch.int32)
        sign = -(1 << (8 * t.element_size() - 1))
        specials = [sign, 1, (0x7F81 if t.dtype == torch.bfloat16 else 0x7C01)
                    if t.element_size() == 2 else 0x7F800001]
        for pos, bits in zip(live[5::301], specials):
            ints[pos] = bits
        return t

    return prune


@dataclass(frozen=True)
class SegRef:
    """One segment of a corpus file, and where its dict sits in the manifest."""

    label: str  # "tensor <name>:<kind>" or "file <name>"
    kind: str
    offset: int
    length: int
    nbytes: int
    where: tuple  # ("tensors", i, "segments", j) or ("files", i)


@dataclass
class Base:
    """An unmutated corpus file and what reading it gives (the oracle's reference)."""

    name: str
    path: Path
    data: bytes
    moff: int
    mlen: int
    mcrc: int
    manifest: dict
    tensors: dict  # every readable name, tied aliases included -> bit-pattern bytes
    files: dict  # embedded file name -> bytes
    segments: list  # [SegRef]

    @property
    def manifest_text(self) -> bytes:
        return self.data[self.moff:self.moff + self.mlen]


def build_corpus(folder, build_model) -> list[Path]:
    """Pack every :data:`CORPUS` entry into ``folder``; ``build_model`` is endor_gds/benchmarks/models.py's."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec in CORPUS:
        dst = folder / f"{spec.name}.endor"
        if not dst.exists():
            src = build_model(folder / spec.name, spec.family, spec.dtype, tokenizer=spec.tokenizer,
                              **dict(spec.overrides))
            endor_gds.pack(src, dst, prune=spec.prune, sparsity=spec.sparsity or 0.5,
                           progress=False, codec=spec.codec, tp=spec.tp,
                           pruner=_outliers(spec.sparsity) if spec.outliers else None)
        paths.append(dst)
    return paths


def load_base(path) -> Base:
    path = Path(path)
    data = path.read_bytes()
    _magic, _v, _fl, moff, mlen, _flen, mcrc = HEADER.unpack_from(data)
    manifest = json.loads(data[moff:moff + mlen])
    segments = []
    for i, t in enumerate(manifest["tensors"]):
        for j, s in enumerate(t["segments"]):
            segments.append(SegRef(f"tensor {t['name']}:{s['kind']}", s["kind"], s["offset"],
                                   s["length"], s["nbytes"], ("tensors", i, "segments", j)))
    for i, s in enumerate(manifest.get("files", [])):
        segments.append(SegRef(f"file {s['name']}", "file", s["offset"], s["length"], s["nbytes"],
                               ("files", i)))
    with endor_gds.open(path) as f:
        names = list(f.tensors) + list(f.tied)
        tensors = {n: f.read_tensor_bits(n, verify=True).tobytes() for n in names}
        files = {n: f.read_file(n) for n in f.files}
        kinds = {e.encoding for e in f.tensors.values()}
    base = Base(path.stem, path, data, moff, mlen, mcrc, manifest, tensors, files, segments)
    expect_bitmap = "dense" not in path.stem
    if ("bitmap" in kinds) != expect_bitmap:
        raise AssertionError(f"corpus file {path.name} should {'' if expect_bitmap else 'not '}"
                             f"hold bitmap tensors (encodings: {sorted(kinds)})")
    return base


# ---------------------------------------------------------------------------------------------
# Rebuilding a file after a change


@dataclass
class Mutant:
    op: str
    detail: str
    data: bytes
    hostile: bool  # the mutator recomputed checksums over its change


def header_of(data: bytes) -> dict:
    return dict(zip(HEADER_FIELDS, HEADER.unpack_from(data)))


def with_header(data: bytes, *, fix_crc: bool = True, **fields) -> bytes:
    """``data`` with header fields replaced (and its CRC recomputed unless ``fix_crc=False``)."""
    h = header_of(data)
    h.update(fields)
    head = HEADER.pack(*(h[k] for k in HEADER_FIELDS))
    crc = crc32c(head) if fix_crc else struct.unpack_from("<I", data, HEADER.size)[0]
    return head + struct.pack("<I", crc) + data[HEADER.size + 4:]


# JSON the standard library cannot write (it recurses) or writes slowly, spliced in as text:
# a string "\x00DEEP:<n>" becomes n nested arrays, "\x00DIGITS:<n>" an n-digit integer.
def _splice(text: str) -> str:
    while "\\u0000DEEP:" in text or "\\u0000DIGITS:" in text:
        for tag, make in (("DEEP", lambda n: "[" * n + "]" * n), ("DIGITS", lambda n: "9" * n)):
            key = f'"\\u0000{tag}:'
            at = text.find(key)
            if at >= 0:
                end = text.index('"', at + 1)
                n = int(text[at + len(key):end])
                text = text[:at] + make(n) + text[end + 1:]
    return text


def dump(manifest) -> bytes:
    """Serialise like the packer does (compact separators), with the splices above."""
    return _splice(json.dumps(manifest, separators=(",", ":"))).encode()


def with_manifest(base: Base, text: bytes, *, fix_crc: bool = True) -> bytes:
    """``base`` with its manifest replaced by ``text``; header lengths and CRCs follow."""
    body = base.data[:base.moff] + text + bytes(pad_to_page(len(text)) - len(text))
    return with_header(body, mlen=len(text), flen=len(body),
                       mcrc=crc32c(text) if fix_crc else base.mcrc)


def get_at(obj, where):
    for k in where:
        obj = obj[k]
    return obj


def with_segment_crc(base: Base, data: bytes, seg: SegRef) -> bytes:
    """``data`` (same layout as ``base``) with ``seg``'s manifest CRC recomputed from ``data``."""
    m = copy.deepcopy(base.manifest)
    get_at(m, seg.where)["crc32c"] = crc32c(data[seg.offset:seg.offset + seg.length])
    text = dump(m)
    body = data[:base.moff] + text + bytes(pad_to_page(len(text)) - len(text))
    return with_header(body, mlen=len(text), flen=len(body), mcrc=crc32c(text))


# ---------------------------------------------------------------------------------------------
# Interesting values


def _ints(old: int) -> list[int]:
    return [old - 1, old + 1, old + PAGE, old - PAGE, old * 2, -old, old + (1 << 32),
            old ^ (1 << random.Random(old).randrange(40))]


INTS = [-1, 0, 1, 2, 31, 32, 33, 4095, 4096, 4097, 8192, (1 << 31) - 1, U32, 1 << 32, 1 << 40,
        (1 << 40) + 1, (1 << 53) + 1, (1 << 63) - 1, 1 << 63, 1 << 64, -(1 << 63), 10 ** 30]
OTHERS = [0.5, 1.0, 4096.0, -0.0, 1e308, float("nan"), float("inf"), "", "x", "0", "4096", "F16",
          "bitmap", "dense", "../../etc/passwd", "\x00", "é", None, True, False, [], [1], {},
          {"a": 1}, "\x00DEEP:3"]


def interesting(rng: random.Random, old):
    """A value to put where ``old`` was: near-misses of ``old`` half the time, else anything."""
    if rng.random() < 0.5:
        if isinstance(old, bool):
            return not old
        if isinstance(old, int):
            return rng.choice(_ints(old))
        if isinstance(old, str):
            return rng.choice([old + "x", old[:-1], old.upper(), old * 2, "", old + "\x00"])
        if isinstance(old, list):
            return rng.choice([old[:-1], old + old[-1:], old[::-1], [], [old], old * 3])
        if isinstance(old, dict) and old:
            k = rng.choice(sorted(old))
            return {kk: v for kk, v in old.items() if kk != k}
    return copy.deepcopy(rng.choice(INTS + OTHERS))


# ---------------------------------------------------------------------------------------------
# Mutators: (base, rng) -> (data, detail, hostile)


def _flip_bits(buf: bytearray, lo: int, hi: int, rng: random.Random, count: int) -> list[int]:
    at = [rng.randrange(lo, hi) for _ in range(count)]
    for pos in at:
        buf[pos] ^= 1 << rng.randrange(8)
    return at


def m_header_bitflip(base, rng):
    buf = bytearray(base.data)
    at = _flip_bits(buf, 0, HEADER.size + 4, rng, rng.choice([1, 1, 2, 3]))
    return bytes(buf), f"flipped bits at header bytes {at}", False


def m_header_field(base, rng):
    h = header_of(base.data)
    field = rng.choice(HEADER_FIELDS)
    old = h[field]
    if field == "magic":
        new = rng.choice([b"ENDORGDT", b"endorgds", b"\0" * 8, b"ENDORGD\0", b"SAFETENS"])
    else:
        hi = U64 if field in ("moff", "mlen", "flen") else U32
        cands = [0, 1, 2, hi, hi - 1, old + 1, old - 1, old + PAGE, old - PAGE, old * 2,
                 rng.randrange(hi + 1), 64 << 20, (64 << 20) + 1, PAGE, len(base.data)]
        new = min(max(rng.choice(cands), 0), hi)
    return with_header(base.data, **{field: new}), f"header {field}: {old!r} -> {new!r}", True


def m_header_padding(base, rng):
    buf = bytearray(base.data)
    pos = rng.randrange(HEADER.size + 4, PAGE)
    buf[pos] = rng.randrange(1, 256)
    return bytes(buf), f"non-zero byte {buf[pos]:#04x} in the header page at {pos}", False


def m_manifest_bytes(base, rng):
    text = bytearray(base.manifest_text)
    what = rng.choice(["flip", "overwrite", "insert", "delete", "truncate", "punct"])
    pos = rng.randrange(len(text))
    if what == "flip":
        _flip_bits(text, 0, len(text), rng, rng.choice([1, 2, 4]))
    elif what == "overwrite":
        text[pos:pos + 1] = bytes([rng.randrange(256)])
    elif what == "insert":
        text[pos:pos] = rng.choice([b"0", b"9999999999999999999999", b"-", b"[", b"{", b"\"",
                                    b",", b"\xff", b"\\u0000", b" "])
    elif what == "delete":
        del text[pos:pos + rng.randrange(1, 16)]
    elif what == "truncate":
        del text[pos:]
    else:  # swap one JSON punctuation mark for another: keeps most of the text parseable
        marks = [i for i, c in enumerate(text) if c in b"[]{},:\""]
        i = rng.choice(marks)
        text[i] = rng.choice(b"[]{},:\"0")
    fix = rng.random() < 0.85
    if fix:
        return with_manifest(base, bytes(text)), f"manifest text {what} at {pos}, CRC recomputed", True
    if len(text) == base.mlen:
        data = base.data[:base.moff] + bytes(text) + base.data[base.moff + base.mlen:]
        return data, f"manifest text {what} at {pos}, CRC left stale", False
    return with_manifest(base, bytes(text), fix_crc=False), \
        f"manifest text {what} at {pos}, length fixed in the header, CRC left stale", True


def m_manifest_padding(base, rng):
    lo, hi = base.moff + base.mlen, len(base.data)
    if lo == hi:
        return m_header_padding(base, rng)
    buf = bytearray(base.data)
    pos = rng.randrange(lo, hi)
    buf[pos] = rng.randrange(1, 256)
    return bytes(buf), f"non-zero byte in the manifest's page padding at {pos}", False


# -- structured manifest mutations (always rewritten with fresh CRCs: hostile) ----------------


def _tensor(m, rng, encoding=None):
    ts = [t for t in m["tensors"] if encoding is None or t["encoding"] == encoding]
    return rng.choice(ts or m["tensors"])


def _all_segments(m) -> list[dict]:
    return [s for t in m["tensors"] for s in t["segments"]] + list(m.get("files", []))


def _dicts(m, rng) -> tuple[str, dict]:
    region = rng.choices(["tensor", "segment", "extent", "file", "top", "tied", "prune"],
                         weights=[4, 5, 3, 2, 2, 1, 1])[0]
    if region == "tensor":
        return "tensor", _tensor(m, rng)
    if region == "segment":
        return "segment", rng.choice(_all_segments(m))
    if region == "extent":
        return "extent", rng.choice(m["extents"])
    if region == "file" and m.get("files"):
        return "file", rng.choice(m["files"])
    if region == "tied" and m.get("tied"):
        return "tied", m["tied"]
    if region == "prune":
        return "prune", m["prune"]
    return "top", m


def consistent_sizes(t: dict) -> None:
    """Make a tensor's segment sizes agree with its (possibly mutated) shape/dtype/nnz/encoding,
    so that a mutation gets past the size check and reaches the placement checks."""
    try:
        n = 1
        for s in t["shape"]:
            n *= s
        item = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2}.get(t["dtype"], 1)
        if t.get("codec") == "exphuff":  # bitmap or dense: the streams replace values / data
            rb, ntiles = LAYOUTS[t["dtype"]].residual_bytes, num_tiles(n)
            sizes = {"residuals": t["nnz"] * rb, "bits": -(-t["exphuff"]["bits"] // 8),
                     "tile_bits": 4 * (ntiles + 1), "chunk_bits": 2 * (CHUNKS_PER_TILE - 1) * ntiles}
            if t["encoding"] == "bitmap":
                sizes.update(bitmap=4 * -(-n // WORD_BITS), tile_offsets=4 * (ntiles + 1))
        elif t["encoding"] == "bitmap" and t.get("codec") == "expdict":
            layout, ed = LAYOUTS[t["dtype"]], t["expdict"]
            w = ed["index_bits"] + layout.high_bits
            sizes = {"bitmap": 4 * -(-n // WORD_BITS), "tile_offsets": 4 * (num_tiles(n) + 1),
                     "residuals": t["nnz"] * layout.residual_bytes, "codes": -(-t["nnz"] * w // 8),
                     "escape_offsets": 4 * (num_tiles(n) + 1),
                     "escape_positions": 2 * ed["escapes"], "escape_values": item * ed["escapes"]}
        elif t["encoding"] == "bitmap":
            sizes = {"bitmap": 4 * -(-n // WORD_BITS), "values": t["nnz"] * item,
                     "tile_offsets": 4 * (num_tiles(n) + 1)}
        else:
            sizes = {"data": n * item}
        for s in t["segments"]:
            if s.get("kind") in sizes:
                s["nbytes"] = sizes[s["kind"]]
                s["length"] = pad_to_page(s["nbytes"])
    except (TypeError, KeyError, ValueError, OverflowError):
        pass  # the mutation broke the fields this needs: leave the sizes as they are


def j_value(m, base, rng):
    region, d = _dicts(m, rng)
    if not d:
        return "empty dict left alone"
    key = rng.choice(sorted(d))
    old = d[key]
    d[key] = interesting(rng, old)
    return f"{region}[{key!r}]: {_short(old)} -> {_short(d[key])}"


def j_delete(m, base, rng):
    region, d = _dicts(m, rng)
    if not d:
        return "empty dict left alone"
    key = rng.choice(sorted(d))
    del d[key]
    return f"deleted {region}[{key!r}]"


def j_swap_fields(m, base, rng):
    region, d = _dicts(m, rng)
    if len(d) < 2:
        return "nothing to swap"
    a, b = rng.sample(sorted(d), 2)
    d[a], d[b] = d[b], d[a]
    return f"swapped {region} fields {a!r} and {b!r}"


def j_swap_entries(m, base, rng):
    kind = rng.choice(["segments", "extents", "tensors", "files"])
    pool = {"segments": _all_segments(m), "extents": m["extents"], "tensors": m["tensors"],
            "files": m.get("files", [])}[kind]
    if len(pool) < 2:
        return "nothing to swap"
    a, b = rng.sample(pool, 2)
    keys = sorted(set(a) & set(b))
    key = rng.choice(keys + ["*"])
    if key == "*":  # the whole entries trade places (their dicts, in place)
        a_copy = dict(a)
        a.clear()
        a.update(b)
        b.clear()
        b.update(a_copy)
    else:
        a[key], b[key] = b[key], a[key]
    return f"swapped {key!r} between two {kind}"


def j_duplicate(m, base, rng):
    kind = rng.choice(["tensors", "extents", "files", "segments"])
    if kind == "segments":
        t = _tensor(m, rng)
        seq = t["segments"]
    else:
        seq = m.get(kind) or m["tensors"]
    item = copy.deepcopy(rng.choice(seq))
    seq.insert(rng.randrange(len(seq) + 1), item)
    return f"duplicated an entry of {kind}"


def j_segment_place(m, base, rng):
    segs = _all_segments(m)
    s = rng.choice(segs)
    other = rng.choice(segs)
    ext = rng.choice(m["extents"])
    flen = len(base.data)
    choice = rng.choice(["overlap", "next_page", "manifest", "file_end", "beyond", "unaligned",
                         "zero", "extent_end", "before_extent", "grow", "shrink"])
    if choice == "overlap":
        s["offset"] = other["offset"]
    elif choice == "next_page":
        s["offset"] += PAGE
    elif choice == "manifest":
        s["offset"] = base.moff
    elif choice == "file_end":
        s["offset"] = flen
    elif choice == "beyond":
        s["offset"] = rng.choice([flen + PAGE, 1 << 40, 1 << 63, U64])
    elif choice == "unaligned":
        s["offset"] += rng.choice([1, 512, 4095])
    elif choice == "zero":
        s["offset"] = 0  # the header page itself
    elif choice == "extent_end":
        s["offset"] = ext["offset"] + ext["length"] - PAGE
    elif choice == "before_extent":
        s["offset"] = ext["offset"] - PAGE
    elif choice == "grow":
        s["length"] += PAGE * rng.choice([1, 2, 1000])
        if rng.random() < 0.5:
            s["nbytes"] = s["length"]
    else:
        s["nbytes"] = max(0, s["nbytes"] - rng.choice([1, 4, PAGE]))
        if rng.random() < 0.5:
            s["length"] = pad_to_page(s["nbytes"])
    return f"segment placement: {choice}"


def j_extent_place(m, base, rng):
    e = rng.choice(m["extents"])
    other = rng.choice(m["extents"])
    choice = rng.choice(["overlap", "shrink", "grow", "move", "layer", "layer_dup", "kind", "name",
                         "beyond", "unaligned", "zero_length"])
    if choice == "overlap":
        e["offset"] = other["offset"]
    elif choice == "shrink":
        e["length"] = max(0, e["length"] - PAGE)
    elif choice == "grow":
        e["length"] += PAGE
    elif choice == "move":
        e["offset"] += PAGE
    elif choice == "layer":
        e["layer"] = rng.choice([-1, 0, 1, 2, 3, 1 << 40, "0", None])
    elif choice == "layer_dup":
        e["layer"] = other.get("layer", 0)
    elif choice == "kind":
        e["kind"] = rng.choice(["resident", "layer", "files", "weights", None, 1])
    elif choice == "name":
        e["name"] = rng.choice([other["name"], "layer.9", "files", "resident", "", "x" * 2000])
    elif choice == "beyond":
        e["length"] = len(base.data) + PAGE
    elif choice == "unaligned":
        e["offset"] += 1
    else:
        e["length"] = 0
    return f"extent placement: {choice}"


def j_shape(m, base, rng):
    t = _tensor(m, rng)
    old = list(t["shape"])
    n = 1
    for s in old:
        n *= s
    choice = rng.choice([[], [n], old[::-1], old + [1], [1] * 9, [n + 1], [2] * 40, [1 << 40],
                         [1 << 20, 1 << 21], [1 << 32, 1 << 32], [1 << 63], [1 << 64], [-1, -n],
                         [0], [0, 1 << 62], [float(n)], [str(n)], [None], [[n]], "x", n, None,
                         [65536, 65537], [U32]])
    t["shape"] = copy.deepcopy(choice)
    fixed = rng.random() < 0.6
    if fixed:
        consistent_sizes(t)
    return f"tensor {t['name']} shape {old} -> {_short(choice)}{', sizes made consistent' if fixed else ''}"


def j_dtype(m, base, rng):
    t = _tensor(m, rng)
    old = t["dtype"]
    t["dtype"] = rng.choice(["F16", "BF16", "F32", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL",
                             "f16", "F8_E4M3", "", None, 2, ["F16"], {"F16": 1}])
    fixed = rng.random() < 0.6
    if fixed:
        consistent_sizes(t)
    return f"tensor {t['name']} dtype {old!r} -> {_short(t['dtype'])}"


def j_encoding(m, base, rng):
    t = _tensor(m, rng)
    field = rng.choice(["encoding", "codec"])
    old = t.get(field)
    t[field] = rng.choice(["dense", "bitmap", "csr", "raw", "expdict", "exphuff", "zstd", "", None, 1,
                           ["bitmap"]])
    if rng.random() < 0.3:
        consistent_sizes(t)
    return f"tensor {t['name']} {field} {old!r} -> {_short(t[field])}"


def j_nnz(m, base, rng):
    t = _tensor(m, rng, "bitmap" if rng.random() < 0.8 else None)
    old = t["nnz"]
    n = 1
    for s in t["shape"]:
        n *= s
    t["nnz"] = rng.choice([old - 1, old + 1, 0, n, n + 1, 1 << 32, -1, old * 2, 0.0 + old, str(old)])
    fixed = rng.random() < 0.6
    if fixed:
        consistent_sizes(t)
    return f"tensor {t['name']} nnz {old} -> {_short(t['nnz'])}{', sizes made consistent' if fixed else ''}"


def j_expdict(m, base, rng):
    """Change an expdict tensor's parameters: index width, dictionary, escape count."""
    ts = [t for t in m["tensors"] if t.get("codec") == "expdict"]
    if not ts:
        return j_encoding(m, base, rng)
    t = rng.choice(ts)
    ed = t["expdict"]
    choice = rng.choice(["index_bits", "exponent", "dup_exponent", "drop_exponent", "escapes",
                         "swap_exponents", "type"])
    if choice == "index_bits":
        ed["index_bits"] = rng.choice([0, 1, 2, 3, 4, 5, 8, -1, 33, "2", None, 2.0])
    elif choice == "exponent":
        i = rng.randrange(len(ed["exponents"]))
        ed["exponents"][i] = rng.choice([0, 31, 32, 255, 256, -1, ed["exponents"][i] + 1, "x", None])
    elif choice == "dup_exponent":
        ed["exponents"][-1] = ed["exponents"][0]
    elif choice == "drop_exponent":
        ed["exponents"].pop(rng.randrange(len(ed["exponents"])))
    elif choice == "escapes":
        ed["escapes"] = rng.choice([0, ed["escapes"] - 1, ed["escapes"] + 1, t["nnz"], t["nnz"] + 1,
                                    -1, 1 << 40])
    elif choice == "swap_exponents":  # a valid dictionary that decodes to other values
        e = ed["exponents"]
        e[0], e[-1] = e[-1], e[0]
    else:
        t["expdict"] = rng.choice([None, [], "expdict", {"index_bits": ed["index_bits"]}])
    fixed = rng.random() < 0.6
    if fixed:
        consistent_sizes(t)
    return f"tensor {t['name']} expdict {choice}{', sizes made consistent' if fixed else ''}"


def _used(lengths) -> list[int]:
    return [e for e, x in enumerate(lengths) if type(x) is int and x > 0]  # noqa: E721 - not bool


def j_exphuff(m, base, rng):
    """Change an exphuff tensor's parameters: its code lengths (a used exponent without a code,
    lengths past 12, an over-subscribed code, two lengths swapped: a valid code that reads other
    values, a list of the wrong size or types), its bit count, or the object itself."""
    ts = [t for t in m["tensors"] if t.get("codec") == "exphuff"]
    if not ts:
        return j_encoding(m, base, rng)
    t = rng.choice(ts)
    eh = t["exphuff"]
    lengths = eh["code_lengths"]
    used = _used(lengths) or [0]
    choice = rng.choice(["unused_code", "too_long", "oversubscribe", "swap", "shift", "size", "type",
                         "bits", "bits_type", "drop", "other_codec", "object"])
    if choice == "unused_code":  # an exponent the values have loses its code
        lengths[rng.choice(used)] = 0
    elif choice == "too_long":
        lengths[rng.choice(used)] = rng.choice([13, 15, 16, 31, 255, 1 << 32])
    elif choice == "oversubscribe":  # the shortest length given to one more exponent: Kraft > 1
        free = [e for e in range(len(lengths)) if e not in used] or [0]
        lengths[rng.choice(free)] = min(lengths[e] for e in used) or 1
    elif choice == "swap":  # a valid code (same Kraft sum) that decodes to other values
        a = rng.choice(used)
        b = rng.choice([e for e in used if lengths[e] != lengths[a]] or used)
        lengths[a], lengths[b] = lengths[b], lengths[a]
    elif choice == "shift":  # one length one shorter (often over-subscribed) or longer
        e = rng.choice(used)
        lengths[e] = max(0, lengths[e] + rng.choice([-1, 1]))
    elif choice == "size":
        eh["code_lengths"] = rng.choice([lengths[:-1], lengths + [0], lengths[:32] if len(lengths) > 32
                                         else lengths * 8, [], [lengths]])
    elif choice == "type":
        if rng.random() < 0.5:
            lengths[rng.choice(used)] = rng.choice(["3", 3.0, None, True, -1, [3]])
        else:
            eh["code_lengths"] = rng.choice([None, "x", {"0": 1}, 7, [None] * len(lengths)])
    elif choice == "bits":
        eh["bits"] = rng.choice([eh["bits"] - 1, eh["bits"] + 1, eh["bits"] + 8, 0, U32, 1 << 32,
                                 -1, eh["bits"] * 2])
    elif choice == "bits_type":
        eh["bits"] = rng.choice([float(eh["bits"]), str(eh["bits"]), None, True, [eh["bits"]]])
    elif choice == "drop":
        del t["exphuff"]
    elif choice == "other_codec":  # the object on a tensor of another codec, or this one recoded
        others = [o for o in m["tensors"] if o.get("codec") != "exphuff"]
        if others and rng.random() < 0.5:
            other = rng.choice(others)
            other["exphuff"] = copy.deepcopy(eh)
            t = other
        else:
            t["codec"] = rng.choice(["raw", "expdict"])
    else:
        t["exphuff"] = rng.choice([None, [], "exphuff", {"bits": eh["bits"]},
                                   {"code_lengths": lengths}])
    fixed = rng.random() < 0.6
    if fixed:
        consistent_sizes(t)
    return f"tensor {t['name']} exphuff {choice}{', sizes made consistent' if fixed else ''}"


def _retarget(m, old: str, new) -> None:
    """Tensors stored in extent ``old`` now name extent ``new``."""
    for t in m["tensors"]:
        if t.get("extent") == old:
            t["extent"] = new


def _swap(m, a: dict, b: dict, keys: tuple[str, ...], retarget: bool) -> None:
    """Extents ``a`` and ``b`` trade ``keys`` (their name and numbers); with ``retarget`` each
    one's tensors follow its old name to its new one."""
    old = a["name"]
    for key in keys:
        a[key], b[key] = b[key], a[key]
    if retarget and a is not b:
        _retarget(m, old, "\x00swap")
        _retarget(m, a["name"], old)
        _retarget(m, "\x00swap", a["name"])


def _expert_edit(m, rng) -> tuple[str, int]:
    """One edit of version 4's expert extents (docs/format.md, sections 2 and 3); returns the
    detail and the format version the file should now carry. With its tensors following an
    extent's new name (``retarget``), the edit is judged by the expert rules alone: the name is
    ``layer.<i>.expert.<e>``, its layer exists, a layer's experts are 0..E-1 exactly once."""
    version = m["format_version"]
    layers = [e for e in m["extents"] if e.get("kind") == "layer"]
    exps = [e for e in m["extents"] if e.get("kind") == "expert"]
    if not exps:  # a v1-v3 file: an expert extent needs version 4; version 4 alone is valid (a v5
        # tensor-parallel file: it may hold no expert extent, and version 4 no tensor_parallel)
        choice = rng.choice(["add", "add_v4", "v4"])
        if choice != "v4":
            ext = rng.choice(layers or [e for e in m["extents"] if e.get("kind") == "shard"])
            m["extents"].append({"name": f"layer.{ext['layer']}.expert.0", "kind": "expert", "layer":
                                 ext["layer"], "expert": 0, "offset": ext["offset"] + ext["length"],
                                 "length": 0})
        return f"no experts: {choice}", 4 if choice != "add" else version
    e = rng.choice(exps)
    old = e["name"]
    count = {}  # layer -> number of experts
    for x in exps:
        count[x["layer"]] = count.get(x["layer"], 0) + 1
    n_layers, n_exp = len(layers), count[e["layer"]]
    choice = rng.choice(["expert", "layer", "name", "swap", "drop", "add", "kind", "field", "version",
                         "move_tensor"])
    retarget = rng.random() < 0.6
    if choice in ("expert", "layer"):
        pool = [-1, 1 << 20, (1 << 20) + 1, 1 << 40, None, True, "0", 1.0] + (
            [n_exp, n_exp + 1] + list(range(n_exp)) if choice == "expert" else [n_layers] + list(range(n_layers)))
        e[choice] = rng.choice(pool)
        if rng.random() < 0.7:  # the name follows
            e["name"] = f"layer.{e['layer']}.expert.{e['expert']}"
    elif choice == "name":
        i, x = e["layer"], e["expert"]
        e["name"] = rng.choice([f"layer.{i}.expert.{x:02d}", f"layer.{i}.experts.{x}", f"layer.{i}.expert.{x}.",
                                f"layer.{i}.expert.+{x}", f"layer.{i}.expert.{x} ", f"layer.{i}.expert",
                                f"layer.{i}", f"layer.0{i}.expert.{x}", "expert", f"layer.{x}.expert.{i}",
                                rng.choice(m["extents"])["name"]])
    elif choice == "swap":  # two experts trade numbers and names (with their tensors: valid)
        _swap(m, e, rng.choice(exps), ("name", "expert", "layer"), retarget)
        return f"expert extents {old} and {e['name']} swapped{', tensors follow' if retarget else ''}", version
    elif choice == "drop":  # valid only for a layer's last expert, its tensors dropped too
        m["extents"].remove(e)
        if retarget:
            m["tensors"] = [t for t in m["tensors"] if t.get("extent") != old]
        return f"expert extent {old} ({n_exp} in its layer) dropped{', with its tensors' if retarget else ''}", \
            version
    elif choice == "add":  # expert E (valid: an empty extent where the layer's experts end) or a gap
        x = rng.choice([n_exp, n_exp, n_exp + 1])
        last = max((y for y in exps if y["layer"] == e["layer"]), key=lambda y: y["expert"])
        place = rng.choice(["after", "overlap"])
        new = {"name": f"layer.{e['layer']}.expert.{x}", "kind": "expert", "layer": e["layer"], "expert": x,
               "offset": last["offset"] + (last["length"] if place == "after" else 0),
               "length": 0 if place == "after" else last["length"]}
        m["extents"].insert(m["extents"].index(last) + 1, new)
        return f"expert extent {new['name']} added ({place}; {n_exp} in its layer)", version
    elif choice == "kind":
        if rng.random() < 0.5:
            e["kind"] = rng.choice(["layer", "resident", "files", "experts", "Expert", None])
            return f"expert extent {old}: kind {_short(e['kind'])}", version
        lay = rng.choice(layers)  # a layer extent claims to be an expert
        lay["kind"] = "expert"
        if rng.random() < 0.5:
            lay["expert"] = rng.choice([0, n_exp])
        return f"layer extent {lay['name']}: kind expert, expert {_short(lay.get('expert'))}", version
    elif choice == "field":
        key = rng.choice(["expert", "layer"])
        del e[key]
    elif choice == "version":  # an expert extent in a file of a version without them, or of
        # version 5 (valid: it has version 4's extents, and this file no tensor_parallel) or 6 (none)
        v = rng.choice([1, 2, 3, 3, 5, 6])
        return f"format version {version} -> {v}", v
    else:  # a tensor moves into an expert extent, or out of one into its layer's
        t = rng.choice(m["tensors"])
        t["extent"] = old if t["extent"] != old else f"layer.{e['layer']}"
        return f"tensor {t['name']} -> extent {t['extent']}", version
    if retarget and type(e.get("name")) is str:
        _retarget(m, old, e["name"])
    return f"expert extent {old}: {choice} -> {_short(e.get('name'))} layer {_short(e.get('layer'))} " \
           f"expert {_short(e.get('expert'))}{', tensors follow' if retarget else ''}", version


def _reprefix(m, extent: str, rank) -> None:
    """The tensors stored in extent ``extent`` now carry rank ``rank``'s name prefix."""
    for t in m["tensors"]:
        if t.get("extent") == extent and t["name"].startswith("rank."):
            t["name"] = f"rank.{rank}.{t['name'].split('.', 2)[2]}"


def _shard_edit(m, rng) -> tuple[str, int]:
    """One edit of version 5's tensor-parallel layout (docs/format.md, sections 2 and 3): its shard
    extents, their tensors' rank prefixes and the manifest's ``tensor_parallel``; returns the
    detail and the format version the file should now carry. With its tensors following an
    extent's new name and rank (``follow``: retargeted and renamed), the edit is judged by the
    shard rules alone: the name is ``layer.<i>.rank.<r>``, layers are 0..L-1, each holds an
    extent for exactly the ranks of ``tensor_parallel``, whose fields have their types and ranges,
    and the tensors of a shard extent, and only they, are named ``rank.<r>.`` after its rank."""
    version = m["format_version"]
    shards = [e for e in m["extents"] if e.get("kind") == "shard"]
    if not shards:  # a v1-v4 file: null is no entry (valid); an entry needs version 5 and every
        # layer as shards, which "convert" makes (each layer rank 0's shard: valid without experts)
        choice = rng.choice(["v5", "null", "entry", "add", "convert"])
        tp = {"size": rng.choice([1, 2]), "ranks": [0], "pack_id": "0123456789abcdef", "plan": {}}
        if choice == "null":
            m["tensor_parallel"] = None
        elif choice == "entry":
            m["tensor_parallel"] = tp
        elif choice == "add":  # a shard extent without an entry
            ext = rng.choice([e for e in m["extents"] if e.get("kind") == "layer"])
            m["extents"].append({"name": f"layer.{ext['layer']}.rank.0", "kind": "shard", "layer": ext["layer"],
                                 "rank": 0, "offset": ext["offset"] + ext["length"], "length": 0})
        elif choice == "convert":
            m["tensor_parallel"] = tp
            for e in m["extents"]:
                if e.get("kind") == "layer":
                    old = e["name"]
                    e.update(kind="shard", rank=0, name=f"{old}.rank.0")
                    for t in m["tensors"]:
                        if t["extent"] == old:
                            t.update(extent=e["name"], name=f"rank.0.{t['name']}")
        v = 5 if choice == "v5" else rng.choice([5, 5, version])
        return f"no shards: {choice}, version {v}", v
    tp = m["tensor_parallel"]
    size, ranks = tp["size"], tp["ranks"]
    e = rng.choice(shards)
    old, i, r = e["name"], e["layer"], e["rank"]
    n_layers = len({x["layer"] for x in shards})
    choice = rng.choice(["rank", "layer", "renumber", "name", "swap", "drop", "add", "kind", "field", "version",
                         "rename_tensor", "move_tensor", "tp", "tp"])
    follow = rng.random() < 0.6
    if choice in ("rank", "layer"):
        pool = [-1, None, True, "0", 1.0] + ([size, size + 1, 1023, 1024] + list(range(size)) if choice == "rank"
                                             else [n_layers, 1 << 20, (1 << 20) + 1] + list(range(n_layers)))
        e[choice] = rng.choice(pool)
        if rng.random() < 0.7:  # the name follows
            e["name"] = f"layer.{e['layer']}.rank.{e['rank']}"
    elif choice == "renumber":  # rank r renumbered in every layer (valid below size, in ranks too)
        new = rng.choice([x for x in range(size + 2) if x not in ranks] + [1023, 1024])
        if rng.random() < 0.5:
            tp["size"] = max(size, new + 1)
        if rng.random() < 0.8:
            tp["ranks"] = sorted(new if x == r else x for x in ranks)
        for x in shards:
            if x["rank"] == r:
                was = x["name"]
                x.update(rank=new, name=f"layer.{x['layer']}.rank.{new}")
                if follow:
                    _retarget(m, was, x["name"])
                    _reprefix(m, x["name"], new)
        return f"rank {r} renumbered {new}, size {tp['size']}, ranks {tp['ranks']}" \
               f"{', tensors follow' if follow else ''}", version
    elif choice == "name":
        e["name"] = rng.choice([f"layer.{i}.rank.{r:02d}", f"layer.{i}.ranks.{r}", f"layer.{i}.rank.{r}.",
                                f"layer.{i}.rank.+{r}", f"layer.{i}.rank.{r} ", f"layer.{i}.rank", f"layer.{i}",
                                f"layer.0{i}.rank.{r}", f"rank.{r}", f"layer.{r}.rank.{i}", f"layer.{i}.expert.{r}",
                                rng.choice(m["extents"])["name"]])
    elif choice == "swap":  # two extents trade numbers and names: valid with their tensors renamed,
        # unless that gives them the names of another extent's tensors (two layers, two ranks)
        other = rng.choice([x for x in shards if x["layer"] == i] if rng.random() < 0.5 else shards)
        _swap(m, e, other, ("name", "layer", "rank"), follow)
        if follow and other is not e:
            _reprefix(m, e["name"], e["rank"])
            _reprefix(m, old, other["rank"])
        return f"shard extents {old} and {e['name']} swapped{', tensors follow' if follow else ''}", version
    elif choice == "drop":  # one rank's extent of a layer, a layer (valid: the last), or every rank
        # but r (what endor-gds split writes: valid with ranks [r])
        what = rng.choice(["extent", "layer", "split"])
        keep = {"extent": lambda x: x is not e, "layer": lambda x: x["layer"] != i,
                "split": lambda x: x["rank"] == r}[what]
        gone = {x["name"] for x in shards if not keep(x)}
        m["extents"] = [x for x in m["extents"] if x["name"] not in gone]
        if follow:
            m["tensors"] = [t for t in m["tensors"] if t.get("extent") not in gone]
        if what == "split" and rng.random() < 0.8:
            tp["ranks"] = [r]
        return f"dropped {what} of {old}: {len(gone)} extents{', with their tensors' if follow else ''}, " \
               f"ranks {tp['ranks']}", version
    elif choice == "add":  # empty extents where the last ends: layer L for each rank (valid), for one
        # rank, a gap, rank `size`; or a layer or an expert extent, which a tensor-parallel file has not
        end = max(x["offset"] + x["length"] for x in shards)
        what = rng.choice(["layer", "layer_rank", "gap", "rank", "unsplit", "expert"])
        new = {"layer": [("rank", n_layers, x) for x in ranks], "layer_rank": [("rank", n_layers, r)],
               "gap": [("rank", n_layers + 1, x) for x in ranks], "rank": [("rank", i, size)],
               "unsplit": [(None, i, None)], "expert": [("expert", i, 0)]}[what]
        for key, layer, num in new:
            kind = {"rank": "shard", "expert": "expert"}.get(key, "layer")
            ext = {"name": f"layer.{layer}" + (f".{key}.{num}" if key else ""), "kind": kind, "layer": layer,
                   "offset": end, "length": 0}
            if key:
                ext[key] = num
            m["extents"].append(ext)
        return f"added {what}: {', '.join(x['name'] for x in m['extents'][-len(new):])}", version
    elif choice == "kind":
        e["kind"] = rng.choice(["layer", "expert", "resident", "files", "shards", "Shard", None])
        return f"shard extent {old}: kind {_short(e['kind'])}", version
    elif choice == "field":
        key = rng.choice(["rank", "layer"])
        del e[key]
        return f"shard extent {old}: no {key}", version
    elif choice == "version":  # shard extents and tensor_parallel in a version without them
        v = rng.choice([1, 2, 3, 4, 4, 6])
        return f"format version {version} -> {v}", v
    elif choice == "rename_tensor":  # valid while the tensors of a shard extent, and only they,
        # start with rank.<its rank>.
        t = rng.choice(m["tensors"])
        k = next((x["rank"] for x in shards if x["name"] == t["extent"]), 0)
        rest = t["name"].split(".", 2)[2] if t["name"].startswith("rank.") else t["name"]
        was, t["name"] = t["name"], rng.choice([rest, f"rank.{k}.{rest}", f"rank.{k + 1}.{rest}",
                                                f"rank.{k:02d}.{rest}", f"rank.{k}{rest}", f"rank.{k}.renamed.{rest}",
                                                f"Rank.{k}.{rest}", f"ranks.{k}.{rest}"])
        return f"tensor {was} (extent {t['extent']}) renamed {t['name']}", version
    elif choice == "move_tensor":  # the last tensor of an extent to the next one, with its pages
        # (the extents' border moves: valid once renamed for the new rank to a name of its own) or alone
        starts = {x["offset"]: x for x in shards}
        a, b = rng.choice([(x, starts[x["offset"] + x["length"]]) for x in shards
                           if x["offset"] + x["length"] in starts])
        t = max((t for t in m["tensors"] if t["extent"] == a["name"]),
                key=lambda t: min(s["offset"] for s in t["segments"]))
        pages = rng.random() < 0.7
        if pages:
            cut = min(s["offset"] for s in t["segments"])
            a["length"] = cut - a["offset"]
            b["length"] += b["offset"] - cut
            b["offset"] = cut
        t["extent"] = b["name"]
        rest = t["name"].split(".", 2)[2]
        was, t["name"] = t["name"], rng.choice([f"rank.{b['rank']}.moved.{rest}", f"rank.{b['rank']}.{rest}",
                                                t["name"]])
        return f"tensor {was} moved {a['name']} -> {b['name']}{' with its pages' if pages else ''} as {t['name']}", \
            version
    else:  # the tensor_parallel entry
        key = rng.choice(["size", "ranks", "pack_id", "plan", "plan", "missing", "entry", "unknown"])
        if key == "size":
            tp["size"] = rng.choice([0, 1, size - 1, size + 1, 1024, 1025, -1, 1 << 40, "2", 2.0, True, None])
        elif key == "ranks":
            tp["ranks"] = rng.choice([[], ranks[:1], ranks[::-1], ranks + ranks[-1:], ranks + [size], [-1] + ranks,
                                      [str(x) for x in ranks], [float(x) for x in ranks], [True] + ranks[1:],
                                      None, "0,1", [ranks]])
        elif key == "pack_id":  # "<hex>" by the packer; a string of at most 64 printable characters
            tp["pack_id"] = rng.choice(["", "x" * 64, "x" * 65, "not hex: é", tp["pack_id"] + "\n", 7, None,
                                        [tp["pack_id"]]])
        elif key == "plan":  # module -> "colwise" | "rowwise" | "replicated"
            plan = tp["plan"]
            module = rng.choice(sorted(plan))
            how = rng.choice(["style", "bad_style", "module", "bad_module", "empty", "type"])
            if how == "style":
                plan[module] = rng.choice(STYLES)
            elif how == "bad_style":
                plan[module] = rng.choice(["ColWise", "columnwise", "local_colwise", "", None, 1, ["colwise"]])
            elif how == "module":
                plan["mlp.experts"] = rng.choice(STYLES)
            elif how == "bad_module":
                plan[rng.choice(["", "a\nb", "x" * 1025])] = "colwise"
            else:
                tp["plan"] = {} if how == "empty" else rng.choice([None, [], "colwise", [[module, "colwise"]]])
            key = f"plan {how} ({module})"
        elif key == "missing":
            key = rng.choice(["size", "ranks", "pack_id", "plan"])
            del tp[key]
            key = f"no {key}"
        elif key == "entry":
            m["tensor_parallel"] = rng.choice([None, [], "tp", 2, {}, True])
            if rng.random() < 0.3:
                del m["tensor_parallel"]
        else:
            tp[rng.choice(["x_future", "comment"])] = rng.choice([1, "v", [1], {"a": {}}])
        return f"tensor_parallel {key}: {_short(m.get('tensor_parallel'), 120)}", version
    if follow:
        _retarget(m, old, e["name"])
        _reprefix(m, e["name"], e["rank"])
    return f"shard extent {old}: {choice} -> {_short(e['name'])} layer {_short(e['layer'])} " \
           f"rank {_short(e['rank'])}{', tensors follow' if follow else ''}", version


def _versioned(base, rng, edit):
    """``base`` with its manifest edited by ``edit`` (:func:`_expert_edit`, :func:`_shard_edit`); the
    header and the manifest carry the version the edit asks for (now and then only one of them)."""
    m = copy.deepcopy(base.manifest)
    detail, version = edit(m, rng)
    where = rng.choice(["both", "both", "both", "header", "manifest"]) if version != m["format_version"] \
        else "both"
    if where != "header":
        m["format_version"] = version
    data = with_manifest(base, dump(m))
    if where != "manifest":
        data = with_header(data, version=version)
    return data, detail + (f" (version in the {where} only)" if where != "both" else ""), True


def m_experts(base, rng):
    """Version 4's expert extents, edited (:func:`_expert_edit`)."""
    return _versioned(base, rng, _expert_edit)


def m_shards(base, rng):
    """Version 5's tensor-parallel layout, edited (:func:`_shard_edit`)."""
    return _versioned(base, rng, _shard_edit)


HOSTILE_NAMES = ["../evil", "../../etc/passwd", "/etc/passwd", "a/b", "a\\b", "nul\x00x", ".",
                 "..", "", ".hidden", "x" * 5000, "tökenizer.json", "CON", " ", "a\nb",
                 "tokenizer.json/", "~", "$HOME"]


def j_names(m, base, rng):
    kind = rng.choice(["tensor", "file", "file", "extent", "tensor_dup", "file_dup"])
    if kind in ("file", "file_dup") and not m.get("files"):
        kind = "tensor"
    if kind == "tensor":
        t = _tensor(m, rng)
        t["name"] = rng.choice(HOSTILE_NAMES + [None, 7])
    elif kind == "file":
        rng.choice(m["files"])["name"] = rng.choice(HOSTILE_NAMES + [None, 7])
    elif kind == "extent":
        rng.choice(m["extents"])["name"] = rng.choice(HOSTILE_NAMES)
    elif kind == "tensor_dup":
        a, b = rng.sample(m["tensors"], 2)
        a["name"] = b["name"]
    else:
        fs = m["files"]
        if len(fs) >= 2:
            a, b = rng.sample(fs, 2)
            a["name"] = b["name"]
        else:
            fs.append(copy.deepcopy(fs[0]))
    return f"hostile {kind} name"


def j_tied(m, base, rng):
    stored = [t["name"] for t in m["tensors"]]
    choice = rng.choice(["missing_target", "alias_stored", "list", "target_int", "chain", "add"])
    tied = m.setdefault("tied", {})
    if choice == "missing_target":
        tied["lm_head.weight"] = "no.such.tensor"
    elif choice == "alias_stored":
        tied[rng.choice(stored)] = rng.choice(stored)
    elif choice == "list":
        m["tied"] = [["lm_head.weight", stored[0]]]
    elif choice == "target_int":
        tied["lm_head.weight"] = 0
    elif choice == "chain":
        tied["a"] = "b"
        tied["b"] = stored[0]
    else:
        tied["extra.alias"] = rng.choice(stored)  # valid: a second name for a stored tensor
    return f"tied: {choice}"


def j_top(m, base, rng):
    choice = rng.choice(["format", "format_version", "tile_elems", "checksum", "architecture",
                         "config", "prune", "generation_config", "extents", "tensors", "files",
                         "created_by", "source"])
    how = rng.choice(["delete", "value"])
    if how == "delete":
        m.pop(choice, None)
    else:
        m[choice] = interesting(rng, m.get(choice))
    return f"top-level {choice}: {how}"


def j_deep(m, base, rng):
    depth = rng.choice([10, 200, 900, 990, 1000, 1100, 5000, 50000])
    region, d = _dicts(m, rng)
    if not d:
        return "empty dict left alone"
    key = rng.choice(sorted(d))
    d[key] = f"\x00DEEP:{depth}"
    return f"{region}[{key!r}] replaced by {depth} nested arrays"


def j_huge(m, base, rng):
    choice = rng.choice(["string", "digits", "shape_list", "many_tensors", "many_files",
                         "many_extents", "long_name"])
    if choice == "string":
        size = rng.choice([1 << 16, 1 << 20, 8 << 20])
        m[rng.choice(["created_by", "architecture", "source"])] = "x" * size
        return f"a {size}-character string"
    if choice == "digits":
        d = rng.choice([100, 4300, 4301, 100000])
        region, dd = _dicts(m, rng)
        if dd:
            dd[rng.choice(sorted(dd))] = f"\x00DIGITS:{d}"
        return f"a {d}-digit integer"
    if choice == "shape_list":
        t = _tensor(m, rng)
        t["shape"] = [1] * rng.choice([9, 1000, 100000])
        return "a very long shape"
    if choice == "many_tensors":
        k = rng.choice([100, 3000])
        t = rng.choice(m["tensors"])
        m["tensors"] += [dict(copy.deepcopy(t), name=f"{t['name']}.{i}") for i in range(k)]
        return f"{k} extra tensors sharing one tensor's segments"
    if choice == "many_files":
        f0 = (m.get("files") or [{"name": "a", "kind": "file", "offset": PAGE, "length": 0,
                                  "nbytes": 0, "crc32c": 0}])[0]
        m["files"] = [dict(f0, name=f"f{i}.json") for i in range(rng.choice([65, 1000]))]
        return "too many embedded files"
    if choice == "many_extents":
        m["extents"] += [{"name": f"layer.{i + 100}", "kind": "layer", "offset": PAGE, "length": 0,
                          "layer": i + 100} for i in range(rng.choice([10, 2000]))]
        return "many empty extents"
    t = _tensor(m, rng)
    t["name"] = "n" * rng.choice([1024, 1025, 1 << 20])
    return "a very long tensor name"


def j_unknown_keys(m, base, rng):
    region, d = _dicts(m, rng)
    d[rng.choice(["x_future", "comment", "_", "checksum_v2"])] = rng.choice([1, "v", [1, 2], {"a": {}}])
    return f"unknown key added to {region} (must be ignored)"


def j_semantic_valid(m, base, rng):
    """Edits that keep the file valid (a reader must accept them and read the same data)."""
    choice = rng.choice(["reorder_tensors", "reorder_extents", "reorder_keys", "provenance"])
    if choice == "reorder_tensors":
        rng.shuffle(m["tensors"])
    elif choice == "reorder_extents":
        rng.shuffle(m["extents"])
    elif choice == "reorder_keys":
        t = _tensor(m, rng)
        items = list(t.items())
        rng.shuffle(items)
        t.clear()
        t.update(items)
    else:
        m["created_by"] = "someone else"
        m["source"] = {"folder": "elsewhere", "shards": []}
    return f"valid edit: {choice}"


def _structured(fn):
    def mutate(base, rng):
        m = copy.deepcopy(base.manifest)
        detail = fn(m, base, rng)
        return with_manifest(base, dump(m)), detail, True

    mutate.__name__ = fn.__name__
    return mutate


# -- segment data ------------------------------------------------------------------------------


def _pick_segment(base, rng, kinds=None) -> SegRef:
    segs = [s for s in base.segments if kinds is None or s.kind in kinds]
    return rng.choice(segs or base.segments)


def _maybe_fix(base, data, seg, rng, p: float):
    if rng.random() < p:
        return with_segment_crc(base, data, seg), True
    return data, False


def m_segment_bytes(base, rng):
    seg = _pick_segment(base, rng)
    if seg.length == 0:
        seg = _pick_segment(base, rng, {"data", "bitmap", "values", "tile_offsets", "file",
                                        "residuals", "codes", "escape_offsets", "bits",
                                        "tile_bits", "chunk_bits"})
    buf = bytearray(base.data)
    in_padding = seg.length > seg.nbytes and rng.random() < 0.2
    lo, hi = (seg.offset + seg.nbytes, seg.offset + seg.length) if in_padding else \
        (seg.offset, seg.offset + max(seg.nbytes, 1))
    what = rng.choice(["flip", "overwrite", "zero_run", "ff_run"])
    pos = rng.randrange(lo, hi)
    if what == "flip":
        _flip_bits(buf, lo, hi, rng, rng.choice([1, 1, 3]))
    elif what == "overwrite":
        buf[pos] = rng.randrange(256)
    else:
        run = min(hi - pos, rng.choice([4, 64, 4096]))
        buf[pos:pos + run] = (b"\0" if what == "zero_run" else b"\xff") * run
    data, fixed = _maybe_fix(base, bytes(buf), seg, rng, 0.5)
    where = "padding" if in_padding else "payload"
    return data, f"{what} in {seg.label} {where}{', CRC recomputed' if fixed else ''}", fixed


def _set_entry(base, rng, seg: SegRef, fmt: str, choices) -> tuple[bytearray, int, int, int]:
    """``base``'s bytes with a random entry ``i`` of the little-endian table in ``seg`` (entries
    of struct format ``fmt``) set to one of ``choices(old, prev, last)`` (wrapped to the entry's
    width); returns the bytes, ``i``, the old and the new entry."""
    size = struct.calcsize(fmt)
    buf = bytearray(base.data)
    count = seg.nbytes // size
    i = rng.randrange(count)
    at = seg.offset + size * i
    old = struct.unpack_from(fmt, buf, at)[0]
    prev = struct.unpack_from(fmt, buf, at - size)[0] if i else 0
    last = struct.unpack_from(fmt, buf, seg.offset + size * (count - 1))[0]
    new = rng.choice(choices(old, prev, last)) & ((1 << 8 * size) - 1)
    struct.pack_into(fmt, buf, at, new)
    return buf, i, old, new


def _entry_mutant(base, rng, seg: SegRef, buf: bytearray, i: int, old: int, new: int):
    data, fixed = _maybe_fix(base, bytes(buf), seg, rng, 0.7)
    return data, f"{seg.label}[{i}]: {old} -> {new}{', CRC recomputed' if fixed else ''}", fixed


def m_tile_offsets(base, rng):
    """An entry of a tile offset table or of an escape offset table (same shape, same rules)."""
    seg = _pick_segment(base, rng, {"tile_offsets", "escape_offsets"})
    if seg.kind not in ("tile_offsets", "escape_offsets"):
        return m_segment_bytes(base, rng)
    buf, i, old, new = _set_entry(base, rng, seg, "<I", lambda old, prev, last: [
        0, old + 1, old - 1, prev, prev + TILE_ELEMS + 1, last, last + 1, U32, old + TILE_ELEMS,
        rng.randrange(U32 + 1)])
    count, at = seg.nbytes // 4, seg.offset + 4 * i
    if rng.random() < 0.3 and count > 2:  # swap two entries
        j = rng.randrange(count)
        a, b = struct.unpack_from("<II", bytes(buf[at:at + 4] + buf[seg.offset + 4 * j:][:4]))
        struct.pack_into("<I", buf, at, b)
        struct.pack_into("<I", buf, seg.offset + 4 * j, a)
    return _entry_mutant(base, rng, seg, buf, i, old, new)


def m_bitmap(base, rng):
    seg = _pick_segment(base, rng, {"bitmap"})
    if seg.kind != "bitmap":
        return m_segment_bytes(base, rng)
    buf = bytearray(base.data)
    words = seg.nbytes // 4
    choice = rng.choice(["word_zero", "word_ones", "bit", "last_word_high", "move_bit"])
    w = words - 1 if choice == "last_word_high" else rng.randrange(words)
    at = seg.offset + 4 * w
    old = struct.unpack_from("<I", buf, at)[0]
    if choice == "word_zero":
        new = 0
    elif choice == "word_ones" or choice == "last_word_high":
        new = U32 if choice == "word_ones" else old | 0x80000000
    elif choice == "bit":
        new = old ^ (1 << rng.randrange(32))
    else:  # same popcount, different position: only the tile-offset count cannot notice
        set_bits = [b for b in range(32) if old >> b & 1]
        clear = [b for b in range(32) if not old >> b & 1]
        new = old ^ (1 << rng.choice(set_bits)) ^ (1 << rng.choice(clear)) if set_bits and clear else old
    struct.pack_into("<I", buf, at, new)
    data, fixed = _maybe_fix(base, bytes(buf), seg, rng, 0.7)
    note = ", CRC recomputed" if fixed else ""
    return data, f"{seg.label} word {w}: {old:#010x} -> {new:#010x} ({choice}){note}", fixed


def m_escape_positions(base, rng):
    """An escape position: repeated, decreasing, past its tile, or anywhere in uint16."""
    seg = _pick_segment(base, rng, {"escape_positions"})
    if seg.kind != "escape_positions" or seg.nbytes < 2:
        return m_tile_offsets(base, rng)
    buf, i, old, new = _set_entry(base, rng, seg, "<H", lambda old, prev, last: [
        prev, prev - 1, old + 1, old - 1, 0, 4095, 4096, 0xFFFF, rng.randrange(1 << 16)])
    return _entry_mutant(base, rng, seg, buf, i, old, new)


def m_bit_offsets(base, rng):
    """An exphuff tensor's bit tables and stream: a tile bit offset (uint32) or a chunk bit
    offset (uint16) moved by a unit, to its neighbour, past the tile or anywhere; or one bit of
    the ``bits`` stream flipped (another code, or a code that is not in the table)."""
    seg = _pick_segment(base, rng, {"tile_bits", "chunk_bits", "bits"})
    if seg.kind not in ("tile_bits", "chunk_bits", "bits") or seg.nbytes < 1:
        return m_tile_offsets(base, rng)
    if seg.kind == "bits":
        buf = bytearray(base.data)
        at = _flip_bits(buf, seg.offset, seg.offset + seg.nbytes, rng, rng.choice([1, 1, 2]))
        data, fixed = _maybe_fix(base, bytes(buf), seg, rng, 0.8)
        return data, f"{seg.label}: flipped bits at bytes {at}{', CRC recomputed' if fixed else ''}", fixed
    fmt, top = ("<I", U32) if seg.kind == "tile_bits" else ("<H", 0xFFFF)
    buf, i, old, new = _set_entry(base, rng, seg, fmt, lambda old, prev, last: [
        old + 1, old - 1, old + 3, old - 3, old + 12, old - 12, prev, last, last + 1, 0, top,
        rng.randrange(top + 1)])
    return _entry_mutant(base, rng, seg, buf, i, old, new)


# -- file length -------------------------------------------------------------------------------


def m_truncate(base, rng):
    n = len(base.data)
    cut = rng.choice([0, 1, 47, PAGE - 1, PAGE, PAGE + 1, n - 1, n - PAGE, base.moff,
                      base.moff + base.mlen // 2, rng.randrange(n)])
    cut = max(0, min(cut, n - 1))
    data = base.data[:cut]
    if cut >= PAGE and rng.random() < 0.5:
        return with_header(data, flen=cut), f"truncated to {cut} bytes, header length fixed", True
    return data, f"truncated to {cut} of {n} bytes", False


def m_extend(base, rng):
    extra = rng.choice([1, 7, PAGE - 1, PAGE, 3 * PAGE, 100_000])
    tail = rng.choice([bytes(extra), rng.randbytes(extra)])
    data = base.data + tail
    if rng.random() < 0.5:
        return with_header(data, flen=len(data)), f"extended by {extra} bytes, header length fixed", True
    return data, f"extended by {extra} bytes", False


def _short(v, limit: int = 60) -> str:
    if isinstance(v, str) and len(v) > limit:
        return f"<str of {len(v)} chars>"
    if isinstance(v, (list, dict)) and len(v) > 8:
        return f"<{type(v).__name__} of {len(v)} items>"
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "..."


MUTATORS = {
    "header.bitflip": m_header_bitflip,
    "header.field": m_header_field,
    "header.padding": m_header_padding,
    "manifest.bytes": m_manifest_bytes,
    "manifest.padding": m_manifest_padding,
    "json.value": _structured(j_value),
    "json.delete": _structured(j_delete),
    "json.swap_fields": _structured(j_swap_fields),
    "json.swap_entries": _structured(j_swap_entries),
    "json.duplicate": _structured(j_duplicate),
    "json.segment_place": _structured(j_segment_place),
    "json.extent_place": _structured(j_extent_place),
    "json.shape": _structured(j_shape),
    "json.dtype": _structured(j_dtype),
    "json.encoding": _structured(j_encoding),
    "json.nnz": _structured(j_nnz),
    "json.expdict": _structured(j_expdict),
    "json.exphuff": _structured(j_exphuff),
    "json.names": _structured(j_names),
    "json.tied": _structured(j_tied),
    "json.top": _structured(j_top),
    "json.deep": _structured(j_deep),
    "json.huge": _structured(j_huge),
    "json.unknown_keys": _structured(j_unknown_keys),
    "json.valid_edit": _structured(j_semantic_valid),
    "segment.bytes": m_segment_bytes,
    "segment.tile_offsets": m_tile_offsets,
    "segment.bitmap": m_bitmap,
    "segment.escape_positions": m_escape_positions,
    "segment.bit_offsets": m_bit_offsets,
    "file.truncate": m_truncate,
    "file.extend": m_extend,
    "json.experts": m_experts,  # last ones: the ops before them keep their indices (and their cases)
    "json.shards": m_shards,
}
OPS = tuple(MUTATORS)


def mutate(base: Base, op: str, rng: random.Random) -> Mutant:
    data, detail, hostile = MUTATORS[op](base, rng)
    return Mutant(op, detail, data, hostile)


def case_rng(seed: int, index: int) -> random.Random:
    """The random stream of case ``index`` of a run with ``seed`` (string seeds hash stably)."""
    return random.Random(f"endor-fuzz/{seed}/{index}")


def make_case(bases: list[Base], seed: int, index: int, ops=OPS) -> tuple[Base, Mutant]:
    """Case ``index`` of a run with ``seed``: a base and an op drawn from ``bases`` and ``ops``
    (a campaign narrowed to some of them replays with the same narrowing)."""
    rng = case_rng(seed, index)
    base = rng.choice(bases)
    op = rng.choice(ops)
    return base, mutate(base, op, rng)
