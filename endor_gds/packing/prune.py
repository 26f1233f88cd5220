"""Unstructured pruning to an exact per-row sparsity: magnitude and Wanda scores.

Both methods zero, in every output row of a linear weight ``W`` (shape ``[out, in]``), the
``round(sparsity * in)`` entries with the lowest score; they differ only in the score:

* magnitude: ``|W_ij|``
* Wanda (Sun et al., 2023): ``|W_ij| * ||X_j||_2``, the weight times the L2 norm of input
  channel ``j`` over calibration tokens, so a small weight on an outlier channel survives.

The zeroed entries get the all-zero bit pattern (+0.0), which is what the bitmap format drops.
"""

from __future__ import annotations

import torch

__all__ = ["prune_rows", "magnitude_prune", "wanda_prune", "kept_per_row"]


def kept_per_row(cols: int, sparsity: float) -> int:
    """How many entries a row of ``cols`` keeps at ``sparsity`` (the rest are zeroed)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return cols - int(round(sparsity * cols))


# Rows are pruned in blocks of about this many elements, so the float32 scores, top-k's own
# working copy and its values and int64 indices (about 26 bytes per element together, measured
# as RSS growth) stay near 30 MB even for a 28672 x 8192 weight, instead of several times the
# weight's own size: the Wanda pruner's peak is "one layer", not "one layer plus 5x its largest
# matrix". Rows are independent, so blocking changes no result.
_BLOCK_ELEMS = 1 << 20


def _prune_blocks(weight: torch.Tensor, score_of, sparsity: float, inplace: bool = False) -> torch.Tensor:
    """Zero the lowest-scoring entries of each row (of ``weight`` itself when ``inplace``).

    ``score_of(r0, r1)`` returns a new float32 tensor scoring rows ``r0:r1``, owned by the caller
    (it is modified in place). Each block is scored before it is zeroed, so scoring from
    ``weight`` itself is safe in place.
    """
    if weight.dim() != 2:
        raise ValueError(f"pruning needs a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    drop = cols - kept_per_row(cols, sparsity)
    out = weight.detach() if inplace else weight.detach().clone()
    if drop == 0 or rows == 0:
        return out
    step = max(1, _BLOCK_ELEMS // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        # NaN scores sort as largest, so a NaN weight is kept rather than silently removed.
        s = torch.nan_to_num_(score_of(r0, r1), nan=float("inf"))
        idx = torch.topk(s, drop, dim=1, largest=False, sorted=False).indices
        out[r0:r1].scatter_(1, idx, 0.0)
    return out


def prune_rows(weight: torch.Tensor, score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A copy of ``weight`` with the lowest-``score`` ``round(sparsity*cols)`` entries of each row zeroed.

    ``score`` has ``weight``'s shape (or broadcasts to it). Exactly that many entries per row are
    zeroed; ties are broken deterministically (same input → same output).
    """
    full = torch.broadcast_to(score, weight.shape) if weight.dim() == 2 else score
    return _prune_blocks(weight, lambda r0, r1: full[r0:r1].to(torch.float32, copy=True), sparsity)


def magnitude_prune(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-row magnitude pruning to an exact sparsity."""
    w = weight.detach()
    return _prune_blocks(w, lambda r0, r1: w[r0:r1].to(torch.float32, copy=True).abs_(), sparsity)


def wanda_prune(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float, *,
                inplace: bool = False) -> torch.Tensor:
    """Per-row Wanda pruning: score ``|W| * ||X_j||_2``; ``input_norm`` has shape ``[in]``.

    ``input_norm`` may be float64 (the pruner accumulates ``||X_j||^2`` in float64); the score is
    formed in float32, as in the Wanda reference code. ``inplace=True`` zeroes ``weight`` itself
    and returns it (the layer-by-layer pruner owns its weights and so saves a copy of the largest).
    """
    if weight.dim() != 2:
        raise ValueError(f"pruning needs a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if input_norm.shape != (weight.shape[1],):
        raise ValueError(f"input_norm has shape {tuple(input_norm.shape)}, expected ({weight.shape[1]},)")
    w, norm = weight.detach(), input_norm.float()[None, :]
    return _prune_blocks(w, lambda r0, r1: w[r0:r1].to(torch.float32, copy=True).abs_().mul_(norm),
                         sparsity, inplace)
