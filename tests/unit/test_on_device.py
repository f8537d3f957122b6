"""Device caches of the attention code: shared constants that sampling and training both use."""
from __future__ import annotations

import torch

from concept_attention.attention.nested import NestedKV, nested_update
from concept_attention.attention.on_device import index_tensor, memoized


def test_an_index_first_made_while_sampling_can_index_a_training_step() -> None:
    """The cache outlives inference mode: a row index made there must still be saved for backward."""
    values = (0, 2, 5, 7)
    with torch.inference_mode():
        first = index_tensor(values)
    assert not first.is_inference()
    q = torch.randn(8, 3, requires_grad=True)
    q.index_select(0, index_tensor(values)).sum().backward()
    assert q.grad is not None and q.grad[list(values)].eq(1).all() and q.grad.sum() == 4 * 3


def test_a_memo_copy_made_while_sampling_takes_part_in_training() -> None:
    memo: dict = {}
    source = torch.arange(6.0)
    with torch.inference_mode():
        copy = memoized(memo, "key", lambda: source * 2)
    assert not copy.is_inference()
    assert memoized(memo, "key", lambda: source * 3) is copy  # made once
    weight = torch.ones(6, requires_grad=True)
    (weight * copy).sum().backward()
    assert torch.equal(weight.grad, source * 2)


def test_nested_update_trains_after_the_same_rows_were_sampled() -> None:
    """The regression: nested attention sampled once, then trained on the same rows."""
    torch.manual_seed(0)
    batch, heads, n_query, n_text, dim, n_subject = 2, 2, 4, 5, 8, 3
    k, v = torch.randn(batch, n_text, dim), torch.randn(batch, n_text, dim)
    subject = NestedKV(torch.tensor([1, 1]), torch.randn(1, n_subject, dim), torch.randn(1, n_subject, dim),
                       host_index=(1, 1))
    out = torch.randn(batch, n_query, dim)
    with torch.inference_mode():
        nested_update(out, torch.randn(batch, n_query, dim), k, v, heads, [subject])
    q = torch.randn(batch, n_query, dim, requires_grad=True)
    nested_update(out, q, k, v, heads, [subject]).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
