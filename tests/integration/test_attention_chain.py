"""The attention chain inside real ComfyUI sampling on the tiny SD1.5 and SDXL models."""
from __future__ import annotations

import pytest
import torch

from concept_attention.attention.chain import AttentionChain, AttentionHook
from concept_attention.attention.layers import select_layers
from concept_attention.attention.patching import install_hook, model_layers, remove_hooks
from concept_attention.attention.recorder import AttentionRecorder, MapStore
from support.chains import chain_at
from concept_attention.attention.tokens import locate_words

SD15_ATTN2_KEYS = ([("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)]
                   + [("output", i, 0) for i in range(3, 12)])


def test_sd15_layers_mirror_sd15(sd15):
    layers = model_layers(sd15.bundle.model)
    assert [layer.key for layer in layers] == SD15_ATTN2_KEYS
    quarter = select_layers(layers, "latent/4")
    assert [layer.key for layer in quarter] == [("input", 7, 0), ("input", 8, 0), ("output", 3, 0),
                                                ("output", 4, 0), ("output", 5, 0)]
    assert [layer.key for layer in select_layers(layers, "latent/8")] == [("middle", 0, 0)]
    assert quarter[0].weight_keys[0] == "diffusion_model.input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight"
    assert quarter[0].weight_keys[0] in sd15.bundle.model.model.state_dict()


def test_sdxl_layers_have_depth_slots(sdxl):
    layers = model_layers(sdxl.bundle.model)
    keys = [layer.key for layer in layers]
    assert ("input", 7, 1) in keys and ("middle", 0, 1) in keys and ("output", 0, 1) in keys
    assert not any(key[:2] in {("input", 1), ("input", 2)} for key in keys)  # no attention at level 0
    assert {layer.downscale for layer in layers} == {2, 4}
    with pytest.raises(ValueError, match="resolutions it has: latent/2, latent/4"):
        select_layers(layers, "latent/8")


def test_chain_without_active_hooks_is_bit_identical(tiny):
    reference = tiny.sample()
    model = tiny.bundle.model.clone()
    install_hook(model, AttentionHook(sigma_max=-1.0), "all")  # gated out at every sigma
    assert chain_at(model, model_layers(model)[0].key) is not None
    assert torch.equal(tiny.sample(model), reference)
    model2 = tiny.bundle.model.clone()
    install_hook(model2, AttentionHook(), "all")  # active pass-through hook
    assert torch.equal(tiny.sample(model2), reference)


def test_install_on_clone_leaves_original_untouched(sd15):
    original = sd15.bundle.model
    before = original.model_options["transformer_options"].get("patches_replace")
    clone = original.clone()
    install_hook(clone, AttentionHook(), "latent/4")
    assert original.model_options["transformer_options"].get("patches_replace") == before
    assert "attn2" not in original.model_options["transformer_options"].get("patches_replace", {})
    again = clone.clone()
    install_hook(again, AttentionHook(), "latent/4")
    assert len(chain_at(clone, ("input", 7, 0)).hooks) == 1
    assert len(chain_at(again, ("input", 7, 0)).hooks) == 2
    remove_hooks(again, chain_at(again, ("input", 7, 0)).hooks)
    assert chain_at(again, ("input", 7, 0)) is None


def test_recorder_collects_maps_of_chosen_words(tiny):
    model = tiny.bundle.model.clone()
    prompt = "a photo of a cat and a dog"
    positions = locate_words(tiny.bundle.clip, prompt, ["cat", "dog"])
    store = MapStore()
    store.set_tokens([p[0] for p in positions])
    layers = install_hook(model, AttentionRecorder(store=store), "latent/4")
    steps = 3
    tiny.sample(model, prompt=prompt, steps=steps, size=32)
    assert len(store.steps) == steps
    for step in store.steps:
        assert set(step) == {layer.key for layer in layers}
        for maps in step.values():
            assert maps.shape == (1, 2, 8, 8)  # cond row only, 2 tokens, latent 32 / 4
            assert not maps.requires_grad
            assert bool((maps >= 0).all()) and bool((maps <= 1).all())
    sigmas = store.sigmas
    assert sigmas == sorted(sigmas, reverse=True) and len(set(sigmas)) == steps
    assert store.aggregate().shape == (1, 2, 8, 8)


def test_recorded_maps_over_all_tokens_sum_to_one(sd15):
    model = sd15.bundle.model.clone()
    store = MapStore()
    store.set_tokens(range(77))
    install_hook(model, AttentionRecorder(store=store, rows="all"), "latent/2")
    sd15.sample(model, steps=1, size=16)
    (maps,) = list(store.steps[0].values())[:1]
    assert maps.shape == (2, 77, 8, 8)  # uncond and cond rows
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 8, 8), rtol=0, atol=1e-5)


def make_foreign_replace(calls: list):
    """Stands in for another pack's attn2 replace: scales the output and counts its calls.

    A plain function, like most packs use: ModelPatcher.clone() deep-copies model_options, and
    functions survive that as themselves.
    """
    def foreign(q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        calls.append(extra_options["block"])
        return 0.5 * optimized_attention(q, k, v, extra_options["n_heads"])

    return foreign


def test_foreign_attn2_replace_keeps_running(sd15):
    foreign_only = sd15.bundle.model.clone()
    calls: list = []
    foreign_only.set_model_attn2_replace(make_foreign_replace(calls), "output", 4)  # block-level key
    expected = sd15.sample(foreign_only)
    calls_alone = len(calls)
    assert calls_alone > 0

    model = foreign_only.clone()
    store = MapStore()
    store.set_tokens([1])
    install_hook(model, AttentionRecorder(store=store), "all")
    chain = chain_at(model, ("output", 4, 0))
    # A block-level replace is looked up when the layer runs (attention/coexistence.py), not
    # captured as the chain's inner: that it runs, under the chain, is what the lines below check.
    assert isinstance(chain, AttentionChain) and chain.inner is None
    result = sd15.sample(model)
    assert len(calls) == 2 * calls_alone
    assert torch.equal(result, expected)
    assert ("output", 4, 0) in store.steps[0]
