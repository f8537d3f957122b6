"""Contract: stock ComfyUI nodes and patch kinds that touch attention, before or after ours
(docs/reliability.md, "Coexistence").

Found in ComfyUI's own nodes: Hypernetwork Loader (attn1 and attn2 patches), Self-Attention
Guidance (attn1 replace, extra UNet pass), Perturbed-Attention Guidance (attn1 replace in its own
pass), token merging and HyperTile (attn1 patch and output patch), the attention-multiply nodes
(weight patches), EasyCache/LazyCache (wrappers), and model_function_wrapper users.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from concept_attention.attention.patching import install_regional
from support.attn2_pack import apply_pack
from support.coexistence_stacks import ARCHS, CALLS, FEATURES, FOREIGN, SIZE, Stacks, differ, sample
from support.synthetic_concepts import synthetic_set

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stacks(request: pytest.FixtureRequest) -> Stacks:
    return Stacks(request)


class ContextShift:
    """Like the stock Hypernetwork Loader's patch (set_model_attn1_patch/attn2_patch): a small
    residual map on the keys' and values' inputs, for layers of its width. The stock loader reads
    pickled files only, so the patch is built here."""

    def __init__(self, width: int, seed: int = 7) -> None:
        g = torch.Generator().manual_seed(seed)
        self.k = torch.randn(width, width, generator=g) / width ** 0.5
        self.v = torch.randn(width, width, generator=g) / width ** 0.5

    def __call__(self, n, context, value, extra_options):
        if context.shape[-1] != self.k.shape[0]:
            return n, context, value
        return n, context + torch.tanh(context @ self.k), value + torch.tanh(value @ self.v)


def with_context_shift(model: Any, width: int) -> Any:
    patched = model.clone()
    shift = ContextShift(width)
    patched.set_model_attn1_patch(shift)
    patched.set_model_attn2_patch(shift)
    return patched


@pytest.mark.parametrize("arch", ARCHS)
def test_hypernetwork_like_attn2_patch_before_or_after_regional(request, arch):
    """Regional deltas act on the text features as to_k/to_v receive them, after the other patch."""
    tiny = request.getfixturevalue(arch)
    width = tiny.encode("a")[0][0].shape[-1]
    concepts = synthetic_set(tiny.bundle, ["V1"], 1, scale=0.3)
    full = torch.ones(1, SIZE, SIZE)

    def regional(model):
        patched = model.clone()
        install_regional(patched, [concepts.kv_deltas], full)
        return patched

    after = sample(tiny, with_context_shift(regional(tiny.bundle.model), width))
    before = sample(tiny, regional(with_context_shift(tiny.bundle.model, width)))
    assert torch.equal(after, before)
    merged = tiny.bundle.model.clone()
    merged.add_patches({k: ("diff", (d,)) for k, d in concepts.kv_deltas.items()}, 1.0)
    reference = sample(tiny, with_context_shift(merged, width))
    assert differ(reference, sample(tiny, merged))  # the shift matters far beyond the tolerance
    # c (W0 + d)^T vs c W0^T + c d^T: equal up to float rounding, carried through the steps
    torch.testing.assert_close(after, reference, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_hypernetwork_like_attn2_patch_before_or_after_nested(stacks, request, arch):
    tiny = request.getfixturevalue(arch)
    width = tiny.encode("a")[0][0].shape[-1]
    feature = stacks.feature(arch, "nested")
    after = sample(tiny, with_context_shift(feature.install(tiny.bundle.model), width), feature.positive)
    before = sample(tiny, feature.install(with_context_shift(tiny.bundle.model, width)), feature.positive)
    assert torch.equal(after, before)
    assert differ(after, sample(tiny, with_context_shift(tiny.bundle.model, width)))


def _sag(model: Any) -> Any:
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    return SelfAttentionGuidance.execute(model, 0.5, 2.0).result[0]


def _pag(model: Any) -> Any:
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    return PerturbedAttentionGuidance.execute(model, 3.0).result[0]


def _unet_function_wrapper(model: Any) -> Any:
    patched = model.clone()

    def wrapper(apply_model, args):  # e.g. a pack that rescales the model's input
        return apply_model(args["input"] * 1.05, args["timestep"], **args["c"])

    patched.set_model_unet_function_wrapper(wrapper)
    return patched


def _tome(model: Any) -> Any:
    from comfy_extras.nodes_tomesd import TomePatchModel

    return TomePatchModel.execute(model, 0.5).result[0]


STOCK = {"sag": _sag, "pag": _pag, "tome": _tome, "model_function_wrapper": _unet_function_wrapper}


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("stock", list(STOCK))
def test_stock_attention_patches_in_either_order(stacks, request, stock, feature):
    """Self-attention guidance (attn1 replace + an extra UNet pass), perturbed-attention guidance
    (attn1 replace in its own pass), token merging (attn1 patch + attn1 output patch) and a
    model_function_wrapper, before or after ours (SD1.5, with the other pack installed after ours,
    so our wrapper must find it)."""
    tiny = request.getfixturevalue("sd15")
    patch, ours = STOCK[stock], stacks.feature("sd15", feature)
    stock_first = apply_pack(ours.install(patch(tiny.bundle.model)), FOREIGN["A"], per_depth=False)
    CALLS.clear()
    first = sample(tiny, stock_first, ours.positive)
    calls_first = Counter(CALLS)
    stock_last = patch(apply_pack(ours.install(tiny.bundle.model), FOREIGN["A"], per_depth=False))
    CALLS.clear()
    last = sample(tiny, stock_last, ours.positive)
    assert torch.equal(first, last) and CALLS == calls_first and CALLS["A"] > 0
    without = sample(tiny, apply_pack(ours.install(tiny.bundle.model), FOREIGN["A"], per_depth=False),
                     ours.positive)
    assert differ(first, without)
