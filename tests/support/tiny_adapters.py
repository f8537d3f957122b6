"""Random nested/IP-Adapter-Plus adapter state dicts, with the key names and shapes written by hand.

Pure torch (no ComfyUI): used by unit tests, library-mode tests and the test-only node pack that
drops an adapter file into the e2e server's models folder.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

# widths of the tiny SD1.5 model's (dev/devkit/tiny_models.py) 16 cross-attention layers in
# IP-Adapter order (input 1,2,4,5,7,8; output 3..11; middle), and its CLIP-vision token width
TINY_SD15_IP_WIDTHS = [32, 32, 64, 64, 64, 64] + [64] * 6 + [32] * 3 + [64]
TINY_CLIP_VISION_WIDTH = 24


def plus_state_dict(dim: int, depth: int, inner: int, queries: int, embed: int, out: int,
                    widths: Sequence[int], seed: int = 0, dtype: torch.dtype = torch.float16,
                    kv_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Random tensors under IP-Adapter-Plus's key names and shapes (feed-forward x4, no biases)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(shape, generator=g) / math.sqrt(shape[-1])).to(dtype)

    sd = {"image_proj.latents": rnd(1, queries, dim), "image_proj.proj_in.weight": rnd(dim, embed),
          "image_proj.proj_in.bias": rnd(dim), "image_proj.proj_out.weight": rnd(out, dim),
          "image_proj.proj_out.bias": rnd(out), "image_proj.norm_out.weight": 1 + rnd(out),
          "image_proj.norm_out.bias": rnd(out)}
    for i in range(depth):
        p = f"image_proj.layers.{i}"
        sd.update({f"{p}.0.norm1.weight": 1 + rnd(dim), f"{p}.0.norm1.bias": rnd(dim),
                   f"{p}.0.norm2.weight": 1 + rnd(dim), f"{p}.0.norm2.bias": rnd(dim),
                   f"{p}.0.to_q.weight": rnd(inner, dim), f"{p}.0.to_kv.weight": rnd(2 * inner, dim),
                   f"{p}.0.to_out.weight": rnd(dim, inner), f"{p}.1.0.weight": 1 + rnd(dim),
                   f"{p}.1.0.bias": rnd(dim), f"{p}.1.1.weight": rnd(4 * dim, dim),
                   f"{p}.1.3.weight": rnd(dim, 4 * dim)})
    for j, width in enumerate(widths):
        sd[f"ip_adapter.{2 * j + 1}.to_k_ip.weight"] = rnd(width, out, scale=kv_scale)
        sd[f"ip_adapter.{2 * j + 1}.to_v_ip.weight"] = rnd(width, out, scale=kv_scale)
    return sd


def tiny_sd15_plus(seed: int = 0, kv_scale: float = 3.0) -> dict[str, torch.Tensor]:
    """An IP-Adapter-Plus-shaped random adapter for the tiny SD1.5 model and tiny CLIP vision."""
    return plus_state_dict(dim=32, depth=2, inner=64, queries=4, embed=TINY_CLIP_VISION_WIDTH, out=32,
                           widths=TINY_SD15_IP_WIDTHS, seed=seed, kv_scale=kv_scale)
