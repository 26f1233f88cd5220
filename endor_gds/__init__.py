"""endor_gds: run LLMs larger than GPU memory by streaming pruned weights from NVMe.

Weights live in one ``.endor`` file: per tensor a bitmap of non-zero positions plus the packed
non-zero values, one 4 KiB-aligned extent per decoder layer. Layers are read (GPUDirect Storage,
KvikIO compat mode, or POSIX O_DIRECT), rebuilt into dense weights and run, with the next layer
already in flight.

    import endor_gds
    endor_gds.pack("path/to/hf-checkpoint", "model.endor", prune="magnitude", sparsity=0.5)
    f = endor_gds.open("model.endor")            # validated container; f.read_tensor(name)

``import endor_gds`` needs no GPU and no CUDA driver; GPU libraries load at first use.
"""

import os as _os  # noqa: E402
import sys as _sys  # noqa: E402

from endor_gds._version import __version__

if "torch" not in _sys.modules:
    # On the CPU the streaming runtime decodes the next layer on its own threads while torch
    # computes the current one. OpenMP's default is to keep idle pool threads spinning after each
    # parallel region, which takes the cores the decoder needs (TinyLlama 50 % on 2 cores: 0.78 s
    # per token spinning, 0.61 s passive; docs/performance.md). OpenMP reads this once, when torch
    # loads it, so it is set here, before that; a value the user chose is kept.
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from endor_gds import defaults  # noqa: E402
from endor_gds.container import EndorFile  # noqa: E402
from endor_gds.errors import (
    ArgumentError,
    BudgetError,
    CalibrationError,
    ChecksumError,
    ClosedError,
    DecodeError,
    DiskSpaceError,
    EndorError,
    FormatError,
    MissingDependencyError,
    PackError,
    PlacementError,
    ReadError,
    TensorParallelError,
    UnsupportedModelError,
)
from endor_gds.packing.packer import pack  # noqa: E402
from endor_gds.stream.runtime import from_pretrained, runtime_of  # noqa: E402


def open(path, **kwargs) -> EndorFile:  # noqa: A001 - the natural name, as in safetensors/kvikio
    """Open and validate an ``.endor`` file (see :class:`endor_gds.container.EndorFile`)."""
    return EndorFile(path, **kwargs)


__all__ = [
    "__version__",
    "defaults",
    "open",
    "pack",
    "from_pretrained",
    "runtime_of",
    "EndorFile",
    "EndorError",
    "ArgumentError",
    "ClosedError",
    "DiskSpaceError",
    "FormatError",
    "ChecksumError",
    "DecodeError",
    "ReadError",
    "PackError",
    "UnsupportedModelError",
    "BudgetError",
    "CalibrationError",
    "MissingDependencyError",
    "PlacementError",
    "TensorParallelError",
]
