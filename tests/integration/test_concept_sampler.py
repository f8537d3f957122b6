"""KSampler with Concepts in library mode: off / combined / regional against their references."""
from __future__ import annotations

import pytest
import torch

from concept_attention.sampling.ksampler import run_ksampler
from concept_attention.nodes.compose import ConceptSampler
from concept_attention.concepts.apply import apply_concepts
from support.synthetic_concepts import synthetic_set

PROMPT = "a photo of a cat and a dog"


@pytest.fixture(scope="module")
def sets(sd15):
    return synthetic_set(sd15.bundle, ["V1"], 1, scale=0.3), synthetic_set(sd15.bundle, ["V2"], 2, scale=0.3)


def ksampler_args(sd15) -> dict:
    return dict(seed=5, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal",
                positive=sd15.encode(PROMPT), negative=sd15.encode(""),
                latent_image={"samples": torch.zeros(1, 4, 16, 16)}, denoise=1.0)


def sample(sd15, model):
    args = ksampler_args(sd15)
    args["latent"] = args.pop("latent_image")
    return run_ksampler(model, **args)["samples"]


def node(sd15, sets, composition, masks=None, strength=1.0):
    out = ConceptSampler.execute(model=sd15.bundle.model, concepts_1=sets[0], concepts_2=sets[1],
                                 composition=composition, strength=strength, masks=masks,
                                 **ksampler_args(sd15))
    return out.result[0]["samples"]


def test_off_is_bit_identical_to_the_stock_ksampler(sd15, sets):
    assert torch.equal(node(sd15, sets, "off"), sample(sd15, sd15.bundle.model))


def test_combined_equals_applying_every_set(sd15, sets):
    model = sd15.bundle.model
    for concepts in sets:
        model, _ = apply_concepts(model, None, concepts)
    expected = sample(sd15, model)
    assert torch.equal(node(sd15, sets, "combined"), expected)
    assert not torch.allclose(expected, sample(sd15, sd15.bundle.model))


def test_regional_with_empty_masks_is_the_base_and_with_full_masks_the_combination(sd15, sets):
    stock = sample(sd15, sd15.bundle.model)
    assert torch.equal(node(sd15, sets, "regional", masks=torch.zeros(2, 64, 64)), stock)
    one, _ = apply_concepts(sd15.bundle.model, None, sets[0])
    full_first = torch.zeros(2, 64, 64)
    full_first[0] = 1
    reference = sample(sd15, one)
    assert (reference - stock).abs().max() > 0.05  # the set matters far beyond the tolerance
    # c (W0 + d)^T vs c W0^T + c d^T: equal up to float rounding, carried through three steps
    torch.testing.assert_close(node(sd15, sets, "regional", masks=full_first), reference,
                               rtol=1e-3, atol=2e-3)


def test_regional_halves_differ_from_both_single_sets(sd15, sets):
    halves = torch.zeros(2, 64, 64)
    halves[0, :, :32], halves[1, :, 32:] = 1, 1
    regional = node(sd15, sets, "regional", masks=halves)
    combined = node(sd15, sets, "combined")
    assert not torch.allclose(regional, combined, atol=1e-4)


def test_the_input_model_is_not_modified(sd15, sets):
    before = dict(sd15.bundle.model.model_options.get("transformer_options", {}))
    halves = torch.zeros(2, 64, 64)
    halves[0, :, :32] = 1
    node(sd15, sets, "regional", masks=halves)
    node(sd15, sets, "combined")
    assert sd15.bundle.model.model_options.get("transformer_options", {}) == before
    assert not sd15.bundle.model.patches


def test_regional_mask_count_must_match(sd15, sets):
    with pytest.raises(ValueError, match="one per set"):
        node(sd15, sets, "regional", masks=torch.ones(1, 64, 64))
    with pytest.raises(ValueError, match="needs a MASK"):
        node(sd15, sets, "regional")


def test_regional_mode_chains_with_another_packs_attn2_replace_and_a_lora_patch(sd15, sets):
    """The foreign replace keeps running under our regional hook; weight patches stay in force."""
    from test_attention_chain import make_foreign_replace

    calls: list = []
    model = sd15.bundle.model.clone()
    model.set_model_attn2_replace(make_foreign_replace(calls), "output", 4)
    lora_like = {k: ("diff", (0.1 * d,)) for k, d in list(sets[1].kv_deltas.items())[:2]}
    model.add_patches(lora_like, 1.0)
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32] = 1
    out = ConceptSampler.execute(model=model, concepts_1=sets[0], concepts_2=sets[1],
                                 composition="regional", strength=1.0, masks=masks,
                                 **ksampler_args(sd15)).result[0]["samples"]
    assert len(calls) > 0  # the other pack's replace ran inside our chain
    empty = ConceptSampler.execute(model=model, concepts_1=sets[0], concepts_2=sets[1],
                                   composition="regional", strength=1.0, masks=torch.zeros(2, 64, 64),
                                   **ksampler_args(sd15)).result[0]["samples"]
    assert torch.equal(empty, sample(sd15, model))  # empty regions: exactly the patched model
    assert not torch.allclose(out, empty)


AUTO_PROMPT = "a photo of a V1 cat and a V2 dog"


@pytest.fixture(scope="module")
def auto_sets(sd15):
    return (synthetic_set(sd15.bundle, ["V1"], 1, scale=0.3, classes=("cat",)),
            synthetic_set(sd15.bundle, ["V2"], 2, scale=0.3, classes=("dog",)))



def auto_args(sd15, sets, text=AUTO_PROMPT, **extra):
    from concept_attention.concepts.apply import apply_concepts as apply

    clip = sd15.bundle.clip
    for concepts in sets:
        _, clip = apply(None, clip, concepts)
    args = ksampler_args(sd15)
    args["positive"] = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    args["steps"] = 4
    return dict(model=sd15.bundle.model, concepts_1=sets[0], concepts_2=sets[1], composition="regional_auto",
                strength=1.0, clip=clip, positive_text=text, **{**args, **extra})


def test_class_words_after_their_triggers_are_found(sd15, auto_sets):
    from concept_attention.sampling.auto_regions import class_word_positions

    clip = auto_args(sd15, auto_sets)["clip"]
    per_set = class_word_positions(clip, AUTO_PROMPT, auto_sets)
    stream = clip.tokenize(AUTO_PROMPT)["l"][0]
    assert [len(p) for p in per_set] == [1, 1]
    cat, dog = per_set[0][0], per_set[1][0]
    assert dog > cat > 0
    # the class word follows the trigger's spliced vector
    assert torch.is_tensor(stream[cat - 1][0]) and torch.is_tensor(stream[dog - 1][0])
    with pytest.raises(ValueError, match="class after each trigger"):
        class_word_positions(clip, "a cat and a photo of a V1", auto_sets)


def test_auto_regions_are_disjoint_and_match_a_manual_second_stage(sd15, auto_sets):
    from concept_attention.attention.patching import install_regional
    from concept_attention.sampling.auto_regions import region_text_features

    args = auto_args(sd15, auto_sets, auto_restart=False)
    latent, regions = ConceptSampler.execute(**args).result
    assert regions.shape == (2, 128, 128)
    assert set(regions.unique().tolist()) <= {0.0, 1.0}
    assert bool((regions.sum(0) <= 1).all())
    assert regions[0].sum() > 0 and regions[1].sum() > 0
    # stage two is exactly regional sampling with those masks, started from stage one's latent
    sampling = {k: args[k] for k in ("seed", "cfg", "sampler_name", "scheduler", "positive", "negative",
                                     "denoise")}
    combined = sd15.bundle.model
    for concepts in auto_sets:
        combined, _ = apply_concepts(combined, None, concepts)
    first = run_ksampler(combined, steps=4, latent=args["latent_image"], last_step=1,
                         force_full_denoise=False, **sampling)
    masks = torch.nn.functional.interpolate(regions[None], size=(16, 16), mode="nearest")[0]
    model = sd15.bundle.model.clone()
    texts = region_text_features(args["clip"], AUTO_PROMPT, auto_sets)
    install_regional(model, [s.kv_deltas for s in auto_sets], masks, texts)
    second = run_ksampler(model, steps=4, latent=first, start_step=1, disable_noise=True,
                          force_full_denoise=True, **sampling)
    torch.testing.assert_close(latent["samples"], second["samples"], rtol=1e-4, atol=1e-4)


def test_auto_restart_samples_every_step_again_with_the_found_regions(sd15, auto_sets):
    from concept_attention.attention.patching import install_regional
    from concept_attention.sampling.auto_regions import region_text_features

    args = auto_args(sd15, auto_sets)  # auto_restart is on by default
    latent, regions = ConceptSampler.execute(**args).result
    kept = ConceptSampler.execute(**{**args, "auto_restart": False}).result
    assert torch.equal(regions, kept[1])  # the same first stage finds the same regions
    sampling = {k: args[k] for k in ("seed", "cfg", "sampler_name", "scheduler", "positive", "negative",
                                     "denoise")}
    masks = torch.nn.functional.interpolate(regions[None], size=(16, 16), mode="nearest")[0]
    model = sd15.bundle.model.clone()
    install_regional(model, [s.kv_deltas for s in auto_sets], masks,
                     region_text_features(args["clip"], AUTO_PROMPT, auto_sets))
    fresh = run_ksampler(model, steps=4, latent=args["latent_image"], **sampling)["samples"]
    torch.testing.assert_close(latent["samples"], fresh, rtol=1e-4, atol=1e-4)
    assert (latent["samples"] - kept[0]["samples"]).abs().max() > 1e-3


def test_a_set_absent_from_the_prompt_gets_no_region(sd15, auto_sets):
    args = auto_args(sd15, auto_sets, text="a photo of a V1 cat and a dog")
    regions = ConceptSampler.execute(**args).result[1]
    assert regions[0].sum() > 0 and regions[1].sum() == 0


def test_auto_mode_checks_its_text_inputs(sd15, auto_sets):
    args = auto_args(sd15, auto_sets)
    with pytest.raises(ValueError, match="does not give the 'positive'"):
        ConceptSampler.execute(**{**args, "positive_text": "a photo of a V2 dog and a V1 cat"})
    with pytest.raises(ValueError, match="needs 'clip' and 'positive_text'"):
        ConceptSampler.execute(**{**args, "clip": None})
    with pytest.raises(ValueError, match="none of the concepts"):
        text = "a photo of a cat"
        clip = args["clip"]
        ConceptSampler.execute(**{**args, "positive_text": text,
                                  "positive": clip.encode_from_tokens_scheduled(clip.tokenize(text))})


def test_each_region_reads_the_prompt_without_the_other_concepts(sd15, auto_sets):
    """Set 1 everywhere with its region text equals plain sampling of 'a photo of a V1 cat and' with set 1,
    on a model with a LoRA-like patch (the region text is projected by the patched weights)."""
    args = auto_args(sd15, auto_sets)
    clip = args["clip"]
    model = sd15.bundle.model.clone()
    model.add_patches({k: ("diff", (0.1 * d,)) for k, d in list(auto_sets[1].kv_deltas.items())[:4]}, 1.0)
    first_everywhere = torch.zeros(2, 64, 64)
    first_everywhere[0] = 1
    regional = dict(args, model=model, composition="regional", masks=first_everywhere)
    with_texts = ConceptSampler.execute(**regional).result[0]["samples"]
    whole_prompt = ConceptSampler.execute(**regional, region_texts=False).result[0]["samples"]
    one, _ = apply_concepts(model, None, auto_sets[0])
    sampling = {k: args[k] for k in ("seed", "cfg", "sampler_name", "scheduler", "negative", "denoise")}
    reference = run_ksampler(one, steps=4, latent=args["latent_image"], **sampling,
                             positive=clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a V1 cat and"))
                             )["samples"]
    plain = run_ksampler(one, steps=4, latent=args["latent_image"], **sampling, positive=args["positive"])["samples"]
    assert (reference - plain).abs().max() > 0.05  # the other concept matters far beyond the tolerance
    torch.testing.assert_close(with_texts, reference, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(whole_prompt, plain, rtol=1e-3, atol=2e-3)
    with pytest.raises(ValueError, match="does not give the 'positive'"):
        ConceptSampler.execute(**{**regional, "positive_text": "a photo of a V2 dog and a V1 cat"})


def test_region_texts_drop_only_the_other_sets_whole_trigger_words():
    from concept_attention.sampling.auto_regions import without_words

    assert without_words("a V1 cat and a V2 dog, V2.", ["V2"]) == "a V1 cat and a dog, ."
    assert without_words("a V21 cat and a xV2 dog", ["V2"]) == "a V21 cat and a xV2 dog"


def test_region_texts_drop_the_other_concepts_whole_phrases():
    from types import SimpleNamespace

    from concept_attention.sampling.auto_regions import region_text_features, without_concepts

    dog = SimpleNamespace(trigger="V2", class_phrase="dog")
    assert without_concepts("a photo of a V1 cat and a V2 dog in a park", [dog]) == "a photo of a V1 cat and in a park"
    assert without_concepts("A V2 dog, the V2 dog, an V2 and V2.", [dog]) == ", , and ."
    assert without_concepts("a V21 dog and a xV2 dog and Ava V2 dog", [dog]) == "a V21 dog and a xV2 dog and Ava"
    big = SimpleNamespace(trigger="V3", class_phrase="red car")
    assert without_concepts("a V1 cat next to a V3 red car", [big]) == "a V1 cat next to"
    with pytest.raises(ValueError, match="'concepts' or 'triggers'"):
        region_text_features(None, "a V1 cat", [], drop="classes")
