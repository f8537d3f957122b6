"""Nested attention installed on tiny ComfyUI models: identities against stock sampling."""
from __future__ import annotations

import pytest
import torch

from concept_attention.attention.nested_hook import NestedContextPatch, NestedSource
from concept_attention.attention.patching import install_nested, model_layers, nested_subjects
from concept_attention.sampling.nested_subjects import SubjectSpec, build_sources, encode_prompt

PROMPT = "a photo of a cat and a dog"


def sample_with(tiny, model, prompt=PROMPT, positive=None):
    import comfy.sample

    latent = torch.zeros(1, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 3)
    return comfy.sample.sample(model, noise, 3, 5.0, "euler", "normal", positive or tiny.encode(prompt),
                               tiny.encode(""), latent, seed=3, disable_pbar=True)


def nested_model(tiny, specs, layers="all"):
    clip, model = tiny.bundle.clip, tiny.bundle.model.clone()
    conditioning, features = encode_prompt(clip, PROMPT)
    sources = build_sources(clip, PROMPT, features, specs, model_layers(model))
    install_nested(model, sources, layers)
    return model, conditioning, features


def random_bank(width: int, m: int = 16, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(m, width, generator=torch.Generator().manual_seed(seed))


def test_zero_strength_is_bit_identical_to_stock(tiny):
    width = tiny.encode(PROMPT)[0][0].shape[-1]
    model, positive, _ = nested_model(tiny, [SubjectSpec("cat", bank=random_bank(width), strength=0.0)])
    assert torch.equal(sample_with(tiny, model, positive=positive), sample_with(tiny, tiny.bundle.model))


def test_bank_of_the_subjects_own_features_is_stock(tiny):
    # one nested token whose value is exactly V[s*]: v* = V[s*] for every query, nothing changes
    _, features = encode_prompt(tiny.bundle.clip, PROMPT)
    position = build_sources(tiny.bundle.clip, PROMPT, features, [SubjectSpec("cat", bank=features[:1])],
                             model_layers(tiny.bundle.model))[0].position
    model, positive, _ = nested_model(tiny, [SubjectSpec("cat", bank=features[position:position + 1])])
    stock = sample_with(tiny, tiny.bundle.model)
    torch.testing.assert_close(sample_with(tiny, model, positive=positive), stock, rtol=1e-4, atol=1e-4)


def test_random_bank_changes_the_image_and_leaves_the_input_model_alone(tiny):
    before = dict(tiny.bundle.model.model_options)
    width = tiny.encode(PROMPT)[0][0].shape[-1]
    model, positive, _ = nested_model(tiny, [SubjectSpec("cat", bank=random_bank(width, scale=3.0))])
    stock = sample_with(tiny, tiny.bundle.model)
    assert (sample_with(tiny, model, positive=positive) - stock).abs().max() > 1e-3
    assert tiny.bundle.model.model_options == before
    assert nested_subjects(tiny.bundle.model) == ()


def test_only_rows_of_the_located_prompt_get_the_update(sd15):
    _, features = encode_prompt(sd15.bundle.clip, PROMPT)
    _, other = encode_prompt(sd15.bundle.clip, "a drawing of a cat")
    source = build_sources(sd15.bundle.clip, PROMPT, features, [SubjectSpec("cat", bank=features[:2])],
                           model_layers(sd15.bundle.model))[0]
    context = torch.stack([features, other, features.half().float()])
    assert source.rows_index(context).tolist() == [source.position, -1, source.position]
    # another prompt with the subject elsewhere is untouched too (the negative prompt here)
    assert source.rows_index(encode_prompt(sd15.bundle.clip, "")[1][None]).tolist() == [-1]


def test_sigma_window_switches_the_subject_off(sd15):
    width = sd15.encode(PROMPT)[0][0].shape[-1]
    spec = SubjectSpec("cat", bank=random_bank(width, scale=3.0), sigma_max=-1.0)
    model, positive, _ = nested_model(sd15, [spec])
    assert torch.equal(sample_with(sd15, model, positive=positive), sample_with(sd15, sd15.bundle.model))


def test_second_application_adds_subjects_to_one_patch(sd15):
    width = sd15.encode(PROMPT)[0][0].shape[-1]
    model, _, features = nested_model(sd15, [SubjectSpec("cat", bank=random_bank(width, seed=1))])
    sources = build_sources(sd15.bundle.clip, PROMPT, features, [SubjectSpec("dog", bank=random_bank(width, seed=2))],
                            model_layers(model))
    twice = model.clone()
    install_nested(twice, sources)
    assert [s.name for s in nested_subjects(twice)] == ["cat", "dog"]
    assert [s.name for s in nested_subjects(model)] == ["cat"]
    patches = twice.model_options["transformer_options"]["patches"]["attn2_patch"]
    assert sum(isinstance(p, NestedContextPatch) for p in patches) == 1
    with pytest.raises(ValueError, match="already applied"):
        install_nested(twice.clone(), sources)
    assert (sample_with(sd15, twice) - sample_with(sd15, model)).abs().max() > 1e-4


def test_bank_is_projected_with_weight_patches(sd15):
    # a LoRA-style patch on to_v changes V[s*] and the bank's projection alike: still stock
    _, features = encode_prompt(sd15.bundle.clip, PROMPT)
    patched = sd15.bundle.model.clone()
    layer = model_layers(patched)[0]
    _, v_key = layer.weight_keys
    weight = patched.model.state_dict()[v_key]
    patched.add_patches({v_key: ("diff", (0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(4)),))})
    sources = build_sources(sd15.bundle.clip, PROMPT, features, [SubjectSpec("cat", bank=features[:1])], model_layers(patched))
    position = sources[0].position
    own = build_sources(sd15.bundle.clip, PROMPT, features,
                        [SubjectSpec("cat", bank=features[position:position + 1])], model_layers(patched))
    nested = patched.clone()
    install_nested(nested, own)
    stock = sample_with(sd15, patched)
    assert (stock - sample_with(sd15, sd15.bundle.model)).abs().max() > 1e-3
    torch.testing.assert_close(sample_with(sd15, nested), stock, rtol=1e-4, atol=1e-4)


def test_layer_kv_source_and_missing_layers(sd15):
    model = sd15.bundle.model.clone()
    layers = model_layers(model)
    g = torch.Generator().manual_seed(5)
    first = layers[0]
    inner = first.heads * first.dim_head
    kv = {first.key: (torch.randn(4, inner, generator=g), 3 * torch.randn(4, inner, generator=g))}
    _, features = encode_prompt(sd15.bundle.clip, PROMPT)
    sources = build_sources(sd15.bundle.clip, PROMPT, features, [SubjectSpec("dog", layer_kv=lambda _: kv)], layers)
    install_nested(model, sources)
    assert (sample_with(sd15, model) - sample_with(sd15, sd15.bundle.model)).abs().max() > 1e-4


def test_bad_specs_say_what_to_do(sd15):
    _, features = encode_prompt(sd15.bundle.clip, PROMPT)
    layers = model_layers(sd15.bundle.model)
    with pytest.raises(ValueError, match="does not occur"):
        build_sources(sd15.bundle.clip, PROMPT, features, [SubjectSpec("horse", bank=features[:1])], layers)
    with pytest.raises(ValueError, match="another model architecture"):
        build_sources(sd15.bundle.clip, PROMPT, features, [SubjectSpec("cat", bank=torch.zeros(2, 7))], layers)
    with pytest.raises(ValueError, match="exactly one"):
        NestedSource("cat")
