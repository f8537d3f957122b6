"""Training data: concept specs, image checks and Custom-Diffusion augmentation."""
from __future__ import annotations

import random

import pytest
import torch

from concept_attention.training.data import augment, default_caption, prepare_image, prepare_masks
from concept_attention.concepts.specs import ConceptSpec, parse_concept_specs


def test_parse_specs_lines_and_semicolons():
    assert parse_concept_specs("V1: cat\nV2:  small   dog") == [ConceptSpec("V1", "cat"),
                                                                ConceptSpec("V2", "small dog")]
    assert parse_concept_specs("a1: cat; b2: dog")[1] == ConceptSpec("b2", "dog")


@pytest.mark.parametrize("text, message", [
    ("", "no concepts"),
    ("V1 cat", "TRIGGER: class"),
    ("1V: cat", "must be one word"),
    ("V1:", "no class word"),
    ("cat: cat", "must differ"),
    ("V1: cat\nv1: dog", "used twice"),
])
def test_parse_specs_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_concept_specs(text)


def test_default_caption_puts_trigger_before_class():
    specs = [ConceptSpec("V1", "cat"), ConceptSpec("V2", "dog")]
    assert default_caption(specs) == "photo of a V1 cat and V2 dog"


def test_prepare_image_checks_and_converts():
    rgba = torch.rand(1, 80, 96, 4)
    assert prepare_image(rgba).shape == (80, 96, 3)
    assert prepare_image(torch.rand(1, 80, 80, 1)).shape == (80, 80, 3)
    with pytest.raises(ValueError, match="ONE picture"):
        prepare_image(torch.rand(2, 80, 80, 3))
    with pytest.raises(ValueError, match="at least 64"):
        prepare_image(torch.rand(1, 32, 80, 3))
    bad = torch.rand(1, 80, 80, 3)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prepare_image(bad)


def test_prepare_masks_checks_count_size_and_emptiness():
    picture = torch.rand(80, 96, 3)
    masks = torch.zeros(2, 80, 96)
    masks[0, :10] = 1
    masks[1, 10:] = 1
    assert prepare_masks(masks, picture, 2).shape == (2, 80, 96)
    with pytest.raises(ValueError, match="3 masks were given for 2 concepts"):
        prepare_masks(torch.ones(3, 80, 96), picture, 2)
    with pytest.raises(ValueError, match="same size"):
        prepare_masks(torch.ones(2, 40, 96), picture, 2)
    with pytest.raises(ValueError, match="mask 2 is empty"):
        prepare_masks(torch.stack([masks[0], torch.zeros(80, 96)]), picture, 2)


def test_augment_modes_follow_the_prompt_prefixes_and_masks():
    picture = torch.rand(100, 120, 3)
    masks = torch.zeros(1, 100, 120)
    masks[0, 40:60, 50:70] = 1
    seen = set()
    rng = random.Random(0)
    for _ in range(200):
        sample = augment(picture, masks, "photo of a V1 cat", 128, rng)
        assert sample.pixels.shape == (128, 128, 3)
        assert sample.loss_mask.shape == (16, 16)
        assert sample.concept_masks.shape == (1, 128, 128)
        if sample.prompt.startswith(("a far away", "very small")):
            seen.add("small")
            assert 0 < float(sample.loss_mask.mean()) < 1  # only the pasted box is reconstructed
            grey = (sample.pixels - 0.5).abs().sum(-1) == 0
            assert float(grey.float().mean()) > 0.3  # the rest is the mid-grey canvas
        elif sample.prompt.startswith(("zoomed in", "close up")):
            seen.add("zoom")
            assert float(sample.loss_mask.min()) == 1
        else:
            assert sample.prompt == "photo of a V1 cat"
            seen.add("plain")
    assert seen == {"small", "zoom", "plain"}


def test_augment_disabled_is_a_plain_resize_and_deterministic():
    picture = torch.rand(64, 64, 3)
    a = augment(picture, None, "x", 64, random.Random(3), enabled=False, flip=False)
    b = augment(picture, None, "x", 64, random.Random(3), enabled=False, flip=False)
    assert torch.equal(a.pixels, b.pixels) and a.prompt == "x"
    torch.testing.assert_close(a.pixels, picture, atol=1e-5, rtol=0)


def test_prior_captions_pairing():
    from concept_attention.sampling.prior import captions_for

    images = torch.rand(3, 8, 8, 3)
    assert [c for _, c in captions_for(images, "a cat")] == ["a cat"] * 3
    assert [c for _, c in captions_for(images, "a\nb\nc")] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="3 prior images but 2 caption lines"):
        captions_for(images, "a\nb")
    with pytest.raises(ValueError, match="need captions"):
        captions_for(images, "  ")


def test_prefixes_never_double_the_article():
    from concept_attention.training.data import with_prefix

    assert with_prefix("a far away ", "photo of a V1 cat") == "a far away photo of a V1 cat"  # official
    assert with_prefix("a far away ", "a V1 square and a V2 star") == "a far away V1 square and a V2 star"
    assert with_prefix("very small ", "a V1 square") == "a very small V1 square"
    assert with_prefix("zoomed in ", "An V1 owl") == "An zoomed in V1 owl"
    assert with_prefix("", "a V1 square") == "a V1 square"


def test_augmentation_settings_change_texts_canvas_and_scale():
    from concept_attention.training.data import AugmentSettings

    picture = torch.rand(96, 96, 3) * 0.2
    picture[0], picture[-1], picture[:, 0], picture[:, -1] = (torch.tensor([0.8, 0.7, 0.6]),) * 4
    no_texts = AugmentSettings(far_prefixes=(), zoom_prefixes=(), canvas="border", smallest_scale=0.34)
    rng, pasted = random.Random(1), 0
    for _ in range(60):
        sample = augment(picture, None, "a V1 square", 96, rng, settings=no_texts)
        assert sample.prompt == "a V1 square"
        if float(sample.loss_mask.mean()) < 1:  # shrunk and pasted: the canvas is the border colour
            pasted += 1
            corners = torch.stack([sample.pixels[0, 0], sample.pixels[0, -1], sample.pixels[-1, 0],
                                   sample.pixels[-1, -1]])
            assert ((corners - torch.tensor([0.8, 0.7, 0.6])).abs() < 1e-6).sum() >= 9  # 3 of 4 corners
    assert pasted > 5
    never_shrink = AugmentSettings(smallest_scale=1.0)
    rng = random.Random(2)
    prompts = {augment(picture, None, "a V1 square", 96, rng, settings=never_shrink).prompt for _ in range(60)}
    assert prompts == {"a V1 square", "a zoomed in V1 square", "a close up V1 square"}


@pytest.mark.parametrize("bad", [dict(canvas="white"), dict(smallest_scale=0.0), dict(smallest_scale=1.5),
                                 dict(smallest_scale=float("nan")), dict(far_prefixes="a far away ")])
def test_bad_augmentation_settings_are_refused(bad):
    from concept_attention.training.data import AugmentSettings
    from concept_attention.training.settings import TrainSettings

    with pytest.raises(ValueError, match="augmentation"):
        TrainSettings(augmentation=AugmentSettings(**bad)).validate()
