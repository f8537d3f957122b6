"""Tiny SD1.5- and SDXL-architecture MODEL/CLIP/VAE objects with seeded random weights.

Built from ComfyUI's own classes (``comfy.supported_models``, ``comfy.sd.CLIP``, TAESD), so every
patch point behaves as it does for the real checkpoints. Nothing is downloaded: the BPE tokenizer
ships inside ComfyUI. Used by library-mode fixtures and by the test-only loader node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# SD1.5's block layout (4 levels, 2 res blocks each, attention on the first 3 levels), so that
# attn2 block ids are exactly SD1.5's: input 1,2,4,5,7,8; middle 0; output 3..11.
SD15_UNET: dict[str, Any] = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=32,
    num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # popped from the end
    transformer_depth_middle=1, context_dim=32, use_spatial_transformer=True, legacy=False,
    use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
    use_temporal_resblock=False, num_heads=8, num_head_channels=-1,
)
SD15_CLIP_L: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                   num_hidden_layers=2, projection_dim=32)

# SDXL's layout (3 levels, no attention on the first, deeper transformers lower down), scaled
# down: attn2 blocks at input 4,5,7,8; middle 0; output 0..5, with depth 1 or 2.
SDXL_CLIP_L: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                   num_hidden_layers=3, projection_dim=32)  # SDXL reads layer -2
SDXL_CLIP_G: dict[str, Any] = dict(hidden_size=48, intermediate_size=96, num_attention_heads=2,
                                   num_hidden_layers=3, projection_dim=48)
SDXL_SIZE_EMBED_DIM = 6 * 256  # six Timestep(256) size/crop embeddings in SDXL.encode_adm
SDXL_UNET: dict[str, Any] = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=32,
    num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 2],
    transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2],
    transformer_depth_middle=2,
    context_dim=SDXL_CLIP_L["hidden_size"] + SDXL_CLIP_G["hidden_size"],
    use_spatial_transformer=True, legacy=False, use_linear_in_transformer=True,
    adm_in_channels=SDXL_CLIP_G["projection_dim"] + SDXL_SIZE_EMBED_DIM,
    num_classes="sequential", use_temporal_attention=False, use_temporal_resblock=False,
    num_head_channels=8,
)

ARCHITECTURES = ("sd15", "sdxl")


@dataclass
class TinyBundle:
    """The three objects a checkpoint loader returns."""

    model: Any
    clip: Any
    vae: Any


def seeded_init_(module: torch.nn.Module, generator: torch.Generator, gain: float = 1.0) -> None:
    """Initialise every parameter deterministically (ComfyUI's ops skip init, leaving garbage).

    Norm layers get weight 1 and bias 0, other biases 0, weights N(0, gain^2 / fan_in) so that
    activations keep unit scale through the network and the text really steers the output.
    The numbers come from ``generator``'s device (a CUDA generator fills a large model on the GPU
    in a moment; its numbers differ from the CPU's).
    """
    with torch.no_grad():
        for sub in module.modules():
            is_norm = isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm))
            for name, param in sub.named_parameters(recurse=False):
                if is_norm:
                    param.fill_(1.0 if name == "weight" else 0.0)
                elif param.ndim >= 2:
                    fan_in = param[0].numel()
                    noise = torch.randn(param.shape, generator=generator, device=generator.device)
                    param.copy_(noise * gain / fan_in ** 0.5)
                else:
                    param.zero_()


def _unet_config(arch: str) -> tuple[Any, dict[str, Any]]:
    import comfy.supported_models

    if arch == "sd15":
        return comfy.supported_models.SD15, dict(SD15_UNET)
    if arch == "sdxl":
        return comfy.supported_models.SDXL, dict(SDXL_UNET)
    raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHITECTURES}")


def build_model(arch: str = "sd15", seed: int = 0) -> Any:
    """A ModelPatcher around a tiny random UNet of the given architecture."""
    import comfy.model_management as mm
    import comfy.model_patcher

    config_cls, unet = _unet_config(arch)
    config = config_cls(unet)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    seeded_init_(base.diffusion_model, torch.Generator().manual_seed(seed))
    return comfy.model_patcher.ModelPatcher(base, mm.get_torch_device(), mm.unet_offload_device())


def build_clip(arch: str = "sd15", seed: int = 0, embedding_directory: list[str] | None = None) -> Any:
    """A tiny CLIP (clip_l, plus clip_g for SDXL) with ComfyUI's real tokenizer."""
    import comfy.sd

    config_cls, unet = _unet_config(arch)
    config = config_cls(unet)
    options: dict[str, Any] = {"dtype": torch.float32}
    if arch == "sd15":
        options["clip_l_model_config"] = dict(SD15_CLIP_L)
    else:
        options["clip_l_model_config"] = dict(SDXL_CLIP_L)
        options["clip_g_model_config"] = dict(SDXL_CLIP_G)
    clip = comfy.sd.CLIP(config.clip_target(), embedding_directory=embedding_directory or [],
                         model_options=options)
    seeded_init_(clip.cond_stage_model, torch.Generator().manual_seed(seed + 1))
    # Textual-inversion files are accepted only at the text model's width.
    tokenizer = clip.tokenizer
    if arch == "sd15":
        tokenizer.clip_l.embedding_size = SD15_CLIP_L["hidden_size"]
    else:
        tokenizer.clip_l.embedding_size = SDXL_CLIP_L["hidden_size"]
        tokenizer.clip_g.embedding_size = SDXL_CLIP_G["hidden_size"]
    return clip


def build_vae(seed: int = 0) -> Any:
    """A TAESD-architecture VAE (8x down, 4 latent channels) with seeded random weights."""
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD()
    seeded_init_(taesd, torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():  # 0-d latent scale/shift are not weights: encode divides by vae_scale
        taesd.vae_scale.fill_(1.0)
        taesd.vae_shift.fill_(0.0)
    return comfy.sd.VAE(sd=taesd.state_dict())


def build_bundle(arch: str = "sd15", seed: int = 0,
                 embedding_directory: list[str] | None = None) -> TinyBundle:
    """MODEL, CLIP and VAE of one tiny architecture."""
    return TinyBundle(build_model(arch, seed), build_clip(arch, seed, embedding_directory),
                      build_vae(seed))


# A tiny CLIP-vision tower (ComfyUI's clip_vision classes): 56 px input, 14 px patches ->
# 16 patch tokens + CLS, width 24; the penultimate hidden states are what image adapters read.
TINY_CLIP_VISION: dict[str, Any] = dict(
    attention_dropout=0.0, dropout=0.0, hidden_act="gelu", hidden_size=24, image_size=56,
    initializer_factor=1.0, initializer_range=0.02, intermediate_size=48, layer_norm_eps=1e-5,
    model_type="clip_vision_model", num_attention_heads=2, num_channels=3, num_hidden_layers=3,
    patch_size=14, projection_dim=16, torch_dtype="float32",
)


def build_clip_vision(seed: int = 0) -> Any:
    """A ComfyUI ``ClipVisionModel`` with the tiny config above and seeded random weights."""
    import json
    import os
    import tempfile

    import comfy.clip_vision

    handle, path = tempfile.mkstemp(suffix=".json", prefix="tiny_clip_vision_")
    try:
        with os.fdopen(handle, "w") as f:
            json.dump(TINY_CLIP_VISION, f)
        clip_vision = comfy.clip_vision.ClipVisionModel(path)
    finally:
        os.unlink(path)
    clip_vision.model.to(torch.float32)
    seeded_init_(clip_vision.model, torch.Generator().manual_seed(seed + 3))
    with torch.no_grad():  # a class embedding is a vector, not a weight matrix: give it scale too
        embeddings = clip_vision.model.vision_model.embeddings
        embeddings.class_embedding.copy_(torch.randn(embeddings.class_embedding.shape,
                                                     generator=torch.Generator().manual_seed(seed + 4)))
    return clip_vision
