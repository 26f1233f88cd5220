"""The data folders shipped with the package: ``cuda`` (the kernel sources) and ``layouts`` (recipes)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["data_dir"]


def data_dir(name: str) -> Path:
    """Folder of shipped data (``cuda`` or ``layouts``): inside the installed package, or the repo's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / f"_{name}", here.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"endor_gds data folder {name!r} is missing from the installation ({here})")
