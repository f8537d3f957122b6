"""The toy world's base model: a tiny SD1.5-architecture UNet, CLIP text model and TAESD VAE.

Everything is built from ComfyUI's own classes (``comfy.supported_models.SD15``, ``comfy.sd.CLIP``
with the real BPE tokenizer, ``comfy.taesd.taesd.TAESD``), so the pack's patch points behave as on
a real checkpoint. ``load_bundle`` returns what a checkpoint loader returns: MODEL, CLIP and VAE.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
UNET_FILE, CLIP_FILE, VAE_FILE = "unet.safetensors", "clip_l.safetensors", "taesd.safetensors"
IMAGE_SIZE = 128  # pixels; 16x16 latents
Init = Callable[[torch.nn.Module], None]  # fills a fresh module's weights (the harness seeds them)

MODEL_CHANNELS = 64  # base model v2; v1 had 32 (its weights still load: the width is read from them)
CALIBRATION_LAYERS = "latent/1"  # base model v2: 16x16 maps, as SD1.5's calibration layers at 512 px
UNET_CONFIG: dict[str, Any] = dict(
    image_size=16, in_channels=4, out_channels=4, model_channels=MODEL_CHANNELS,
    num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 2],
    transformer_depth=[1, 1, 1], transformer_depth_output=[1, 1, 1, 1, 1, 1],
    transformer_depth_middle=1, context_dim=64, use_spatial_transformer=True, legacy=False,
    use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
    use_temporal_resblock=False, num_heads=4, num_head_channels=-1,
)
CLIP_CONFIG: dict[str, Any] = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4,
                                   num_hidden_layers=3, projection_dim=64)


def toy_augmentation() -> Any:
    """Training-data settings that fit the toy world (``training.data.AugmentSettings``).

    Its captions hold no size words ("a far away", "zoomed in"), so augmented views keep the
    caption as it is; its pattern cells are already the VAE's 8 px latent cell, so views are never
    shrunk (a shrunk view's cells would fall below it); a pasted view would sit on the scene's own
    background colour.
    """
    from ..training.data import AugmentSettings

    return AugmentSettings(far_prefixes=(), zoom_prefixes=(), canvas="border", smallest_scale=1.0)


@dataclass
class ToyBundle:
    """The three objects a checkpoint loader returns."""

    model: Any
    clip: Any
    vae: Any


def unet_config(model_channels: int = MODEL_CHANNELS) -> dict[str, Any]:
    """The toy UNet's config at a width (channels of the finest level; mult 1-2-2)."""
    return dict(UNET_CONFIG, model_channels=model_channels)


def width_of(state_dict: dict) -> int:
    """``model_channels`` of a toy UNet's weights (its input convolution's outputs)."""
    return int(state_dict["input_blocks.0.0.weight"].shape[0])


def build_model(state_dict: Optional[dict] = None, model_channels: Optional[int] = None,
                init: Optional[Init] = None) -> Any:
    """ModelPatcher around the toy UNet: given weights (width read from them), or fresh ones that
    ``init`` fills (ComfyUI's layers skip initialisation)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    if state_dict is None and init is None:
        raise ValueError("the toy UNet needs its weights (load_bundle) or an init for fresh ones")
    if model_channels is None:
        model_channels = MODEL_CHANNELS if state_dict is None else width_of(state_dict)
    config = comfy.supported_models.SD15(unet_config(model_channels))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    if state_dict is None:
        init(base.diffusion_model)
    else:
        base.diffusion_model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return comfy.model_patcher.ModelPatcher(base, mm.get_torch_device(), mm.unet_offload_device())


def build_clip(state_dict: Optional[dict] = None, embedding_directory: Optional[list[str]] = None,
               init: Optional[Init] = None) -> Any:
    """ComfyUI CLIP around the toy text model (fp32), with the real SD1.5 tokenizer: given weights,
    or fresh ones that ``init`` fills."""
    import comfy.sd
    import comfy.supported_models

    if state_dict is None and init is None:
        raise ValueError("the toy text model needs its weights (load_bundle) or an init for fresh ones")
    config = comfy.supported_models.SD15(unet_config())
    options = {"dtype": torch.float32, "clip_l_model_config": dict(CLIP_CONFIG)}
    clip = comfy.sd.CLIP(config.clip_target(), embedding_directory=embedding_directory or [],
                         model_options=options)
    text_model = clip.cond_stage_model
    if state_dict is None:
        init(text_model)
    else:
        missing, unexpected = text_model.clip_l.load_state_dict(
            {k: v.float() for k, v in state_dict.items()}, strict=False)
        missing = [k for k in missing if not k.endswith("logit_scale")]
        if missing or unexpected:
            raise ValueError(f"toy CLIP weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    text_model.float()
    clip.tokenizer.clip_l.embedding_size = CLIP_CONFIG["hidden_size"]
    return clip


def build_vae(state_dict: dict) -> Any:
    """ComfyUI VAE around a TAESD (8x down, 4 channels) with the given weights."""
    import comfy.sd

    return comfy.sd.VAE(sd={k: v.float() for k, v in state_dict.items()})


def weights_present(directory: Path = WEIGHTS_DIR) -> bool:
    """True when all three shipped weight files exist."""
    return all((directory / name).is_file() for name in (UNET_FILE, CLIP_FILE, VAE_FILE))


def weights_sha256(directory: Path = WEIGHTS_DIR) -> dict[str, str]:
    """The sha256 of each weight file, keyed "unet", "clip" and "vae": which base a measurement used."""
    return {name: hashlib.sha256((Path(directory) / file).read_bytes()).hexdigest()
            for name, file in (("unet", UNET_FILE), ("clip", CLIP_FILE), ("vae", VAE_FILE))}


def load_bundle(directory: Path = WEIGHTS_DIR,
                embedding_directory: Optional[list[str]] = None) -> ToyBundle:
    """MODEL, CLIP and VAE from the shipped (or another directory's) toy-world weights."""
    from safetensors.torch import load_file

    if not weights_present(directory):
        raise FileNotFoundError(
            f"toy-world weights missing in {directory}: expected {UNET_FILE}, {CLIP_FILE} and "
            f"{VAE_FILE}. Run benchmarks/pretrain_smallworld.py to build them.")
    return ToyBundle(build_model(load_file(str(directory / UNET_FILE))),
                     build_clip(load_file(str(directory / CLIP_FILE)), embedding_directory=embedding_directory),
                     build_vae(load_file(str(directory / VAE_FILE))))
