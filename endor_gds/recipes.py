"""Model-family recipes: which tensors form a streamed layer, which stay resident, which are sparse.

A recipe is a TOML file in ``layouts/`` (shipped inside the package as ``endor_gds/_layouts``).
The family is picked from ``config.json``'s ``model_type``. Adding a family is adding a file;
see ``layouts/llama.toml`` for the annotated fields.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from endor_gds._resources import data_dir
from endor_gds.errors import UnsupportedModelError

__all__ = ["Experts", "Recipe", "TensorGroups", "recipes", "recipe_for"]


@dataclass(frozen=True)
class TensorGroups:
    """Where each tensor goes, for one model. Names are the file's (the model's parameter names,
    or an expert's slice of one); ``sources`` says which checkpoint tensors make one that is not
    stored under its own name in the checkpoint."""

    resident: list[str]  # names, in file order
    layers: list[list[str]]  # layers[i] = full names of layer i's tensors (experts apart), in file order
    tied: dict[str, str]  # name not stored -> name it shares
    num_layers: int
    # experts[i][e] = the names of expert e's slices in layer i (mixture-of-experts layers only)
    experts: dict[int, list[list[str]]] = field(default_factory=dict)
    # file name -> checkpoint names concatenated by rows to make it (renamed or merged tensors)
    sources: dict[str, list[str]] = field(default_factory=dict)

    def sources_of(self, name: str) -> list[str]:
        return self.sources.get(name, [name])

    def layer_tensors(self, i: int) -> list[str]:
        """Layer ``i``'s tensors, its experts' slices included."""
        return [*self.layers[i], *(n for names in self.experts.get(i, []) for n in names)]


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts layer's experts: the module holding them as 3-D parameters
    (``[E, rows, cols]``, as transformers 5 fuses them) and, per parameter, the rows of one expert
    in the checkpoint (tensor names under ``<module>.<e>.``, concatenated in this order)."""

    module: str  # relative to the layer, e.g. "mlp.experts"
    params: dict[str, tuple[str, ...]]  # e.g. {"gate_up_proj": ("gate_proj.weight", "up_proj.weight")}
    # the router's linear weight [E, H] relative to the layer (its logits rank the experts), used
    # to guess the next layer's experts; "" where the family has none to use
    router: str = ""


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
    # linear modules some layers have and others not (a MoE model's dense-MLP layers, its shared
    # expert): pruned and encoded where present, required nowhere
    linear_optional: tuple[str, ...] = ()
    # checkpoint name fragment -> model name fragment (transformers' own renamings on load)
    renames: dict[str, str] = field(default_factory=dict)
    experts: Experts | None = None
    # which modules hold attention heads, for tensor parallelism (endor_gds.shards):
    # {"q_heads": (...), "kv_heads": (...), "attention": "self_attn"}; None where not written yet
    tensor_parallel: dict | None = None

    @property
    def layer_prefix_re(self) -> re.Pattern:
        return re.compile(re.escape(self.layers) + r"\.(\d+)\.(.+)$")

    def layer_of(self, name: str) -> tuple[int, str] | None:
        """``(layer index, name relative to the layer)`` for a layer tensor, else ``None``."""
        m = self.layer_prefix_re.match(name)
        return (int(m.group(1)), m.group(2)) if m else None

    def is_linear_weight(self, name: str) -> bool:
        """Whether ``name`` is the weight of one of a layer's linear modules, or an expert's slice
        of one (prunable, sparse)."""
        where = self.layer_of(name)
        if where is None:
            return False
        return where[1] in {f"{lin}.weight" for lin in (*self.linear, *self.linear_optional)} \
            or self.expert_slice(name) is not None

    @property
    def _expert_re(self) -> re.Pattern:
        return re.compile(re.escape(f"{self.experts.module}.") + r"(\d+)\.(.+)$")

    def expert_slice(self, name: str) -> tuple[str, int] | None:
        """``(parameter name, expert)`` for the name of one expert's slice of a fused experts
        parameter (``model.layers.3.mlp.experts.5.down_proj`` -> ``(model.layers.3.mlp.experts.down_proj,
        5)``), else ``None``."""
        where = self.layer_of(name)
        if self.experts is None or where is None:
            return None
        m = self._expert_re.match(where[1])
        if m is None or m.group(2) not in self.experts.params:
            return None
        return f"{self.layers}.{where[0]}.{self.experts.module}.{m.group(2)}", int(m.group(1))

    def is_fused_experts(self, name: str) -> bool:
        """Whether ``name`` is a fused experts parameter of the model (``<layer>.mlp.experts.down_proj``)."""
        where = self.layer_of(name)
        if self.experts is None or where is None:
            return False
        module, _, leaf = where[1].rpartition(".")
        return module == self.experts.module and leaf in self.experts.params

    def checkpoint_rows(self, name: str, expert: int) -> list[str]:
        """The checkpoint tensors that hold expert ``expert``'s rows of the fused experts
        parameter ``name``, in order (what :meth:`plan` reads back): the names a Hugging Face
        checkpoint of the family uses, renamings undone."""
        owner, _, leaf = name.rpartition(".")
        names = [f"{owner}.{expert}.{rows}" for rows in self.experts.params[leaf]]
        for old, new in self.renames.items():
            names = [n.replace(new, old) for n in names]
        return names

    def renamed(self, name: str) -> str:
        for old, new in self.renames.items():
            name = name.replace(old, new)
        return name

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
        """Sort checkpoint tensor names into resident and per-layer lists (and experts), checking
        the recipe."""
        nlayers = self.num_layers(config)
        ties = self.active_ties(config)
        # By index, not a list of num_hidden_layers lists: a config asking for 10^9 layers must
        # be refused at the first layer the checkpoint lacks, not allocate 10^9 lists first.
        found: dict[int, list[str]] = {}
        per_expert: dict[int, dict[int, dict[str, str]]] = {}  # layer -> expert -> rest -> checkpoint name
        sources: dict[str, list[str]] = {}
        resident: list[str] = []
        stored = set(names)
        for ckpt_name in sorted(names):
            name = self.renamed(ckpt_name)
            if name != ckpt_name:
                if name in sources or name in stored:
                    raise UnsupportedModelError(f"tensors {ckpt_name} and {name} are the same tensor "
                                                f"once renamed by {self.path or self.family + '.toml'}")
                sources[name] = [ckpt_name]
            where = self.layer_of(name)
            if where is not None:
                i = where[0]
                if i >= nlayers:
                    raise UnsupportedModelError(
                        f"tensor {ckpt_name} belongs to layer {i} but config.json has "
                        f"num_hidden_layers={nlayers}"
                    )
                m = self._expert_re.match(where[1]) if self.experts is not None else None
                if m is not None:
                    per_expert.setdefault(i, {}).setdefault(int(m.group(1)), {})[m.group(2)] = ckpt_name
                    sources.pop(name, None)
                    continue
                found.setdefault(i, []).append(name)
            elif name in ties:
                continue  # stored once, under the name it is tied to
            elif self.is_resident(name):
                resident.append(name)
            else:
                raise UnsupportedModelError(
                    f"tensor {ckpt_name} is neither in a decoder layer ({self.layers}.<i>.*) nor listed "
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
        experts = {i: self._expert_slices(i, found_e, sources) for i, found_e in sorted(per_expert.items())}
        for alias, target in ties.items():
            if target not in resident:
                raise UnsupportedModelError(f"{alias} is tied to {target}, which is not in the checkpoint")
        return TensorGroups(resident=resident, layers=layers, tied=ties, num_layers=nlayers,
                            experts=experts, sources=sources)

    def _expert_slices(self, i: int, found: dict[int, dict[str, str]],
                       sources: dict[str, list[str]]) -> list[list[str]]:
        """Layer ``i``'s experts ``0..E-1``, each as the names of its slices of the fused
        parameters, with the checkpoint tensors that make each slice recorded in ``sources``."""
        if sorted(found) != list(range(len(found))):
            # the first gaps lie below len(found) + 8: never a range up to a hostile index
            gaps = [e for e in range(min(max(found), len(found) + 8)) if e not in found]
            raise UnsupportedModelError(f"layer {i} has tensors of experts up to {max(found)} but "
                                        f"none of expert(s) {gaps[:8]}")
        out = []
        for e in range(len(found)):
            rest = found[e]
            wanted = [r for rows in self.experts.params.values() for r in rows]
            unknown = sorted(set(rest) - set(wanted))
            missing = [r for r in wanted if r not in rest]
            if unknown or missing:
                raise UnsupportedModelError(
                    f"expert {e} of layer {i}: the {self.family} recipe expects "
                    f"{', '.join(wanted)} under {self.experts.module}.{e}."
                    + (f"; the checkpoint lacks {', '.join(missing)}" if missing else "")
                    + (f"; it has {', '.join(unknown)}, which the recipe does not place" if unknown else ""))
            names = []
            for param, rows in self.experts.params.items():
                name = f"{self.layers}.{i}.{self.experts.module}.{e}.{param}"
                sources[name] = [rest[r] for r in rows]
                names.append(name)
            out.append(names)
        return out


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
            linear_optional=tuple(raw.get("linear_optional", ())),
            renames=dict(raw.get("renames", {})),
            experts=None if "experts" not in raw else Experts(
                module=str(raw["experts"]["module"]),
                params={str(k): tuple(v) for k, v in raw["experts"]["params"].items()},
                router=str(raw["experts"].get("router", ""))),
            tensor_parallel=None if "tensor_parallel" not in raw else {
                "q_heads": tuple(raw["tensor_parallel"]["q_heads"]),
                "kv_heads": tuple(raw["tensor_parallel"]["kv_heads"]),
                "attention": str(raw["tensor_parallel"]["attention"])},
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


def transformers_major() -> int | None:
    """The installed transformers' major version (None where it is not installed or not a number)."""
    try:
        return int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def usable(recipe: Recipe) -> Recipe:
    """``recipe``, after checking the installed transformers can build its model: a mixture of
    experts needs transformers 5 (4.x holds experts as a list of per-expert modules, not the fused
    3-D parameters the recipes name, and would fail later, less clearly)."""
    if recipe.experts is not None and (major := transformers_major()) is not None and major < 5:
        raise UnsupportedModelError(
            f"{recipe.family} is a mixture-of-experts model: it needs transformers >= 5 (its experts "
            f"as fused 3-D parameters), and transformers {importlib.metadata.version('transformers')} "
            f"is installed: pip install 'transformers>=5'")
    return recipe


def recipe_for(config: dict) -> Recipe:
    """The recipe for a model's ``config.json`` contents (by ``model_type``)."""
    model_type = config.get("model_type")
    for r in recipes().values():
        if model_type in r.model_types:
            return usable(r)
    known = ", ".join(sorted(recipes()))
    raise UnsupportedModelError(
        f"no recipe for model_type {model_type!r} (architectures {config.get('architectures')}); "
        f"supported families: {known}. To add one, write layouts/<family>.toml naming the decoder "
        f"layers, their linear modules and the resident tensors (see layouts/llama.toml)."
    )
