"""Mutated source checkpoints for the packer, judged against the safetensors library.

The .endor fuzzer (fuzzlib.py, fuzzcheck.py) covers what the reader opens; this one covers what
the packer reads: a Hugging Face folder whose safetensors headers, data or config.json were
damaged or edited. Case ``i`` of seed ``S`` is a pure function of ``(S, i)`` and the base
folders, so any escape replays with its number (bench/fuzz_checkpoint.py --case i).

The oracle, per case:
- ``endor_gds.pack`` either returns or raises an ``EndorError``; anything else is an escape. A
  refused pack leaves no file behind (neither the destination nor a temporary) and the source
  folder byte for byte as it was.
- The safetensors library (what transformers loads checkpoints with) is the reference reader: a
  pack that succeeds on a shard it refuses is an escape, and every tensor of a successful pack
  must be bit for bit the tensor safetensors reads.
- A successful pack must load with ``from_pretrained`` and run a forward pass: no pack may make a
  file its reader refuses.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

# Values a hostile or buggy writer might put where a number, string, list or object belongs.
_JUNK = [None, True, False, 0, -1, 1, 2, 3, 7, 1.5, -0.0, 2**31, 2**32 + 1, 2**53, 2**63, 2**64 + 5,
         -(2**63), "", "F16", "BF16", "x" * 300, "\x1b[31m", [], [0], [1, 2], [1, 2, 3], [[1]], {},
         {"a": 1}, {"dtype": "F16"}]
# config.json keys that decide tensor shapes, layer counts, ties and the model class.
_CONFIG_KEYS = ["hidden_size", "intermediate_size", "ffn_dim", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                "tie_word_embeddings", "model_type", "word_embed_proj_dim", "max_position_embeddings"]

OPS = ("header_field", "header_entry", "offsets_shift", "shape_edit", "dtype_swap", "entry_drop",
       "entry_copy", "header_bytes", "length_field", "file_size", "config_value", "config_scale")


@dataclass
class Case:
    op: str
    detail: str


@dataclass
class Result:
    outcome: str  # "packed", "refused: FormatError", ..., or "ESCAPE ..."
    escape: str | None = None  # what went wrong, for an escape


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _read_header(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _write_header(path: Path, header, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def make_case(bases: list[Path], seed: int, index: int, folder: Path) -> Case:
    """Copy one of ``bases`` to ``folder`` and apply case ``index``'s mutation to it."""
    rng = random.Random(f"{seed}:{index}")
    base = rng.choice(bases)
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(base, folder)
    op = OPS[index % len(OPS)] if index < 2 * len(OPS) else rng.choice(OPS)
    shard = rng.choice(_shards(folder))
    detail = _mutate(rng, op, folder, shard)
    return Case(op, f"{base.name}: {detail}")


def _mutate(rng: random.Random, op: str, folder: Path, shard: Path) -> str:
    if op.startswith("config"):
        cfg_path = folder / "config.json"
        cfg = json.loads(cfg_path.read_text())
        key = rng.choice(_CONFIG_KEYS)
        old = cfg.get(key)
        if op == "config_scale" and isinstance(old, int) and not isinstance(old, bool):
            value = rng.choice([old + 1, old - 1, old * 2, old // 2, 0, 10**9])
        else:
            value = rng.choice(_JUNK)
        cfg[key] = value
        cfg_path.write_text(json.dumps(cfg))
        return f"config {key}: {old!r} -> {value!r}"[:200]
    if op in ("header_bytes", "length_field", "file_size"):
        blob = bytearray(shard.read_bytes())
        (n,) = struct.unpack("<Q", blob[:8])
        if op == "header_bytes":
            at = rng.randrange(8, 8 + n)
            blob[at] = rng.randrange(256)
            what = f"header byte {at} -> {blob[at]:#04x}"
        elif op == "length_field":
            new = rng.choice([0, 1, n - 1, n + 1, n + 8, len(blob), 2**63, 2**64 - 1])
            blob[:8] = struct.pack("<Q", new)
            what = f"header length {n} -> {new}"
        else:
            cut = rng.choice([-1, -2, -4096, 1, 2, 4096, -(len(blob) - 8 - n), -(len(blob) - 4)])
            blob = blob[:cut] if cut < 0 else blob + bytes(cut)
            what = f"file size {cut:+d} bytes"
        shard.write_bytes(bytes(blob))
        return f"{shard.name}: {what}"
    header, data = _read_header(shard)
    names = _tensor_names(header)
    name = rng.choice(names)
    entry = header[name]
    if op == "header_field":
        key = rng.choice(["dtype", "shape", "data_offsets"])
        entry[key] = rng.choice(_JUNK)
        what = f"{name}.{key} = {entry[key]!r}"
    elif op == "header_entry":
        target = rng.choice([name, "__metadata__"])
        header[target] = rng.choice(_JUNK)
        what = f"{target} = {header[target]!r}"
    elif op == "offsets_shift":
        d = rng.choice([-8, -2, -1, 1, 2, 8, 4096])
        i = rng.randrange(2)
        entry["data_offsets"][i] += d
        what = f"{name}.data_offsets[{i}] {d:+d}"
    elif op == "shape_edit":
        shape = entry["shape"]
        choice = rng.randrange(4)
        if choice == 0 and shape:
            entry["shape"] = shape[::-1]
        elif choice == 1 and shape:
            i = rng.randrange(len(shape))
            shape[i] += rng.choice([-1, 1])
        elif choice == 2:
            entry["shape"] = [s for s in shape] + [1]
        else:
            numel = 1
            for s in shape:
                numel *= s
            entry["shape"] = [numel]
        what = f"{name}.shape -> {entry['shape']}"
    elif op == "dtype_swap":
        entry["dtype"] = rng.choice(["F16", "BF16", "F32", "I16", "U8", "F8_E4M3", "f16"])
        what = f"{name}.dtype -> {entry['dtype']}"
    elif op == "entry_drop":
        del header[name]
        what = f"drop {name} (its data stays)"
    else:  # entry_copy: a second name for the same bytes, or one name with another's offsets
        other = rng.choice(names)
        if rng.randrange(2):
            header[name + "_copy"] = dict(entry)
            what = f"copy {name} as {name}_copy"
        else:
            entry["data_offsets"] = list(header[other]["data_offsets"])
            what = f"{name}.data_offsets = {other}'s"
    _write_header(shard, header, data)
    return f"{shard.name}: {what}"[:200]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def reference(folder: Path):
    """Every tensor as the safetensors library reads it, or the reason it refuses a shard."""
    from safetensors import safe_open  # noqa: PLC0415

    tensors = {}
    try:
        for shard in _shards(folder):
            with safe_open(shard, "pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
    except Exception as exc:  # noqa: BLE001 - any refusal of the reference reader
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"
    return tensors, None


def run_case(folder: Path, workdir: Path) -> Result:
    """Pack ``folder`` into ``workdir`` and judge the outcome (module docstring)."""
    import torch  # noqa: PLC0415

    import endor_gds  # noqa: PLC0415
    from endor_gds.errors import EndorError  # noqa: PLC0415

    workdir.mkdir(parents=True, exist_ok=True)
    for p in workdir.iterdir():
        p.unlink()
    dst = workdir / "x.endor"
    before = _digest(folder)
    ref, ref_refusal = reference(folder)
    try:
        endor_gds.pack(folder, dst, progress=False)
    except EndorError as exc:
        left = sorted(p.name for p in workdir.iterdir())
        if left:
            return Result("ESCAPE files left", f"refused ({exc}) but left {left}")
        if _digest(folder) != before:
            return Result("ESCAPE source changed", f"refused ({exc}) and the source folder changed")
        agree = "safetensors refuses too" if ref_refusal else "safetensors reads it"
        return Result(f"refused: {type(exc).__name__} ({agree})")
    except Exception as exc:  # noqa: BLE001 - the escape this fuzzer looks for
        return Result("ESCAPE pack", f"pack raised {type(exc).__name__}: {str(exc)[:300]}")
    if ref_refusal:
        return Result("ESCAPE accepted", f"packed a checkpoint safetensors refuses ({ref_refusal})")
    with endor_gds.open(dst) as f:
        for name in f.tensors:
            got, want = f.read_tensor(name), ref[name]
            if got.dtype != want.dtype or got.shape != want.shape or \
                    not torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8)):
                return Result("ESCAPE tensor", f"tensor {name} is not what safetensors reads")
    try:
        model = endor_gds.from_pretrained(dst, device="cpu")
        try:
            with torch.no_grad():
                model(torch.tensor([[1, 2, 3, 4]]))
        finally:
            model.endor.close()
    except Exception as exc:  # noqa: BLE001 - EndorError included: the pack should have refused
        return Result("ESCAPE load", f"packed, then {type(exc).__name__}: {str(exc)[:300]}")
    return Result("packed")


def build_bases(root: Path, build_model) -> list[Path]:
    """The folders cases start from: a tiny Llama in one shard, a tiny OPT (tied embeddings,
    biases) in several shards with an index."""
    import torch  # noqa: PLC0415

    out = []
    for family, sharded in (("llama", False), ("opt", True)):
        folder = root / f"{family}-{'sharded' if sharded else 'single'}"
        if not (folder / "config.json").is_file():
            build_model(folder, family, torch.float16, sharded=sharded, tokenizer=False)
        out.append(folder)
    return out
