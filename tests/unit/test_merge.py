"""Closed-form K/V merge: constraints met, regulariser outputs kept better than naive averaging."""
from __future__ import annotations

import pytest
import torch

from concept_attention.concepts.merge import merge_projection
from support.merge_errors import constraint_error, regulariser_error


def problem(seed: int = 0, width: int = 24, out: int = 16, concepts: int = 3, tokens: int = 2):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out, width, generator=g)
    regulariser = torch.randn(200, width, generator=g)
    trained, targets = [], []
    for _ in range(concepts):
        weight = base + 0.3 * torch.randn(out, width, generator=g)
        inputs = torch.randn(tokens, width, generator=g)
        trained.append(weight)
        targets.append((inputs, inputs @ weight.T))
    return base, regulariser, trained, targets


def test_merged_weight_meets_every_constraint():
    base, regulariser, _, targets = problem()
    merged = merge_projection(base, targets, regulariser)
    assert merged.shape == base.shape and merged.dtype == base.dtype
    assert constraint_error(merged, targets) < 1e-4


def test_merge_beats_naive_averaging_on_both_errors():
    base, regulariser, trained, targets = problem(seed=1)
    merged = merge_projection(base, targets, regulariser)
    average = torch.stack(trained).mean(0)
    assert regulariser_error(merged, base, regulariser) < regulariser_error(average, base, regulariser)
    assert constraint_error(merged, targets) < 0.01 * constraint_error(average, targets)


def test_known_closed_form_when_regulariser_is_identity():
    # R = I: minimise ||W - W0||_F with W c = v  ->  W = W0 + (v - W0 c) c^T / |c|^2
    base = torch.zeros(2, 3, dtype=torch.float64)
    c = torch.tensor([[1.0, 2.0, 2.0]], dtype=torch.float64)
    v = torch.tensor([[9.0, -9.0]], dtype=torch.float64)
    merged = merge_projection(base, [(c, v)], torch.eye(3, dtype=torch.float64), ridge=0.0)
    expected = (v.T @ c) / 9.0
    torch.testing.assert_close(merged, expected)


def test_no_targets_returns_the_base_and_bad_shapes_are_refused():
    base, regulariser, _, targets = problem()
    assert torch.equal(merge_projection(base, [], regulariser), base)
    with pytest.raises(ValueError, match="do not fit"):
        merge_projection(base, [(torch.randn(2, 5), torch.randn(2, 16))], regulariser)
