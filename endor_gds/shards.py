"""Tensor-parallel shard plans: which rows or columns of each layer tensor rank ``r`` of ``N`` holds.

The plan is the model's own: transformers' config classes carry ``base_model_tp_plan``
(``"layers.*.self_attn.q_proj": "colwise"``, ``"layers.*.mlp.down_proj": "rowwise"``, ...), the
same table ``from_pretrained(tp_plan="auto")`` shards by. Its meaning, for ``y = x W^T + b``:

- ``colwise``: rank ``r`` holds a block of the output rows of ``W`` (and of ``b``); its output is
  its block of ``y``'s features, which the next (rowwise) module consumes without a collective.
- ``rowwise``: rank ``r`` holds the matching block of the input columns of ``W``; its output is a
  partial sum, all-reduced over the ranks, and ``b`` (whole on every rank) is added once after.
- ``replicated_with_grad_allreduce`` (Qwen3's per-head q/k norms) and every tensor the plan does not
  name (layer norms): whole on every rank.

Attention needs whole heads per rank. Query heads (``q_proj`` rows, ``o_proj`` columns) are split
into ``N`` equal blocks, so ``num_attention_heads`` must divide by ``N``; key/value heads are split
the same way when ``num_key_value_heads`` divides by ``N``, and otherwise, when ``N`` divides by
``num_key_value_heads``, each rank holds the one key/value head its query heads attend to
(replicated on ``N / num_key_value_heads`` ranks), and its attention's ``num_key_value_groups``
becomes its own query heads per key/value head. Any other dimension (the MLP's intermediate size)
is split into ``N`` nearly equal blocks, the first ``dim % N`` ranks one row longer.

Which modules hold query and key/value heads, and which module is the attention, come from the
family's recipe (``[tensor_parallel]`` in ``layouts/<family>.toml``).
"""

from __future__ import annotations

from dataclasses import dataclass

from endor_gds.errors import UnsupportedModelError
from endor_gds.recipes import Recipe

__all__ = ["STYLES", "ShardPlan", "shard_plan", "config_styles"]

# the plan's styles this runtime shards by, and what each is called in a file's manifest
_STYLE_OF = {"colwise": "colwise", "rowwise": "rowwise", "replicated_with_grad_allreduce": "replicated"}
STYLES = ("colwise", "rowwise", "replicated")
MAX_SIZE = 1024  # ranks; far above any node count this is meant for, low enough to loop over


def config_styles(config: dict, recipe: Recipe) -> dict[str, str]:
    """The config class's ``base_model_tp_plan`` for the decoder layers, as module (relative to a
    layer) → style (one of :data:`STYLES`). Entries outside the layers (none in the shipped
    families) are left alone: those tensors stay whole on every rank."""
    import transformers  # noqa: PLC0415 - heavy (~1 s); only when a shard plan is made

    try:
        raw = getattr(transformers.AutoConfig.for_model(**config), "base_model_tp_plan", None) or {}
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises for a bad config
        raise UnsupportedModelError(f"its config does not build a {recipe.family} config ({exc})") from None
    if not raw:
        raise UnsupportedModelError(
            f"the {recipe.family} model has no tensor-parallel plan in transformers (its config class "
            f"has no base_model_tp_plan): it cannot be packed with --tp")
    base = recipe.layers.split(".", 1)[-1] + ".*."  # "model.layers" -> "layers.*."
    styles = {}
    for key, style in raw.items():
        if not key.startswith(base):
            continue
        module = key[len(base):]
        if style not in _STYLE_OF:
            raise UnsupportedModelError(
                f"the {recipe.family} tensor-parallel plan shards {module} as {style!r}; endor_gds "
                f"shards {', '.join(sorted(_STYLE_OF))} modules (mixture-of-experts layers and fused "
                f"projections are not split yet)")
        styles[module] = _STYLE_OF[style]
    return styles


@dataclass(frozen=True)
class ShardPlan:
    """How ``size`` ranks split a model's decoder layers (see the module docstring)."""

    size: int
    styles: dict[str, str]  # module relative to a layer -> "colwise" | "rowwise" | "replicated"
    heads: int  # query heads
    kv_heads: int
    head_dim: int
    q_modules: tuple[str, ...]  # modules whose rows (colwise) or columns (rowwise) are query heads
    kv_modules: tuple[str, ...]  # modules whose rows are key/value heads
    attention: str  # the attention module, whose num_key_value_groups follows the local heads

    def style(self, rel: str) -> str:
        """The style of the layer tensor ``rel`` (``self_attn.q_proj.bias``): a rowwise module's
        bias is whole on every rank (added once, after the all-reduce)."""
        module, _, leaf = rel.rpartition(".")
        style = self.styles.get(module, "replicated")
        return "replicated" if style == "rowwise" and leaf != "weight" else style

    def _blocks(self, module: str, length: int) -> list[tuple[int, int]]:
        """``[start, stop)`` of each rank's block of the split dimension (``length`` long)."""
        n = self.size
        if module in self.kv_modules:
            width = self.kv_heads * self.head_dim
            if length != width:
                raise UnsupportedModelError(f"{module} has {length} rows, not num_key_value_heads x head_dim "
                                            f"= {self.kv_heads} x {self.head_dim}")
            if self.kv_heads % n == 0:
                per = self.kv_heads // n * self.head_dim
                return [(r * per, (r + 1) * per) for r in range(n)]
            # more ranks than key/value heads: each holds the head its block of query heads uses
            return [((h := r * self.kv_heads // n) * self.head_dim, (h + 1) * self.head_dim) for r in range(n)]
        if module in self.q_modules and length != self.heads * self.head_dim:
            raise UnsupportedModelError(f"{module} splits {length} query features, not num_attention_heads "
                                        f"x head_dim = {self.heads} x {self.head_dim}")
        base, extra = divmod(length, n)
        starts = [r * base + min(r, extra) for r in range(n + 1)]
        return list(zip(starts, starts[1:]))

    def block(self, rel: str, shape: tuple[int, ...], rank: int) -> tuple[int, int, int] | None:
        """``(dim, start, stop)``: rank ``rank``'s slice of layer tensor ``rel`` of ``shape``, or
        ``None`` when every rank holds it whole."""
        style = self.style(rel)
        if style == "replicated":
            return None
        dim = 0 if style == "colwise" else 1
        if len(shape) <= dim:
            raise UnsupportedModelError(f"{rel} is {list(shape)}: a {style} module's tensor needs a dimension {dim}")
        start, stop = self._blocks(rel.rpartition(".")[0], shape[dim])[rank]
        return dim, start, stop

    def local_shape(self, rel: str, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
        cut = self.block(rel, shape, rank)
        if cut is None:
            return tuple(shape)
        dim, start, stop = cut
        return (*shape[:dim], stop - start, *shape[dim + 1:])

    def take(self, rel: str, t, rank: int):
        """Rank ``rank``'s slice of the tensor ``t`` (a copy, contiguous)."""
        cut = self.block(rel, tuple(t.shape), rank)
        if cut is None:
            return t
        dim, start, stop = cut
        return t.narrow(dim, start, stop - start).contiguous()

    def kv_groups(self) -> int:
        """Query heads per key/value head on each rank (``num_key_value_groups``)."""
        local_q = self.heads // self.size
        local_kv = self.kv_heads // self.size if self.kv_heads % self.size == 0 else 1
        return local_q // local_kv

    def manifest(self) -> dict:
        return {"size": self.size, "plan": dict(sorted(self.styles.items()))}


def shard_plan(config: dict, recipe: Recipe, size: int) -> ShardPlan:
    """The plan for ``size`` ranks of the model of ``config`` (a config.json dict), checked: the
    heads divide as attention needs."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SIZE:
        raise UnsupportedModelError(f"the tensor-parallel size must be a whole number in 1..{MAX_SIZE}, got {size!r}")
    tp = recipe.tensor_parallel
    if tp is None:
        raise UnsupportedModelError(f"the {recipe.family} recipe has no [tensor_parallel] table (which modules "
                                    f"hold attention heads): it cannot be split over ranks yet")
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    hidden = config.get("hidden_size")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (heads, kv, hidden)):
        raise UnsupportedModelError(f"config.json lacks positive num_attention_heads / num_key_value_heads / "
                                    f"hidden_size (got {heads!r}, {kv!r}, {hidden!r})")
    head_dim = config.get("head_dim") or hidden // heads
    if heads % size:
        raise UnsupportedModelError(f"num_attention_heads={heads} does not divide among {size} ranks: each rank "
                                    f"computes whole query heads")
    if kv % size and size % kv:
        raise UnsupportedModelError(f"num_key_value_heads={kv} and {size} ranks: the key/value heads must divide "
                                    f"among the ranks, or the ranks among the heads")
    return ShardPlan(size, config_styles(config, recipe), heads, kv, head_dim, tp["q_heads"], tp["kv_heads"],
                     tp["attention"])
