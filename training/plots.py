"""A loss curve as a ComfyUI IMAGE, drawn with torch alone."""
from __future__ import annotations

import torch

COLOURS = {"loss": (0.1, 0.1, 0.1), "reconstruction": (0.2, 0.4, 0.9),
           "calibration": (0.9, 0.3, 0.2), "mask": (0.2, 0.7, 0.3)}


def loss_curve_image(history: list[dict[str, float]], height: int = 256, width: int = 512) -> torch.Tensor:
    """``[1, H, W, 3]`` plot of each loss term over the steps (each curve scaled to its range)."""
    image = torch.ones(height, width, 3)
    pad = 8
    if len(history) < 2:
        return image[None]
    for name, colour in COLOURS.items():
        values = torch.tensor([h[name] for h in history if name in h], dtype=torch.float32)
        if len(values) < 2 or not torch.isfinite(values).all():
            continue
        low, high = float(values.min()), float(values.max())
        span = high - low or 1.0
        xs = torch.linspace(pad, width - 1 - pad, steps=(width - 2 * pad) * 2)
        position = (xs - pad) / (width - 1 - 2 * pad) * (len(values) - 1)
        left = position.floor().long().clamp(max=len(values) - 2)
        frac = position - left
        ys_value = values[left] * (1 - frac) + values[left + 1] * frac
        ys = (height - 1 - pad) - (ys_value - low) / span * (height - 1 - 2 * pad)
        rows, cols = ys.round().long().clamp(0, height - 1), xs.round().long().clamp(0, width - 1)
        for offset in (-1, 0, 1):
            image[(rows + offset).clamp(0, height - 1), cols] = torch.tensor(colour)
    return image[None]
