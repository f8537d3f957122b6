"""The attention-map sampler node in library mode."""
from __future__ import annotations

import pytest
import torch

from concept_attention.sampling.ksampler import run_ksampler
from concept_attention.nodes.preview import AttentionMapSampler


def run_node(tiny, words: str, vae=None, **overrides):
    latent = {"samples": torch.zeros(2, 4, 16, 16)}
    args = dict(model=tiny.bundle.model, clip=tiny.bundle.clip,
                positive_text="a photo of a red cat and a dog", words=words, seed=3, steps=3,
                cfg=5.0, sampler_name="euler", scheduler="normal", negative=tiny.encode(""),
                latent_image=latent, denoise=1.0, layers="all", step_start=0.0, step_end=1.0,
                vae=vae)
    args.update(overrides)
    return AttentionMapSampler.execute(**args).result, latent


def test_latent_is_exactly_the_stock_ksampler_result(tiny):
    (latent_out, heatmaps, masks), latent_in = run_node(tiny, "cat, red cat, dog")
    stock = run_ksampler(tiny.bundle.model, 3, 3, 5.0, "euler", "normal",
                         tiny.encode("a photo of a red cat and a dog"), tiny.encode(""), latent_in,
                         1.0)
    assert torch.equal(latent_out["samples"], stock["samples"])
    assert heatmaps.shape == (2 * 3, 128, 128, 3)
    assert masks.shape == (2 * 3, 128, 128)
    assert float(masks.min()) >= 0.0 and float(masks.max()) <= 1.0
    assert float(heatmaps.min()) >= 0.0 and float(heatmaps.max()) <= 1.0
    # different words attend differently
    assert not torch.allclose(masks[0], masks[2])


def test_overlay_with_vae_and_missing_word(sd15):
    (_, heatmaps, _), _ = run_node(sd15, "dog", vae=sd15.bundle.vae, layers="latent/2")
    assert heatmaps.shape == (2, 128, 128, 3)
    with pytest.raises(ValueError, match="'horse' does not occur in the prompt"):
        run_node(sd15, "horse")


def test_trigger_words_are_located_like_plain_words(sd15):
    """Learned triggers (spliced vectors) are found by position; plain words by their token ids."""
    import torch

    from concept_attention.concepts.triggers import locate_words_and_triggers, with_triggers

    width = sd15.bundle.clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[1]
    clip = with_triggers(sd15.bundle.clip, {"V1": {"clip_l": torch.randn(1, width)},
                                            "V2": {"clip_l": torch.randn(2, width)}})
    prompt = "a V1 cat and a V2 big dog"
    found = locate_words_and_triggers(clip, prompt, ["V1", "cat", "V2", "big dog"])
    # <start> a V1 cat and a V2(2 rows) big dog
    assert found == [[2], [3], [6, 7], [8, 9]]
    with pytest.raises(ValueError, match="V2"):
        locate_words_and_triggers(clip, "a V1 cat", ["V2"])
