"""Turn attention maps into pictures: colour heatmaps and overlays (pure torch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .maps import minmax_normalize

# Anchor colours of a perceptually ordered dark-to-bright ramp (black, purple, orange, yellow).
_RAMP = torch.tensor([[0.0, 0.0, 0.02], [0.34, 0.06, 0.43], [0.73, 0.21, 0.33],
                      [0.98, 0.55, 0.04], [0.99, 1.0, 0.64]])


def upscale_maps(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize ``[N, H, W]`` maps to ``[N, height, width]`` (bilinear)."""
    return F.interpolate(maps[:, None].float(), size=(height, width), mode="bilinear",
                         align_corners=False)[:, 0]


def colorize(maps: torch.Tensor) -> torch.Tensor:
    """``[N, H, W]`` maps -> ``[N, H, W, 3]`` images in [0, 1], each map min-max normalised."""
    finite = torch.nan_to_num(maps.float(), nan=0.0, posinf=0.0, neginf=0.0)
    x = minmax_normalize(finite).clamp(0, 1) * (len(_RAMP) - 1)
    low = x.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (x - low)[..., None]
    ramp = _RAMP.to(maps.device)
    return ramp[low] * (1 - frac) + ramp[low + 1] * frac


def overlay(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """Blend colourised ``[N, h, w]`` maps over ``[N, H, W, 3]`` images (maps are resized)."""
    heat = colorize(upscale_maps(maps, images.shape[1], images.shape[2]))
    return (images.float() * (1 - alpha) + heat * alpha).clamp(0, 1)
