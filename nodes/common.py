"""Pieces shared by the pack's nodes: naming, the stock KSampler inputs, small parsers."""
from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io

NODE_PREFIX = "ConceptAttention_"
CATEGORY = "concept_attention"


def ksampler_inputs(with_positive: bool = True) -> list[io.Input]:
    """The stock KSampler's inputs (model excluded), with its defaults and ranges."""
    import comfy.samplers

    inputs: list[io.Input] = [
        io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                     tooltip="Random seed of the initial noise."),
        io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Number of denoising steps."),
        io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale."),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                       tooltip="Sampling algorithm."),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                       tooltip="Noise schedule."),
    ]
    if with_positive:
        inputs.append(io.Conditioning.Input("positive", tooltip="What to generate."))
    inputs += [
        io.Conditioning.Input("negative", tooltip="What to steer away from."),
        io.Latent.Input("latent_image", tooltip="The latent to denoise (empty latent or an "
                                                "encoded image, with an optional noise mask)."),
        io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="How much of the latent is replaced by noise (1.0 = all)."),
    ]
    return inputs


def run_ksampler(model: Any, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                 positive: Any, negative: Any, latent: dict, denoise: float, **stage: Any) -> dict:
    """Sample exactly as the stock KSampler node does (noise, noise mask, previews, progress).

    ``stage`` takes KSamplerAdvanced's split: ``start_step``, ``last_step``, ``disable_noise``,
    ``force_full_denoise``.
    """
    import nodes as comfy_nodes  # ComfyUI's top-level nodes module, not this package

    return comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive,
                                       negative, latent, denoise=denoise, **stage)[0]


def split_words(text: str) -> list[str]:
    """Comma-separated words or phrases, stripped, empty ones dropped."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise ValueError("no words given: list the words of the prompt to look at, e.g. 'cat, dog'")
    return words


def check_latent(latent: Any, name: str = "latent_image") -> dict:
    """A LATENT input with finite 4-D/5-D samples, or an error naming the input and the fix."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise ValueError(f"'{name}' is not a LATENT: connect an Empty Latent Image or VAE Encode")
    if samples.ndim not in (4, 5) or samples.numel() == 0:
        raise ValueError(f"'{name}' has samples of shape {tuple(samples.shape)}; expected a "
                         "non-empty [batch, channels, height, width] latent")
    if not torch.isfinite(samples).all():
        raise ValueError(f"'{name}' contains NaN or infinite values: re-encode the image or check "
                         "the node that produced the latent (e.g. a VAE in fp16)")
    return latent


def check_masks_finite(masks: Any, name: str = "masks") -> None:
    """Refuse a MASK input with NaN or infinite values, naming it."""
    if isinstance(masks, torch.Tensor) and not torch.isfinite(masks).all():
        raise ValueError(f"'{name}' contains NaN or infinite values: redraw or reload the masks")
