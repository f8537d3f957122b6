"""Train -> save -> load -> apply, and export -> stock loaders, give the same model and text."""
from __future__ import annotations

import pytest
import torch

from concept_attention.concepts.apply import apply_concepts
from concept_attention.concepts.concept_file import load_concepts, save_concepts
from concept_attention.concepts.specs import ConceptSpec
from concept_attention.concepts.export import save_embeddings, save_lora
from concept_attention.training.loop import train_concepts
from concept_attention.training.settings import TrainSettings
from devkit import tiny_models

SPECS = [ConceptSpec("V1", "cat"), ConceptSpec("V2", "dog")]


def quick_train(tiny):
    settings = TrainSettings(steps=2, resolution=128, micro_batch=1, grad_accumulation=1,
                             pool_size=2, learning_rate=5e-3)
    picture = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # as inside a ComfyUI node
        result = train_concepts(tiny.bundle.model, tiny.bundle.clip, tiny.bundle.vae, picture, SPECS,
                                settings)
    assert result.stopped == "complete" and len(result.history) == 2
    return result


def patched_kv(model, keys):
    """The weights a patched model really computes with, after ComfyUI applies its patches."""
    import comfy.model_management as mm

    mm.load_models_gpu([model], force_patch_weights=True)
    state = model.model.state_dict()
    values = {key: state[key].detach().clone() for key in keys}
    mm.unload_all_models()
    return values


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def trained(request):
    tiny = request.getfixturevalue(request.param)
    return tiny, quick_train(tiny)


def test_file_round_trip_samples_bit_identically(trained, tmp_path):
    tiny, result = trained
    path = tmp_path / "pair.safetensors"
    save_concepts(path, result.concepts)
    loaded = load_concepts(path)
    prompt = "a photo of V1 cat and V2 dog"
    in_memory = apply_concepts(tiny.bundle.model, tiny.bundle.clip, result.concepts)
    from_file = apply_concepts(tiny.bundle.model, tiny.bundle.clip, loaded)
    sample = {}
    for name, (model, clip) in {"memory": in_memory, "file": from_file}.items():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        import comfy.sample

        latent = torch.zeros(1, 4, 16, 16)
        sample[name] = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), 3, 5.0,
                                           "euler", "normal", positive, negative, latent,
                                           disable_pbar=True, seed=0)
    assert torch.equal(sample["memory"], sample["file"])
    # and the concepts really change the result
    assert not torch.equal(sample["memory"], tiny.sample(prompt=prompt, steps=3, size=16))


def test_full_rank_export_matches_apply(trained, tmp_path):
    tiny, result = trained
    import comfy.sd
    import comfy.utils

    lora_path = tmp_path / "pair_lora.safetensors"
    save_lora(lora_path, result.concepts)
    save_embeddings(tmp_path, result.concepts)

    applied_model, applied_clip = apply_concepts(tiny.bundle.model, tiny.bundle.clip,
                                                 result.concepts, 0.8)
    stock_model, _ = comfy.sd.load_lora_for_models(tiny.bundle.model, None,
                                                    comfy.utils.load_torch_file(str(lora_path)),
                                                    0.8, 0)
    keys = sorted(result.concepts.kv_deltas)
    via_apply, via_lora = patched_kv(applied_model, keys), patched_kv(stock_model, keys)
    for key in keys:
        assert torch.equal(via_apply[key], via_lora[key]), key

    stock_clip = tiny_models.build_clip(tiny.arch, seed=0, embedding_directory=[str(tmp_path)])
    with_trigger = applied_clip.encode_from_tokens(applied_clip.tokenize("a photo of V1 cat"),
                                                   return_pooled=True)
    with_file = stock_clip.encode_from_tokens(stock_clip.tokenize("a photo of embedding:V1 cat"),
                                              return_pooled=True)
    torch.testing.assert_close(with_trigger[0], with_file[0], rtol=0, atol=0)
    torch.testing.assert_close(with_trigger[1], with_file[1], rtol=0, atol=0)


def test_concepts_for_the_other_architecture_are_refused(trained, sd15, sdxl):
    tiny, result = trained
    other = sdxl if tiny.arch == "sd15" else sd15
    with pytest.raises(ValueError, match="trained for a .* model .* but the MODEL given is"):
        apply_concepts(other.bundle.model, None, result.concepts)
    with pytest.raises(ValueError, match="text encoders"):
        apply_concepts(None, other.bundle.clip, result.concepts)
