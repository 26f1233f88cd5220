"""Read a Hugging Face checkpoint folder one tensor at a time.

The safetensors format is an 8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets: [begin, end]}}`` and the data. We parse it ourselves and
``pread`` each tensor into fresh memory instead of memory-mapping the shards: a mapping keeps
every touched page of a multi-GB shard in the process's resident set, which is exactly what a
packer for models larger than memory must not do.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from endor_gds._checks import (
    check_choice,
    check_dict,
    check_generation_config,
    check_int,
    check_list,
    check_str,
    show,
)
from endor_gds.codec.bitmap import DTYPES, dtype_of

# The manifest's typed-field checks, reused: a safetensors header is untrusted JSON too.
from endor_gds.container import MAX_NUMEL, MAX_RANK
from endor_gds.errors import ArgumentError, FormatError
from endor_gds.read.readers import read_fully

__all__ = ["Checkpoint", "TensorInfo", "TOKENIZER_FILES"]

# Files a tokenizer may need; embedded in the .endor file as opaque bytes under these names.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
_MAX_HEADER = 100 << 20  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    path: str
    dtype: str  # safetensors name, e.g. "F16"
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the data
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _parse_shard(path: Path) -> dict[str, TensorInfo]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise FormatError(f"{path}: too short to be a safetensors file")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > _MAX_HEADER or 8 + hlen > size:
            raise FormatError(f"{path}: safetensors header length {hlen} is invalid (file is {size} bytes)")
        try:
            header = json.loads(f.read(hlen))
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting thousands deep
            raise FormatError(f"{path}: safetensors header is not JSON ({exc})") from None
    base = 8 + hlen
    check_dict(path, "safetensors header", header)
    meta = header.get("__metadata__")  # may be absent or null, as safetensors allows
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise FormatError(f"{path}: safetensors __metadata__ must map names to strings")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        check_str(path, "safetensors tensor name", name)  # it becomes a manifest name, checked alike
        out[name] = _tensor_info(path, name, check_dict(path, f"safetensors entry {name!r}", entry), base, size)
    # As the safetensors library checks a shard (and refuses it for transformers): the tensors lie
    # back to back from the first data byte, no gap, no overlap, and end where the file ends.
    # Sorted by (offset, size) so that zero-size tensors sharing an offset are allowed.
    cursor = base
    for info in sorted(out.values(), key=lambda t: (t.offset, t.nbytes)):
        if info.offset != cursor:
            raise FormatError(f"{path}: tensor {info.name} data begins at byte {info.offset}, but the "
                              f"tensors before it end at byte {cursor} (safetensors stores tensors back "
                              f"to back, without gaps or overlaps)")
        cursor += info.nbytes
    if cursor != size:
        raise FormatError(f"{path}: the tensors' data ends at byte {cursor} but the file is {size} "
                          f"bytes (safetensors data covers the file exactly)")
    return out


def _tensor_info(path: Path, name: str, meta: dict, base: int, size: int) -> TensorInfo:
    """One header entry, typed as the safetensors format defines it (a list or a negative number
    where an integer belongs is a FormatError here, not a TypeError or a reshape error later)."""
    dtype = check_choice(path, f"tensor {name} dtype", meta.get("dtype"), tuple(DTYPES))
    shape = tuple(check_int(path, f"tensor {name} shape", s, 0, MAX_NUMEL)
                  for s in check_list(path, f"tensor {name} shape", meta.get("shape"), MAX_RANK))
    offsets = meta.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise FormatError(f"{path}: tensor {name} data_offsets must be a list [begin, end], "
                          f"got {show(offsets)}")
    begin, end = (check_int(path, f"tensor {name} data_offsets", x) for x in offsets)
    # math.prod of Python integers: a product of huge dimensions cannot wrap around to match.
    need = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != need:
        raise FormatError(f"{path}: tensor {name} data_offsets [{begin}, {end}] hold {end - begin} "
                          f"bytes, but {dtype} of shape {list(shape)} needs {need}")
    if base + end > size:
        raise FormatError(f"{path}: tensor {name} ends at byte {base + end}, past the end of the "
                          f"file ({size} bytes): a truncated shard (incomplete download?)")
    return TensorInfo(name, str(path), dtype, shape, base + begin, end - begin)


def _json_object(path: Path) -> dict:
    """A checkpoint's JSON file (config, shard index, generation config) as an object; anything
    else is a FormatError naming the file, not json's own error from deep inside a pack."""
    try:
        value = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise FormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


class Checkpoint:
    """A folder with ``config.json`` and ``*.safetensors`` (single file or sharded with an index)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        cfg = self.folder / "config.json"
        if not self.folder.exists():
            raise ArgumentError(f"{self.folder} does not exist (expected a Hugging Face model folder)")
        if self.folder.is_file():
            raise ArgumentError(f"{self.folder} is a file; give the Hugging Face model folder that holds "
                                f"it and its config.json")
        if not cfg.is_file():
            raise FormatError(f"{self.folder} has no config.json (expected a Hugging Face model folder)")
        self.config = _json_object(cfg)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _json_object(index).get("weight_map", {})
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise FormatError(f"{index}: weight_map must map tensor names to shard file names")
            shards = sorted({self.folder / f for f in weight_map.values()})
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise FormatError(f"{index}: its weight_map names {len(missing)} shard(s) the "
                                  f"folder lacks ({', '.join(missing[:3])}; incomplete download?)")
        else:
            shards = sorted(self.folder.glob("*.safetensors"))
        if not shards:
            raise FormatError(f"{self.folder} has no *.safetensors files (.bin checkpoints: convert "
                              f"with transformers' save_pretrained(safe_serialization=True))")
        self.tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            for name, info in _parse_shard(shard).items():
                if name in self.tensors:
                    raise FormatError(f"tensor {name} appears in two shards ({self.tensors[name].path}, {shard})")
                self.tensors[name] = info
        self.shards = [str(s) for s in shards]

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> torch.Tensor:
        """The tensor, read with ``pread`` into new memory (no mapping of the shard)."""
        info = self.tensors[name]
        buf = np.empty(info.nbytes, dtype=np.uint8)
        fd = os.open(info.path, os.O_RDONLY)
        try:
            if info.nbytes:
                read_fully(fd, memoryview(buf), info.offset, path=info.path, direct=False, retries=3)
        finally:
            os.close(fd)
        d = dtype_of(info.dtype)
        return torch.from_numpy(buf).view(d.torch).reshape(info.shape)

    def tokenizer_files(self) -> dict[str, bytes]:
        """The tokenizer files present in the folder, as bytes."""
        return {n: (self.folder / n).read_bytes() for n in TOKENIZER_FILES if (self.folder / n).is_file()}

    def generation_config(self) -> dict | None:
        """generation_config.json, its typed fields checked as the reader will check them."""
        p = self.folder / "generation_config.json"
        return check_generation_config(p, _json_object(p)) if p.is_file() else None

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
