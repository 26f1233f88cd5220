"""Every error endor_gds raises on purpose derives from :class:`EndorError`.

A caller that wants to survive a bad file, a failing disk or a too-small budget catches that one
class; the subclasses say which of those it was, and the message names the file, tensor, segment,
offset or limit involved.
"""

from __future__ import annotations

__all__ = [
    "TensorParallelError",
    "EndorError",
    "FormatError",
    "ChecksumError",
    "DecodeError",
    "ReadError",
    "PackError",
    "UnsupportedModelError",
    "BudgetError",
    "MissingDependencyError",
    "CalibrationError",
    "PlacementError",
    "ArgumentError",
    "ClosedError",
    "DiskSpaceError",
]


class EndorError(Exception):
    """Base class of all endor_gds errors."""


class FormatError(EndorError):
    """The file is not a valid .endor file: header, manifest, offsets or sizes are wrong."""


class ChecksumError(FormatError):
    """A segment's bytes do not match the CRC-32C recorded in the manifest."""

    def __init__(self, message: str, *, segment: str | None = None):
        super().__init__(message)
        self.segment = segment


class DecodeError(FormatError):
    """A tensor's bitmap and tile offsets disagree (found while decoding, never read past)."""


class ReadError(EndorError):
    """Reading the file failed after retries; names the file, offset and length."""

    def __init__(self, message: str, *, path=None, offset=None, length=None, errno=None):
        super().__init__(message)
        self.path, self.offset, self.length, self.errno = path, offset, length, errno


class PackError(EndorError):
    """Packing failed; nothing was written at the destination and the source is untouched."""


class UnsupportedModelError(EndorError):
    """The checkpoint's architecture has no recipe in layouts/, or does not match its recipe."""


class BudgetError(EndorError):
    """A memory budget cannot hold what the runtime needs (resident tensors and buffer sets)."""


class MissingDependencyError(EndorError, ImportError):
    """An optional package (cupy, kvikio, nvidia-ml-py, accelerate, ...) is needed and absent."""


class CalibrationError(EndorError, ValueError):
    """Wanda's calibration input (file, token ids, sample count or length) cannot be used."""


class PlacementError(EndorError, RuntimeError):
    """A streaming model was asked to move to another device or dtype (``model.to``, ``.cuda()``,
    ``.half()``, ...): its weights stay where ``from_pretrained`` placed them."""


class ArgumentError(EndorError, ValueError):
    """A public argument has a value it cannot take; the message says what was given, what is
    allowed and, where it helps, what to do."""


class ClosedError(EndorError, RuntimeError):
    """A streaming model was used after ``model.endor.close()``: its file and buffers are gone."""


class DiskSpaceError(EndorError, OSError):
    """The disk cannot hold the files a run would write; said before anything is written."""


class TensorParallelError(EndorError, RuntimeError):
    """The ranks of a tensor-parallel run disagree or lost each other: a rank's file is missing or
    from another pack, a rank failed to load, or a collective failed (a rank died or hung)."""
