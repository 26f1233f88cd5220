"""Tensor parallelism at run time, on torch.distributed (gloo on CPUs, NCCL on GPUs).

Inside an initialised process group of ``N`` ranks, ``from_pretrained`` on rank ``r`` builds the
model with rank ``r``'s shapes (:func:`localize`), streams only rank ``r``'s shard extents through
the same pipeline and kernels, and after each row-parallel module (``o_proj``, ``down_proj``)
sums the ranks' partial outputs with one all-reduce (:func:`install_rowwise`); the column-parallel
modules need none. Embeddings, norms and lm_head are whole on every rank, so every rank ends a step
with the same logits and picks the same next token: each rank runs the same ``generate()``.

The ranks check each other before any step: each opens its file and the ranks compare the
fingerprints of their files (:meth:`TensorParallel.agree`), so a missing file, a file of another
pack or for another rank count is named on every rank, not a hang at the first all-reduce. A
collective that fails (a rank died: its socket closes; or hangs past the process group's timeout)
is a :class:`~endor_gds.errors.TensorParallelError`.

Reduction order: a row-parallel module's output is the sum of ``N`` partial products instead of
one product, so a rank's logits match the single-process model's to rounding (fp32: within 1e-5
relative on the test models), not bit for bit. Half-precision partial sums are added in float32.
"""

from __future__ import annotations

import datetime
import os
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from endor_gds import defaults
from endor_gds.errors import ArgumentError, TensorParallelError, UnsupportedModelError
from endor_gds.modeling import exception_line, get_submodule
from endor_gds.recipes import Recipe
from endor_gds.shards import ShardPlan

__all__ = ["TensorParallel", "current", "init_from_env", "torchrun_group", "shutdown", "rank_path",
           "check_file", "localize", "install_rowwise"]


class TensorParallel:
    """This process's place in the process group, and the collectives the runtime uses."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.collective_s = 0.0  # seconds spent in all-reduces since the start

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over the ranks (half precision summed in float32)."""
        t0 = time.perf_counter()
        wide = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        try:
            dist.all_reduce(wide, group=self.group)
        except (RuntimeError, dist.DistError) as exc:
            raise TensorParallelError(
                f"rank {self.rank} of {self.size}: an all-reduce failed ({exception_line(exc)}); another "
                f"rank stopped, or did not reach the same step within the process group's timeout") from exc
        self.collective_s += time.perf_counter() - t0
        return wide.to(t.dtype) if wide is not t else t

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (a collective: every rank must call it)."""
        out = [None] * self.size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except (RuntimeError, dist.DistError) as exc:
            raise TensorParallelError(f"rank {self.rank} of {self.size}: gathering from the other ranks "
                                      f"failed ({exception_line(exc)})") from exc
        return out

    def agree(self, what: str, fingerprint, error: BaseException | None) -> None:
        """Every rank reports how ``what`` went (its fingerprint, or its error); if any rank
        failed, every rank raises (the failed one its own error), and fingerprints that differ are
        a TensorParallelError naming the ranks."""
        report = None if error is None else exception_line(error)
        reports = self.gather((fingerprint, report))
        failed = [f"rank {r}: {rep}" for r, (_, rep) in enumerate(reports) if rep is not None]
        if error is not None:
            raise error
        if failed:
            raise TensorParallelError(f"rank {self.rank} of {self.size}: {what} failed on other ranks: "
                                      + "; ".join(failed))
        prints = [f for f, _ in reports]
        if len(set(prints)) > 1:
            raise TensorParallelError(
                f"rank {self.rank} of {self.size}: {what}: the ranks' files are not of one pack "
                f"(fingerprints by rank: {', '.join(f'{r}: {f}' for r, f in enumerate(prints))}); give "
                f"every rank a file of the same `endor-gds pack --tp` run (or its `endor-gds split`)")

    def together(self, what: str, fn, fingerprint=lambda result: None, cleanup=lambda result: None):
        """``fn()`` on every rank; if it fails on any, every rank raises (see :meth:`agree`) and
        those where it succeeded ``cleanup`` its result."""
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - reported to the other ranks, then raised here
            self.agree(what, None, exc)
            raise  # pragma: no cover - agree raised it
        try:
            self.agree(what, fingerprint(result), None)
        except BaseException:
            cleanup(result)
            raise
        return result

    def __repr__(self) -> str:
        return f"<TensorParallel rank {self.rank} of {self.size} ({self.backend})>"


def current(process_group="auto") -> TensorParallel | None:
    """The ranks a model is split over: ``"auto"``, the default process group when one is
    initialised (``torchrun`` + ``init_process_group``); ``None``, none (each process runs the whole
    model, e.g. data-parallel copies); or a ``ProcessGroup`` (a tensor-parallel sub-group)."""
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ArgumentError(f"process_group must be 'auto', None or a torch.distributed ProcessGroup, "
                                f"got {process_group!r}")
        return TensorParallel() if dist.is_available() and dist.is_initialized() else None
    return TensorParallel(process_group)


def init_from_env(device: str = "auto") -> TensorParallel | None:
    """Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set), start the default process group — NCCL
    for a CUDA ``device`` (``"auto"`` where torch sees a GPU), gloo for the CPU — with the
    ``tp_timeout`` option's timeout; otherwise ``None``."""
    if dist.is_available() and dist.is_initialized():
        return TensorParallel()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=defaults.get("tp_timeout")))
    return TensorParallel()


@contextmanager
def torchrun_group(device: str):
    """A command's process group: under ``torchrun``, started here (:func:`init_from_env`) and ended
    here (:func:`shutdown`; a group that already existed is left as it was); yields the
    :class:`TensorParallel`, or ``None`` outside torchrun."""
    already = dist.is_available() and dist.is_initialized()
    tp = init_from_env(device)
    clean = False
    try:
        yield tp
        clean = True
    finally:
        if tp is not None and not already:
            shutdown(clean)


def shutdown(clean: bool) -> None:
    """End the default process group. After a clean run the ranks first wait for each other: a rank
    that tore its group down while a peer's last collective still talked to it was seen to abort
    (gloo, "terminate called without an active exception"); after a failure nobody waits."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def rank_path(path, rank: int):
    """``path`` with ``{rank}`` replaced by the rank (``/nvme{rank}/model.endor``: a per-rank copy
    on each rank's own drive)."""
    text = os.fspath(path)
    return text.replace("{rank}", str(rank)) if "{rank}" in text else path


def _planned(layer: nn.Module, plan: ShardPlan, style: str | None = None):
    """The modules of ``layer`` the plan names (of ``style`` only, if given); a module the plan
    names that this family's layers lack is skipped."""
    for path, module_style in plan.styles.items():
        if style not in (None, module_style):
            continue
        try:
            yield layer.get_submodule(path)
        except AttributeError:
            continue


def localize(model: nn.Module, recipe: Recipe, plan: ShardPlan, rank: int) -> None:
    """Give ``model`` (parameters on meta) rank ``rank``'s shapes: its slice of every split
    tensor, the linear modules' ``in_features`` / ``out_features`` to match, and its attention's
    ``num_key_value_groups`` for its local heads."""
    for layer in get_submodule(model, recipe.layers):
        for rel, p in list(layer.named_parameters()):
            shape = plan.local_shape(rel, tuple(p.shape), rank)
            if shape != tuple(p.shape):
                owner_path, _, leaf = rel.rpartition(".")
                owner = layer.get_submodule(owner_path)
                owner._parameters[leaf] = nn.Parameter(torch.empty(shape, dtype=p.dtype, device="meta"),
                                                       requires_grad=False)
        for module in _planned(layer, plan):
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Linear) and weight is not None:
                module.out_features, module.in_features = weight.shape
        try:
            attention = layer.get_submodule(plan.attention)
        except AttributeError:
            raise UnsupportedModelError(f"{recipe.family}: the recipe's tensor-parallel attention module "
                                        f"{plan.attention!r} is not in the model") from None
        if not hasattr(attention, "num_key_value_groups"):
            raise UnsupportedModelError(f"{recipe.family}: {type(attention).__name__} has no "
                                        f"num_key_value_groups to set for its local heads")
        attention.num_key_value_groups = plan.kv_groups()


def install_rowwise(layers: nn.Module, plan: ShardPlan, tp: TensorParallel) -> None:
    """Make every row-parallel module of ``layers`` return the sum of the ranks' partial outputs."""
    for layer in layers:
        for module in _planned(layer, plan, "rowwise"):
            _sum_over_ranks(module, tp)


def _sum_over_ranks(module: nn.Module, tp: TensorParallel) -> None:
    """``module``'s output becomes the sum of the ranks' partial outputs, with its bias (whole on
    every rank) added once, after the sum — as transformers' RowwiseParallel does. Wraps whatever
    ``forward`` the module has (the fused CPU product's too)."""
    inner = module.forward

    def forward(*args, **kwargs):
        bias = module._parameters.get("bias")
        if bias is not None:
            module._parameters["bias"] = None
        try:
            partial = inner(*args, **kwargs)
        finally:
            if bias is not None:
                module._parameters["bias"] = bias
        out = tp.all_reduce(partial)
        return out if bias is None else out + bias

    module.forward = forward


def check_file(ef, tp: TensorParallel | None) -> int | None:
    """The rank whose shards this process streams from the file ``ef``: ``None`` for a file
    without tensor parallelism; checks that the file was packed for this many ranks and holds
    this rank's shards."""
    spec = ef.tensor_parallel
    size = 1 if tp is None else tp.size
    if spec is None:
        if size > 1:
            raise UnsupportedModelError(
                f"{ef.path} is not packed for tensor parallelism, and this is rank {tp.rank} of {size}: "
                f"pack it with `endor-gds pack SRC OUT --tp {size}`, or run one process")
        return None
    if spec["size"] != size:
        how = "run it without torchrun" if spec["size"] == 1 else \
            f"run it with `torchrun --nproc-per-node {spec['size']}`"
        raise UnsupportedModelError(f"{ef.path} was packed for {spec['size']} tensor-parallel rank(s), "
                                    f"this run has {size}: {how}, or pack again with --tp {size}")
    rank = 0 if tp is None else tp.rank
    if rank not in spec["ranks"]:
        raise UnsupportedModelError(f"{ef.path} holds the shards of rank(s) {spec['ranks']}, not of rank "
                                    f"{rank}: give each rank its own file (`endor-gds split`), e.g. a path "
                                    f"with {{rank}} in it")
    return rank

