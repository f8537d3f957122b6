"""The one sampling helper: ComfyUI's own KSampler path, for the nodes, the harness and the tests."""
from __future__ import annotations

from typing import Any

import torch


def run_ksampler(model: Any, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                 positive: Any, negative: Any, latent: dict, denoise: float = 1.0, **stage: Any) -> dict:
    """Sample exactly as the stock KSampler node does (noise, noise mask, previews, progress).

    ``stage`` takes KSamplerAdvanced's split: ``start_step``, ``last_step``, ``disable_noise``,
    ``force_full_denoise``. Returns a LATENT dict.
    """
    import nodes as comfy_nodes  # ComfyUI's top-level nodes module, not this package

    return comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive,
                                       negative, latent, denoise=denoise, **stage)[0]


def empty_latent(size: int, batch: int = 1) -> dict:
    """An Empty Latent Image of ``size`` x ``size`` pixels (4 channels, SD1.x/SDXL)."""
    return {"samples": torch.zeros(batch, 4, size // 8, size // 8)}
