"""Unit tests for attention/maps.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from concept_attention.attention import maps


def test_split_heads_layout_and_roundtrip() -> None:
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8)
    split = maps.split_heads(x, heads=2)
    assert split.shape == (2, 2, 3, 4)
    # head h holds channels [h*d, (h+1)*d)
    assert torch.equal(split[1, 1, 2], x[1, 2, 4:8])
    assert torch.equal(split[0, 0, 1], x[0, 1, 0:4])
    assert torch.equal(maps.merge_heads(split), x)


def test_split_heads_rejects_indivisible_channels() -> None:
    with pytest.raises(ValueError):
        maps.split_heads(torch.zeros(1, 2, 7), heads=2)


def full_probs(q: torch.Tensor, k: torch.Tensor, heads: int, scale: float | None = None) -> torch.Tensor:
    """The probabilities of every key: ``token_probs`` with all key positions."""
    return maps.token_probs(q, k, heads, torch.arange(k.shape[1]), scale=scale)


def test_token_probs_single_key_is_one() -> None:
    q = torch.randn(2, 5, 6)
    k = torch.randn(2, 1, 6)
    probs = full_probs(q, k, heads=3)
    assert probs.shape == (2, 3, 5, 1)
    assert torch.equal(probs, torch.ones_like(probs))


def test_token_probs_hand_computed() -> None:
    # one head, d=2: logits = [1*1/sqrt(2), 0] -> softmax = [sigmoid(1/sqrt2), 1 - sigmoid(1/sqrt2)]
    q = torch.tensor([[[1.0, 0.0]]])
    k = torch.tensor([[[1.0, 0.0], [0.0, 5.0]]])
    probs = full_probs(q, k, heads=1)
    p0 = 1.0 / (1.0 + math.exp(-1.0 / math.sqrt(2.0)))
    assert probs.shape == (1, 1, 1, 2)
    assert probs[0, 0, 0, 0].item() == pytest.approx(p0, abs=1e-6)
    assert probs[0, 0, 0, 1].item() == pytest.approx(1.0 - p0, abs=1e-6)
    # an explicit scale replaces d^-0.5
    probs_s = full_probs(q, k, heads=1, scale=2.0)
    assert probs_s[0, 0, 0, 0].item() == pytest.approx(1.0 / (1.0 + math.exp(-2.0)), abs=1e-6)


def test_token_probs_matches_per_head_softmax() -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 7, 12, dtype=torch.float64)
    k = torch.randn(2, 5, 12, dtype=torch.float64)
    probs = full_probs(q, k, heads=3)
    for h in range(3):
        qh, kh = q[..., 4 * h : 4 * h + 4], k[..., 4 * h : 4 * h + 4]
        expected = torch.softmax(qh @ kh.transpose(1, 2) / 2.0, dim=-1)
        torch.testing.assert_close(probs[:, h], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 7, dtype=torch.float64))


def test_token_probs_half_inputs_return_float32() -> None:
    torch.manual_seed(1)
    q = torch.randn(1, 4, 8)
    k = torch.randn(1, 3, 8)
    probs = full_probs(q.half(), k.half(), heads=2)
    assert probs.dtype == torch.float32
    expected = full_probs(q.half().float(), k.half().float(), heads=2)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)
    assert full_probs(q.double(), k.double(), heads=2).dtype == torch.float64


def test_token_probs_columns_of_full_softmax() -> None:
    torch.manual_seed(2)
    q = torch.randn(2, 6, 8)
    k = torch.randn(2, 9, 8)
    full = full_probs(q, k, heads=2)
    index = torch.tensor([4, 1])
    cols = maps.token_probs(q, k, heads=2, token_index=index)
    assert cols.shape == (2, 2, 6, 2)
    torch.testing.assert_close(cols, full[..., [4, 1]], rtol=0, atol=1e-6)
    # normalised over all 9 keys, not over the 2 chosen ones
    assert (cols.sum(-1) < 0.999).all()


def test_token_probs_per_row_index() -> None:
    torch.manual_seed(3)
    q = torch.randn(2, 4, 6)
    k = torch.randn(2, 5, 6)
    full = full_probs(q, k, heads=3)
    index = torch.tensor([[0, 2], [3, 4]])
    cols = maps.token_probs(q, k, heads=3, token_index=index)
    torch.testing.assert_close(cols[0], full[0][..., [0, 2]], rtol=0, atol=1e-6)
    torch.testing.assert_close(cols[1], full[1][..., [3, 4]], rtol=0, atol=1e-6)
    with pytest.raises(IndexError):
        maps.token_probs(q, k, heads=3, token_index=torch.tensor([5]))


def test_token_probs_gradcheck() -> None:
    torch.manual_seed(4)
    q = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([1, 3])
    assert torch.autograd.gradcheck(lambda a, b: maps.token_probs(a, b, 2, index), (q, k))


def test_maps_to_grid_is_row_major() -> None:
    probs = torch.arange(6, dtype=torch.float32).reshape(1, 1, 6, 1)
    probs = torch.cat([probs, -probs], dim=-1)  # two tokens
    grid = maps.maps_to_grid(probs, height=2, width=3)
    assert grid.shape == (1, 1, 2, 2, 3)
    assert torch.equal(grid[0, 0, 0], torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]))
    assert torch.equal(grid[0, 0, 1], -grid[0, 0, 0])
    with pytest.raises(ValueError):
        maps.maps_to_grid(probs, height=2, width=2)


def test_aggregate_maps_mean_over_heads_then_layers() -> None:
    layer_a = torch.stack([torch.full((1, 2, 2, 2), 1.0), torch.full((1, 2, 2, 2), 3.0)], dim=1)
    layer_b = torch.full((1, 1, 2, 2, 2), 4.0)  # one head only
    out = maps.aggregate_maps([layer_a, layer_b])
    assert out.shape == (1, 2, 2, 2)
    # mean of the layer means (2 and 4), not of all three heads (8/3)
    assert torch.allclose(out, torch.full_like(out, 3.0))


def test_aggregate_maps_requires_size_for_mixed_resolutions() -> None:
    small = torch.rand(1, 2, 3, 2, 2)
    big = torch.rand(1, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="size"):
        maps.aggregate_maps([small, big])


def test_aggregate_maps_resizes_bilinear() -> None:
    torch.manual_seed(5)
    small = torch.rand(1, 2, 3, 2, 2)
    big = torch.rand(1, 2, 3, 4, 4)
    out = maps.aggregate_maps([small, big], size=(4, 4))
    up = F.interpolate(small.mean(1), size=(4, 4), mode="bilinear", align_corners=False)
    expected = (up + big.mean(1)) / 2
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # hand check of bilinear/align_corners=False: the corner output pixel equals the corner input
    single = maps.aggregate_maps([small], size=(4, 4))
    torch.testing.assert_close(single[..., 0, 0], small.mean(1)[..., 0, 0], rtol=0, atol=1e-6)
    # [[0,1],[2,3]] -> pixel (0,1) at source coordinate (-0.25, 0.25) clamps to (0, 0.25): 0.25
    ramp = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 1, 1, 2, 2)
    assert maps.aggregate_maps([ramp], size=(4, 4))[0, 0, 0, 1].item() == pytest.approx(0.25)


def test_minmax_normalize_hand_case() -> None:
    x = torch.tensor([[[0.0, 2.0], [4.0, 8.0]], [[1.0, 1.0], [1.0, 3.0]]])
    out = maps.minmax_normalize(x)
    expected = torch.tensor([[[0.0, 0.25], [0.5, 1.0]], [[0.0, 0.0], [0.0, 1.0]]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    constant = maps.minmax_normalize(torch.full((1, 3, 3), 5.0))
    assert torch.equal(constant, torch.zeros(1, 3, 3))


def test_minmax_normalize_gradcheck() -> None:
    torch.manual_seed(6)
    x = torch.rand(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(maps.minmax_normalize, (x,))


def test_word_maps_average_each_words_tokens() -> None:
    from concept_attention.attention.recorder import MapStore

    x = torch.stack([torch.full((2, 2), v) for v in (1.0, 2.0, 6.0)]).unsqueeze(0)  # [1,3,2,2]
    store = MapStore()
    store.set_words([[4], [7, 9], []])  # three words: one token, two tokens, none
    assert store.token_index.tolist() == [4, 7, 9]
    store.add(1.0, ("input", 1, 0), x)
    out = store.word_maps()
    assert out.shape == (1, 3, 2, 2)
    assert out[0, :, 0, 0].tolist() == [1.0, 4.0, 0.0]  # a word of no tokens: a zero map
    store.set_words([[[1], [2, 3]], [[5], [6, 8]]])  # per row, same word sizes
    assert store.token_index.tolist() == [[1, 2, 3], [5, 6, 8]]
    with pytest.raises(ValueError, match="same token counts"):
        store.set_words([[[1], [2, 3]], [[5, 6], [8]]])
