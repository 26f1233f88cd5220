"""Model-family recipes: which tensors form a streamed layer, which stay resident, which are sparse.

A recipe is a TOML file in ``layouts/`` (shipped inside the package as ``endor_gds/_layouts``).
The family is picked from ``config.json``'s ``model_type``. Adding a family is adding a file;
see ``layouts/llama.toml`` for the annotated fields.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from endor_gds._resources import data_dir
from endor_gds.errors import UnsupportedModelError

__all__ = ["Recipe", "TensorGroups", "recipes", "recipe_for"]


@dataclass(frozen=True)
class TensorGroups:
    """Where each checkpoint tensor goes, for one model."""

    resident: list[str]  # names, in file order
    layers: list[list[str]]  # layers[i] = full names of layer i's tensors, in file order
    tied: dict[str, str]  # name not stored -> name it shares
    num_layers: int


@dataclass(frozen=True)
class Recipe:
    family: str
    model_types: tuple[str, ...]
    layers: str
    linear: tuple[str, ...]
    resident: tuple[str, ...]
    tied: dict[str, str] = field(default_factory=dict)
    tie_word_embeddings_default: bool = False
    path: str = ""

    @property
    def layer_prefix_re(self) -> re.Pattern:
        return re.compile(re.escape(self.layers) + r"\.(\d+)\.(.+)$")

    def layer_of(self, name: str) -> tuple[int, str] | None:
        """``(layer index, name relative to the layer)`` for a layer tensor, else ``None``."""
        m = self.layer_prefix_re.match(name)
        return (int(m.group(1)), m.group(2)) if m else None

    def is_linear_weight(self, name: str) -> bool:
        """Whether ``name`` is the weight of one of a layer's linear modules (prunable, sparse)."""
        where = self.layer_of(name)
        return where is not None and where[1] in {f"{lin}.weight" for lin in self.linear}

    def is_resident(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.resident)

    def active_ties(self, config: dict) -> dict[str, str]:
        tie = config.get("tie_word_embeddings", self.tie_word_embeddings_default)
        return dict(self.tied) if tie else {}

    def num_layers(self, config: dict) -> int:
        n = config.get("num_hidden_layers")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise UnsupportedModelError(f"config.json has no valid num_hidden_layers (got {n!r})")
        return n

    def plan(self, names: list[str], config: dict) -> TensorGroups:
        """Sort checkpoint tensor names into resident and per-layer lists, checking the recipe."""
        nlayers = self.num_layers(config)
        ties = self.active_ties(config)
        # By index, not a list of num_hidden_layers lists: a config asking for 10^9 layers must
        # be refused at the first layer the checkpoint lacks, not allocate 10^9 lists first.
        found: dict[int, list[str]] = {}
        resident: list[str] = []
        for name in sorted(names):
            where = self.layer_of(name)
            if where is not None:
                i = where[0]
                if i >= nlayers:
                    raise UnsupportedModelError(
                        f"tensor {name} belongs to layer {i} but config.json has "
                        f"num_hidden_layers={nlayers}"
                    )
                found.setdefault(i, []).append(name)
            elif name in ties:
                continue  # stored once, under the name it is tied to
            elif self.is_resident(name):
                resident.append(name)
            else:
                raise UnsupportedModelError(
                    f"tensor {name} is neither in a decoder layer ({self.layers}.<i>.*) nor listed "
                    f"as resident in {self.path or self.family + '.toml'}; add it to the recipe's "
                    f"'resident' list if it should be kept in memory"
                )
        layers: list[list[str]] = []
        for i in range(nlayers):
            layer = found.get(i)
            if layer is None:
                raise UnsupportedModelError(f"config.json has num_hidden_layers={nlayers} but the "
                                            f"checkpoint has no tensors of layer {i}")
            layers.append(layer)
            have = {self.layer_of(n)[1] for n in layer}
            missing = [f"{lin}.weight" for lin in self.linear if f"{lin}.weight" not in have]
            if missing:
                raise UnsupportedModelError(
                    f"layer {i} lacks {', '.join(missing)} required by the {self.family} recipe"
                )
        for alias, target in ties.items():
            if target not in resident:
                raise UnsupportedModelError(f"{alias} is tied to {target}, which is not in the checkpoint")
        return TensorGroups(resident=resident, layers=layers, tied=ties, num_layers=nlayers)


def _load(path: Path) -> Recipe:
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    try:
        return Recipe(
            family=str(raw["family"]),
            model_types=tuple(raw["model_types"]),
            layers=str(raw["layers"]),
            linear=tuple(raw["linear"]),
            resident=tuple(raw["resident"]),
            tied=dict(raw.get("tied", {})),
            tie_word_embeddings_default=bool(raw.get("tie_word_embeddings_default", False)),
            path=str(path),
        )
    except (KeyError, TypeError) as exc:
        raise UnsupportedModelError(f"recipe {path} is malformed: missing or bad field {exc}") from None


@lru_cache(maxsize=1)
def recipes() -> dict[str, Recipe]:
    """All shipped recipes by family name."""
    found = {}
    for path in sorted(data_dir("layouts").glob("*.toml")):
        r = _load(path)
        found[r.family] = r
    return found


def recipe_for(config: dict) -> Recipe:
    """The recipe for a model's ``config.json`` contents (by ``model_type``)."""
    model_type = config.get("model_type")
    for r in recipes().values():
        if model_type in r.model_types:
            return r
    known = ", ".join(sorted(recipes()))
    raise UnsupportedModelError(
        f"no recipe for model_type {model_type!r} (architectures {config.get('architectures')}); "
        f"supported families: {known}. To add one, write layouts/<family>.toml naming the decoder "
        f"layers, their linear modules and the resident tensors (see layouts/llama.toml)."
    )
