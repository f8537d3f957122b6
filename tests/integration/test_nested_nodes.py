"""Apply Nested Attention node in library mode."""
from __future__ import annotations

import pytest
import torch

from concept_attention.nodes.nested import ApplyNestedAttention, sigma_window
from concept_attention.sampling.nested_subjects import SubjectSpec

PROMPT = "a photo of a cat and a dog"


def sample(sd15, model, positive):
    import comfy.sample

    latent = torch.zeros(1, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 7)
    return comfy.sample.sample(model, noise, 3, 5.0, "euler", "normal", positive, sd15.encode(""), latent,
                               seed=7, disable_pbar=True)


def bank(width, seed, scale=3.0):
    return scale * torch.randn(8, width, generator=torch.Generator().manual_seed(seed))


def test_node_outputs_prompt_conditioning_and_nested_model(sd15):
    width = sd15.encode(PROMPT)[0][0].shape[-1]
    out = ApplyNestedAttention.execute(sd15.bundle.model, sd15.bundle.clip, PROMPT,
                                       SubjectSpec("cat", bank=bank(width, 0)), SubjectSpec("dog", bank=bank(width, 1)))
    model, positive = out.result
    assert torch.equal(positive[0][0], sd15.encode(PROMPT)[0][0])
    assert model is not sd15.bundle.model
    assert (sample(sd15, model, positive) - sample(sd15, sd15.bundle.model, positive)).abs().max() > 1e-3


def test_percent_window_maps_to_sigmas(sd15):
    sampling = sd15.bundle.model.get_model_object("model_sampling")
    assert sigma_window(sd15.bundle.model, 0.0, 1.0) == (float("inf"), 0.0)
    high, low = sigma_window(sd15.bundle.model, 0.2, 0.6)
    assert high == pytest.approx(float(sampling.percent_to_sigma(0.2)))
    assert high > low > 0
    with pytest.raises(ValueError, match="must not exceed"):
        sigma_window(sd15.bundle.model, 0.7, 0.2)


def test_empty_window_is_stock(sd15):
    width = sd15.encode(PROMPT)[0][0].shape[-1]
    model, positive = ApplyNestedAttention.execute(sd15.bundle.model, sd15.bundle.clip, PROMPT,
                                                   SubjectSpec("cat", bank=bank(width, 0)),
                                                   start_percent=1.0, end_percent=1.0).result
    assert torch.equal(sample(sd15, model, positive), sample(sd15, sd15.bundle.model, positive))
