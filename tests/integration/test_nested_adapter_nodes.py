"""Load Nested Adapter and Nested Subject (Image) with Apply Nested Attention on the tiny SD1.5 model."""
from __future__ import annotations

import pytest
import safetensors.torch
import torch

from concept_attention.attention.patching import model_layers
from concept_attention.nodes.nested import ApplyNestedAttention
from concept_attention.nodes.nested_adapter import (LoadNestedAdapter, NestedSubjectFromImage,
                                                    adapter_files, image_tokens)
from concept_attention.sampling.nested_adapter import NestedAdapter, config_for_layers, ip_order
from devkit import tiny_models
from support.tiny_adapters import TINY_CLIP_VISION_WIDTH, TINY_SD15_IP_WIDTHS, tiny_sd15_plus

PROMPT = "a photo of a cat and a dog"


@pytest.fixture(scope="module")
def clip_vision():
    return tiny_models.build_clip_vision(seed=0)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    import folder_paths

    folder = tmp_path_factory.mktemp("nested_adapters")
    safetensors.torch.save_file(tiny_sd15_plus(seed=1), str(folder / "tiny_plus.safetensors"))
    (folder / "ignored.bin").write_bytes(b"not loaded")
    folder_paths.add_model_folder_path("nested_adapters", str(folder))
    return folder


def picture(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 40, 48, 3, generator=torch.Generator().manual_seed(seed))


def sample(sd15, model, positive):
    import comfy.sample

    latent = torch.zeros(1, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 7)
    return comfy.sample.sample(model, noise, 3, 5.0, "euler", "normal", positive, sd15.encode(""), latent,
                               seed=7, disable_pbar=True)


def nested(sd15, clip_vision, adapter, strength=1.0, image=None):
    (subject,) = NestedSubjectFromImage.execute(adapter, clip_vision, picture() if image is None else image,
                                                "cat", strength, 1.0).result
    return ApplyNestedAttention.execute(sd15.bundle.model, sd15.bundle.clip, PROMPT, subject).result


def test_tiny_widths_match_the_tiny_model(sd15):
    layers = ip_order(model_layers(sd15.bundle.model))
    assert [layer.heads * layer.dim_head for layer in layers] == TINY_SD15_IP_WIDTHS


def test_clip_vision_tokens(clip_vision):
    tokens = image_tokens(clip_vision, picture())
    assert tokens.shape == (1, 17, TINY_CLIP_VISION_WIDTH)  # 56 px / 14 px patches + CLS


def test_loader_lists_only_safetensors_and_loads(adapter_dir):
    assert "tiny_plus.safetensors" in adapter_files()
    assert "ignored.bin" not in adapter_files()
    (adapter,) = LoadNestedAdapter.execute("tiny_plus.safetensors").result
    assert adapter.config.num_queries == 4 and adapter.config.heads == 1


def test_image_subject_changes_sampling_and_zero_strength_is_stock(sd15, clip_vision, adapter_dir):
    (adapter,) = LoadNestedAdapter.execute("tiny_plus.safetensors").result
    stock = sample(sd15, sd15.bundle.model, sd15.encode(PROMPT))
    model, positive = nested(sd15, clip_vision, adapter, strength=0.0)
    assert torch.equal(sample(sd15, model, positive), stock)
    model, positive = nested(sd15, clip_vision, adapter)
    with_image = sample(sd15, model, positive)
    assert (with_image - stock).abs().max() > 1e-3
    model, positive = nested(sd15, clip_vision, adapter, image=picture(seed=5))
    assert (sample(sd15, model, positive) - with_image).abs().max() > 1e-5  # the picture matters


def test_layer_kv_is_computed_once_per_image(sd15, clip_vision, adapter_dir):
    (adapter,) = LoadNestedAdapter.execute("tiny_plus.safetensors").result
    (subject,) = NestedSubjectFromImage.execute(adapter, clip_vision, picture(), "cat", 1.0, 1.0).result
    layers = model_layers(sd15.bundle.model)
    first = subject.layer_kv(layers)
    assert subject.layer_kv(layers) is first
    assert first[("middle", 0, 0)][0].shape == (4, 64)


def test_adapter_for_another_model_is_refused(sdxl, clip_vision, adapter_dir):
    (adapter,) = LoadNestedAdapter.execute("tiny_plus.safetensors").result
    (subject,) = NestedSubjectFromImage.execute(adapter, clip_vision, picture(), "cat", 1.0, 1.0).result
    with pytest.raises(ValueError, match="this adapter is for a model with 16 cross-attention layers"):
        ApplyNestedAttention.execute(sdxl.bundle.model, sdxl.bundle.clip, PROMPT, subject)


def test_projections_start_from_the_layers_own_to_k_to_v(sd15):
    diffusion_model = sd15.bundle.model.model.diffusion_model
    layers = model_layers(sd15.bundle.model)
    context = sd15.encode(PROMPT)[0][0].shape[-1]
    adapter = NestedAdapter(config_for_layers(layers, embed_dim=TINY_CLIP_VISION_WIDTH, dim=16, depth=1,
                                              heads=1, dim_head=16, out_dim=context))
    assert adapter.init_from_model(diffusion_model, layers) == 2 * len(layers)
    layer = ip_order(layers)[6]
    attn = diffusion_model.get_submodule(layer.module_path)
    assert torch.equal(adapter.ip_adapter["13"].to_v_ip.weight, attn.to_v.weight.float())
