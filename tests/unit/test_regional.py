"""Regional K/V deltas: each region's queries see their own keys/values, the rest the base ones."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from concept_attention.attention.chain import AttentionContext
from concept_attention.attention.regional import (CONTEXT_KEY, VALUE_KEY, RegionalKV, region_weights,
                                                  stash_context)

HEADS, H, W = 2, 4, 6


def attend(q, k, v):
    b, n, c = q.shape
    split = lambda t: t.view(b, -1, HEADS, c // HEADS).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, c)


def setup(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, H * W, 8, generator=g)
    context = torch.randn(batch, 5, 3, generator=g)
    w_k, w_v = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    options = {"n_heads": HEADS, "activations_shape": [batch, 8, H, W]}
    stash_context(q, context, None, options)
    deltas = [(torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)) for _ in range(2)]
    return q, context @ w_k.T, context @ w_v.T, context, w_k, w_v, options, deltas


def run(hook, q, k, v, options):
    return hook.apply(q, k, v, AttentionContext(options, q.shape[0]), attend)


def test_stash_keeps_features_and_changes_nothing():
    options = {}
    n, c = torch.randn(1, 4, 8), torch.randn(1, 5, 3)
    assert stash_context(n, c, None, options) == (n, c, None)
    assert options[CONTEXT_KEY] is c and options[VALUE_KEY] is c


def test_empty_masks_give_the_base_attention_and_full_masks_the_patched_weights():
    q, k, v, context, w_k, w_v, options, deltas = setup()
    empty = RegionalKV(deltas=tuple(deltas), masks=torch.zeros(2, 16, 16))
    torch.testing.assert_close(run(empty, q, k, v, options), attend(q, k, v))
    full = RegionalKV(deltas=tuple(deltas[:1]), masks=torch.ones(1, 16, 16))
    d_k, d_v = deltas[0]
    expected = attend(q, context @ (w_k + d_k).T, context @ (w_v + d_v).T)
    torch.testing.assert_close(run(full, q, k, v, options), expected)


def test_each_region_changes_only_its_own_pixels():
    q, k, v, context, w_k, w_v, options, deltas = setup(seed=1)
    masks = torch.zeros(2, H, W)
    masks[0, :, :3] = 1  # left half: concept 0
    masks[1, :2, 3:] = 1  # top right: concept 1; bottom right stays base
    out = run(RegionalKV(deltas=tuple(deltas), masks=masks), q, k, v, options).view(-1, H, W, 8)
    base = attend(q, k, v).view(-1, H, W, 8)
    first = attend(q, context @ (w_k + deltas[0][0]).T, context @ (w_v + deltas[0][1]).T).view(-1, H, W, 8)
    second = attend(q, context @ (w_k + deltas[1][0]).T, context @ (w_v + deltas[1][1]).T).view(-1, H, W, 8)
    torch.testing.assert_close(out[:, :, :3], first[:, :, :3])
    torch.testing.assert_close(out[:, :2, 3:], second[:, :2, 3:])
    torch.testing.assert_close(out[:, 2:, 3:], base[:, 2:, 3:])
    assert not torch.allclose(out[:, :, :3], base[:, :, :3])


def test_overlapping_masks_are_normalised_and_resized_by_area():
    masks = torch.ones(2, 8, 8)
    weights, background = region_weights(masks, (4, 4))
    torch.testing.assert_close(weights, torch.full((2, 16), 0.5))
    torch.testing.assert_close(background, torch.zeros(16))
    half = torch.zeros(1, 8, 8)
    half[:, :, :4] = 1
    weights, background = region_weights(half, (2, 2))
    torch.testing.assert_close(weights[0], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(background, torch.tensor([0.0, 1.0, 0.0, 1.0]))


def test_per_image_masks_repeat_over_cond_and_uncond_rows():
    q, k, v, context, w_k, w_v, options, deltas = setup(seed=2, batch=4)  # 2 images x (cond, uncond)
    masks = torch.zeros(2, 1, H, W)
    masks[1] = 1  # only image 1 gets the concept
    out = run(RegionalKV(deltas=tuple(deltas[:1]), masks=masks), q, k, v, options)
    base = attend(q, k, v)
    patched = attend(q, context @ (w_k + deltas[0][0]).T, context @ (w_v + deltas[0][1]).T)
    torch.testing.assert_close(out[[0, 2]], base[[0, 2]])
    torch.testing.assert_close(out[[1, 3]], patched[[1, 3]])


def test_regions_from_maps_follow_the_strongest_calibrated_map() -> None:
    from concept_attention.attention.regional import regions_from_maps

    maps = torch.zeros(2, 8, 8)
    maps[0, 1:4, 1:4] = 1.0  # region 0 top left
    maps[1, 5:8, 4:8] = 0.2  # region 1 bottom right, weaker in absolute terms
    maps[1, 0, 0] = 0.05
    masks = regions_from_maps(maps, threshold=0.4)
    assert masks.shape == (2, 8, 8)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert bool((masks.sum(0) <= 1).all())  # disjoint
    assert masks[0, 2, 2] == 1 and masks[1, 2, 2] == 0
    assert masks[1, 6, 6] == 1 and masks[0, 6, 6] == 0  # min-max makes the weak map count
    assert masks[:, 0, 7].sum() == 0  # far from both: background
    batched = regions_from_maps(torch.stack([maps, maps.flip(0)]), threshold=0.4)
    assert torch.equal(batched[0], masks) and torch.equal(batched[1], masks.flip(0))
    with pytest.raises(ValueError, match="expected class maps"):
        regions_from_maps(torch.zeros(8, 8))


@pytest.mark.parametrize("soft", [False, True])
def test_query_subsets_give_the_same_output_and_attend_each_hard_pixel_once(soft):
    q, k, v, context, w_k, w_v, options, deltas = setup(seed=3)
    masks = torch.zeros(2, H, W)
    masks[0, :, :3] = 1
    masks[1, :2, 3:] = 1
    if soft:
        masks[0, :, 2] = 0.5
    attended = []

    def per_query(q_, k_, v_):
        attended.append(q_.shape[1])
        return attend(q_, k_, v_)

    per_query.query_subsets = True
    hook = RegionalKV(deltas=tuple(deltas), masks=masks)
    ctx = AttentionContext(options, q.shape[0])
    subsets = hook.apply(q, k, v, ctx, per_query)
    torch.testing.assert_close(subsets, run(hook, q, k, v, options), rtol=1e-5, atol=1e-6)
    if soft:
        assert sum(attended) > H * W  # half-weight pixels are attended by region and background
    else:
        assert sum(attended) == H * W  # every query exactly once, instead of three times



def _text_case(seed):
    q, k, v, context, w_k, w_v, options, deltas = setup(seed=seed)
    options["cond_or_uncond"] = [1, 0]  # row 0 negative prompt, row 1 positive prompt
    masks = torch.zeros(2, H, W)
    masks[0, :, :3] = 1
    masks[1, :2, 3:] = 1
    attention = torch.nn.Module()
    attention.to_k, attention.to_v = torch.nn.Linear(3, 8, bias=False), torch.nn.Linear(3, 8, bias=False)
    with torch.no_grad():
        attention.to_k.weight.copy_(w_k)
        attention.to_v.weight.copy_(w_v)
    texts = (torch.randn(1, 7, 3, generator=torch.Generator().manual_seed(seed + 100)), None)
    hook = RegionalKV(deltas=tuple(deltas), masks=masks, texts=texts, attention=attention)
    return hook, q, k, v, context, w_k, w_v, options, deltas


def test_a_region_text_replaces_the_prompt_for_that_regions_positive_rows_only():
    hook, q, k, v, context, w_k, w_v, options, deltas = _text_case(seed=4)
    with torch.no_grad():
        out = run(hook, q, k, v, options).view(2, H, W, 8)
    text = hook.texts[0]
    (dk0, dv0), (dk1, dv1) = deltas
    own_text = attend(q[1:], text @ (w_k + dk0).T, text @ (w_v + dv0).T).view(H, W, 8)
    prompt_first = attend(q[:1], context[:1] @ (w_k + dk0).T, context[:1] @ (w_v + dv0).T).view(H, W, 8)
    prompt_second = attend(q, context @ (w_k + dk1).T, context @ (w_v + dv1).T).view(2, H, W, 8)
    base = attend(q, k, v).view(2, H, W, 8)
    torch.testing.assert_close(out[1, :, :3], own_text[:, :3])  # positive row reads the region text
    torch.testing.assert_close(out[0, :, :3], prompt_first[:, :3])  # negative row reads its prompt
    torch.testing.assert_close(out[:, :2, 3:], prompt_second[:, :2, 3:])  # no text: the prompt
    torch.testing.assert_close(out[:, 2:, 3:], base[:, 2:, 3:])  # background: base weights, prompt


def test_region_texts_give_the_same_output_on_every_attention_path():
    """Stock attention (rows and queries split freely) and another pack's (whole batch) agree."""
    hook, q, k, v, context, w_k, w_v, options, deltas = _text_case(seed=5)
    outputs, batches = {}, {}
    for subsets in (True, False):
        batches[subsets] = []

        def attention(q_, k_, v_, seen=batches[subsets]):
            seen.append(q_.shape[0])
            return attend(q_, k_, v_)

        attention.query_subsets = subsets
        with torch.no_grad():
            outputs[subsets] = hook.apply(q, k, v, AttentionContext(options, q.shape[0]), attention)
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-5, atol=1e-6)
    assert min(batches[True]) == 1  # positive and negative rows attended apart
    assert set(batches[False]) == {2}  # another pack's attention always gets the whole batch


def test_region_texts_need_the_layers_projections():
    hook, q, k, v, *_, options, _ = _text_case(seed=6)
    from dataclasses import replace

    with pytest.raises(RuntimeError, match="attention module"):
        run(replace(hook, attention=None), q, k, v, options)
