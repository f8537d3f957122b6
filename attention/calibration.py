"""DisenDiff attention-calibration math: smoothing, suppression, soft IoU and the two losses (pure torch).

Maps entering the losses are ``G(minmax(m))`` for modifier tokens and ``G(minmax(c))**p`` for
class tokens (``docs/method.md`` §6). Unlike the official code, the class-map suppression is
independent of the Gaussian switch: turning the Gaussian off keeps the suppression.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .maps import minmax_normalize

SIGMA_FORMULAS = ("disendiff", "standard")


def gaussian_kernel(
    size: int = 3,
    sigma: float = 0.5,
    formula: str = "disendiff",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Return a ``[size, size]`` Gaussian kernel normalised to sum 1.

    ``formula="disendiff"``: ``exp(-((x - mu) / (2 * sigma)) ** 2)``, the official code's quirk,
    whose effective standard deviation is ``sqrt(2) * sigma``.
    ``formula="standard"``: ``exp(-(x - mu) ** 2 / (2 * sigma ** 2))``.
    The 2-D kernel is the outer product of the normalised 1-D kernel with itself; the defaults give
    1-D ``[0.21194, 0.57612, 0.21194]`` and 2-D centre 0.33191, edge 0.12210, corner 0.04492.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd integer, got {size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if formula not in SIGMA_FORMULAS:
        raise ValueError(f"formula must be one of {SIGMA_FORMULAS}, got {formula!r}")
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    if formula == "disendiff":
        g = torch.exp(-((x / (2.0 * sigma)) ** 2))
    else:
        g = torch.exp(-(x**2) / (2.0 * sigma**2))
    g = g / g.sum()
    kernel = torch.outer(g, g)
    return (kernel / kernel.sum()).to(dtype)


def gaussian_smooth(maps: Tensor, kernel: Tensor) -> Tensor:
    """Convolve every ``[..., H, W]`` map with ``kernel`` (depthwise, reflect padding of size//2)."""
    if maps.dim() < 2:
        raise ValueError(f"expected [..., H, W] maps, got shape {tuple(maps.shape)}")
    if kernel.dim() != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
        raise ValueError(f"kernel must be 2-D with odd sides, got shape {tuple(kernel.shape)}")
    height, width = maps.shape[-2:]
    kh, kw = kernel.shape
    flat = maps.reshape(-1, 1, height, width)
    padded = F.pad(flat, (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    if kernel.dtype != maps.dtype or kernel.device != maps.device:
        kernel = kernel.to(dtype=maps.dtype, device=maps.device)
    weight = kernel[None, None]
    return F.conv2d(padded, weight).reshape(maps.shape)


def suppress(maps: Tensor, power: Optional[float] = 2.0) -> Tensor:
    """Return ``maps ** power``; ``power`` of None or 1 is the identity."""
    if power is None or power == 1:
        return maps
    return maps**power


def soft_iou(x: Tensor, y: Tensor, smooth: float = 1.0, detach_x: bool = False) -> Tensor:
    """Soft IoU ``(I + smooth) / (U + smooth)`` over the last two dims, shape ``[...]``."""
    if detach_x:
        x = x.detach()
    intersection = (x * y).sum(dim=(-2, -1))
    union = (x + y).sum(dim=(-2, -1)) - intersection
    return (intersection + smooth) / (union + smooth)


@dataclass
class CalibrationSettings:
    """Switches and constants of the DisenDiff attention losses (defaults from the official code)."""

    weight: float = 0.01
    use_bind: bool = True
    use_separation: bool = True
    gaussian: bool = True
    sigma: float = 0.5
    kernel_size: int = 3
    sigma_formula: str = "disendiff"
    suppression_power: Optional[float] = 2.0
    iou_smooth: float = 1.0
    normalize: bool = True
    max_t: float = 1.0  # calibrate rows with timestep index <= max_t * (N - 1); 1.0 (official): every row

    def __post_init__(self) -> None:
        if self.sigma_formula not in SIGMA_FORMULAS:
            raise ValueError(f"sigma_formula must be one of {SIGMA_FORMULAS}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError("kernel_size must be a positive odd integer")
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError("weight must be a finite non-negative number")
        if not (math.isfinite(self.max_t) and 0 < self.max_t <= 1):
            raise ValueError(f"max_t must be in (0, 1] (1 calibrates at every timestep), got {self.max_t!r}")


@functools.lru_cache(maxsize=64)
def _kernel_on(size: int, sigma: float, formula: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """:func:`gaussian_kernel` on ``device``, made once (a training step calls it every micro-batch)."""
    return gaussian_kernel(size, sigma, formula, dtype).to(device)


def prepare_maps(raw: Tensor, settings: CalibrationSettings, is_class: bool) -> Tensor:
    """Apply min-max, then the Gaussian, then (class maps only) the suppression to ``[B, T, H, W]`` maps."""
    maps = raw
    if settings.normalize:
        maps = minmax_normalize(maps)
    if settings.gaussian:
        dtype = torch.float64 if maps.dtype == torch.float64 else torch.float32
        kernel = _kernel_on(settings.kernel_size, settings.sigma, settings.sigma_formula, dtype, maps.device)
        maps = gaussian_smooth(maps, kernel)
    if is_class:
        maps = suppress(maps, settings.suppression_power)
    return maps


def bind_loss(class_map: Tensor, modifier_map: Tensor, smooth: float = 1.0) -> Tensor:
    """Return ``1 - IoU(class, modifier)`` over the last two dims, with no gradient into the class map."""
    return 1.0 - soft_iou(class_map, modifier_map, smooth=smooth, detach_x=True)


def separation_loss(class_maps: Tensor, smooth: float = 1.0) -> Tensor:
    """Return the mean soft IoU over all class pairs i<j of ``[B, C, H, W]`` maps, shape ``[B]``."""
    if class_maps.dim() != 4:
        raise ValueError(f"expected [B, C, H, W], got shape {tuple(class_maps.shape)}")
    n_concepts = class_maps.shape[1]
    if n_concepts < 2:
        return class_maps.new_zeros(class_maps.shape[0])
    i, j = torch.triu_indices(n_concepts, n_concepts, offset=1, device=class_maps.device)
    pairs = soft_iou(class_maps[:, i], class_maps[:, j], smooth=smooth)
    return pairs.mean(dim=1)


def calibration_loss(
    modifier_maps: Tensor,
    class_maps: Tensor,
    settings: CalibrationSettings,
) -> Dict[str, Tensor]:
    """Return ``{"bind", "separation", "total"}`` scalars from RAW aggregated ``[B, C, H, W]`` maps.

    ``bind`` sums over concepts and averages over the batch; ``separation`` averages over the
    batch; ``total = weight * (bind + separation)``. A switched-off term is a zero scalar.
    """
    if modifier_maps.shape != class_maps.shape or modifier_maps.dim() != 4:
        raise ValueError(
            "modifier_maps and class_maps must both be [B, C, H, W] of the same shape, got "
            f"{tuple(modifier_maps.shape)} and {tuple(class_maps.shape)}"
        )
    modifiers = prepare_maps(modifier_maps, settings, is_class=False) if settings.use_bind else None
    return calibration_terms(modifiers, prepare_maps(class_maps, settings, is_class=True), settings)


def calibration_terms(modifiers: Optional[Tensor], classes: Tensor, settings: CalibrationSettings,
                      rows: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """:func:`calibration_loss` from maps already passed through :func:`prepare_maps`
    (``modifiers`` may be None when ``use_bind`` is off); ``rows`` [B] bool: the rows that count
    (None: all; none selected: zero terms)."""
    smooth = settings.iou_smooth
    zero = classes.new_zeros(())
    bind = zero
    separation = zero
    if settings.use_bind:
        bind = _row_mean(bind_loss(classes, modifiers, smooth).sum(dim=1), rows)
    if settings.use_separation:
        separation = _row_mean(separation_loss(classes, smooth), rows)
    total = settings.weight * (bind + separation)
    return {"bind": bind, "separation": separation, "total": total}


def _row_mean(per_row: Tensor, rows: Optional[Tensor]) -> Tensor:
    """Mean of ``per_row`` [B] over the selected rows (all when ``rows`` is None)."""
    if rows is None:
        return per_row.mean(dim=0)
    kept = torch.where(rows, per_row, torch.zeros_like(per_row))  # a NaN in a dropped row stays out
    return kept.sum() / rows.sum().clamp(min=1).to(per_row.dtype)
