"""endor_gds.packing.prune: row blocks change nothing, inputs are never modified unless asked."""

import pytest
import torch

import endor_gds.packing.prune as prune
from endor_gds.packing.prune import kept_per_row, magnitude_prune, prune_rows, wanda_prune


def _check_valid(out, weight, score, sparsity):
    """Exactly round(sparsity*cols) zeros per row, survivors unchanged, and no dropped entry
    scores above a kept one in its row (ties may fall either way)."""
    drop = weight.shape[1] - kept_per_row(weight.shape[1], sparsity)
    dropped = (out == 0) & (weight != 0)
    assert (dropped.sum(1) == drop).all()
    assert torch.equal(out[~dropped], weight[~dropped])
    s = score.float()
    hi_dropped = s.masked_fill(~dropped, float("-inf")).amax(1)
    lo_kept = s.masked_fill(dropped, float("inf")).amin(1)
    assert (hi_dropped <= lo_kept).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,cols", [(1, 2), (33, 31), (97, 64), (5, 4097)])
def test_blocks_change_nothing(monkeypatch, dtype, rows, cols):
    g = torch.Generator().manual_seed(rows * cols)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    norm = torch.rand(cols, generator=g, dtype=torch.float64) * 10
    results = []
    for block in (1, 64, 1 << 30):  # one row per block, a few rows, the whole matrix at once
        monkeypatch.setattr(prune, "_BLOCK_ELEMS", block)
        results.append((magnitude_prune(w, 0.5), wanda_prune(w, norm, 0.5)))
    for mag, wanda in results[1:]:
        assert torch.equal(mag, results[0][0]) and torch.equal(wanda, results[0][1])
    _check_valid(results[0][0], w, w.float().abs(), 0.5)
    _check_valid(results[0][1], w, w.float().abs() * norm.float()[None, :], 0.5)


def test_inputs_untouched_unless_inplace():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g)  # float32: .float() would alias it
    before = w.clone()
    score = torch.rand(40, 24, generator=g)
    score_before = score.clone()
    score[0, 0] = float("nan")
    score_before[0, 0] = float("nan")
    norm = torch.rand(24, generator=g)
    magnitude_prune(w, 0.5)
    prune_rows(w, score, 0.5)
    copy = wanda_prune(w, norm, 0.5)
    assert torch.equal(w, before)
    assert torch.equal(score.nan_to_num(), score_before.nan_to_num())  # NaN not replaced in place
    out = wanda_prune(w, norm, 0.5, inplace=True)
    assert out.data_ptr() == w.data_ptr() and torch.equal(w, copy)


def test_nan_weight_is_kept_and_counts_exact():
    w = torch.tensor([[float("nan"), 1.0, 2.0, 3.0], [4.0, 3.0, 2.0, 1.0]])
    out = magnitude_prune(w, 0.5)
    assert torch.isnan(out[0, 0]) and (out == 0).sum(1).tolist() == [2, 2]


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"2-D \[out, in\] weight, got shape \(3,\)"):
        wanda_prune(torch.ones(3), torch.ones(3), 0.5)
    with pytest.raises(ValueError, match=r"input_norm has shape \(5,\), expected \(4,\)"):
        wanda_prune(torch.ones(2, 4), torch.ones(5), 0.5)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        magnitude_prune(torch.ones(2, 4), 1.0)
