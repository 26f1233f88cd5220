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


def prune_rows(weight: torch.Tensor, score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A copy of ``weight`` with the lowest-``score`` ``round(sparsity*cols)`` entries of each row zeroed.

    ``score`` has ``weight``'s shape (or broadcasts to it). Exactly that many entries per row are
    zeroed; ties are broken deterministically (same input → same output).
    """
    if weight.dim() != 2:
        raise ValueError(f"pruning needs a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    drop = cols - kept_per_row(cols, sparsity)
    out = weight.detach().clone()
    if drop == 0 or rows == 0:
        return out
    s = torch.broadcast_to(score, weight.shape).float()
    # NaN scores sort as largest, so a NaN weight is kept rather than silently removed.
    s = torch.nan_to_num(s, nan=float("inf"))
    idx = torch.topk(s, drop, dim=1, largest=False, sorted=False).indices
    out.scatter_(1, idx, 0.0)
    return out


def magnitude_prune(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-row magnitude pruning to an exact sparsity."""
    return prune_rows(weight, weight.detach().float().abs(), sparsity)


def wanda_prune(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-row Wanda pruning: score ``|W| * ||X_j||_2``; ``input_norm`` has shape ``[in]``."""
    if input_norm.shape != (weight.shape[1],):
        raise ValueError(f"input_norm has shape {tuple(input_norm.shape)}, expected ({weight.shape[1]},)")
    return prune_rows(weight, weight.detach().float().abs() * input_norm.float()[None, :], sparsity)
