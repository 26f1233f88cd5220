"""Read a Hugging Face checkpoint folder one tensor at a time.

The safetensors format is an 8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets: [begin, end]}}`` and the data. We parse it ourselves and
``pread`` each tensor into fresh memory instead of memory-mapping the shards: a mapping keeps
every touched page of a multi-GB shard in the process's resident set, which is exactly what a
packer for models larger than memory must not do.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import FormatError
from .format import DTYPES, dtype_of
from .io import read_fully
from .layout import check_generation_config

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
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


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
        except ValueError as exc:
            raise FormatError(f"{path}: safetensors header is not JSON ({exc})") from None
    base = 8 + hlen
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = meta["dtype"]
            shape = tuple(int(s) for s in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: malformed safetensors entry for {name!r}") from None
        if dtype not in DTYPES:
            raise FormatError(f"{path}: tensor {name} has dtype {dtype}, not supported "
                              f"(supported: {', '.join(DTYPES)})")
        info = TensorInfo(name, str(path), dtype, shape, base + begin, end - begin)
        if end < begin or base + end > size or info.nbytes != info.numel * DTYPES[dtype].itemsize:
            raise FormatError(f"{path}: tensor {name} has inconsistent data_offsets {begin}..{end}")
        out[name] = info
    return out


def _json_object(path: Path) -> dict:
    """A checkpoint's JSON file (config, shard index, generation config) as an object; anything
    else is a FormatError naming the file, not json's own error from deep inside a pack."""
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


class Checkpoint:
    """A folder with ``config.json`` and ``*.safetensors`` (single file or sharded with an index)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        cfg = self.folder / "config.json"
        if not cfg.is_file():
            raise FormatError(f"{self.folder} has no config.json (expected a Hugging Face model folder)")
        self.config = _json_object(cfg)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _json_object(index).get("weight_map", {})
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise FormatError(f"{index}: weight_map must map tensor names to shard file names")
            shards = sorted({self.folder / f for f in weight_map.values()})
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
