"""Discover a UNet's cross-attention layers and select them by resolution.

Works on ComfyUI's ``openaimodel.UNetModel`` (SD1.5, SD2, SDXL) by walking its module tree, so
nothing depends on hard-coded token counts or on the image size being sampled.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch

LayerKey = tuple[str, int, int]  # (block name, block id, depth index) as ComfyUI's attn2 replace keys


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One ``attn2`` of a UNet: its patch key, its downscale factor and its module path."""

    key: LayerKey
    downscale: int  # spatial size of this layer = latent size / downscale
    heads: int
    dim_head: int
    module_path: str  # e.g. "input_blocks.7.1.transformer_blocks.0.attn2"

    @property
    def weight_keys(self) -> tuple[str, str]:
        """ModelPatcher weight keys of this layer's ``to_k`` and ``to_v``."""
        base = f"diffusion_model.{self.module_path}"
        return f"{base}.to_k.weight", f"{base}.to_v.weight"


def _kind(module: torch.nn.Module) -> str:
    return type(module).__name__


def _transformer_layers(block: torch.nn.Module, prefix: str, name: str, block_id: int,
                        downscale: int) -> list[CrossAttentionLayer]:
    found = []
    for child_name, child in block.named_children():
        if _kind(child) != "SpatialTransformer":
            continue
        for depth, tblock in enumerate(child.transformer_blocks):
            attn2 = getattr(tblock, "attn2", None)
            if attn2 is None:
                continue
            path = f"{prefix}.{child_name}.transformer_blocks.{depth}.attn2"
            found.append(CrossAttentionLayer((name, block_id, depth), downscale, attn2.heads,
                                             attn2.dim_head, path))
    return found


def discover_layers(diffusion_model: torch.nn.Module) -> list[CrossAttentionLayer]:
    """All cross-attention layers of a UNet in execution order, with their downscale factors."""
    for attr in ("input_blocks", "middle_block", "output_blocks"):
        if not hasattr(diffusion_model, attr):
            raise ValueError(
                f"{type(diffusion_model).__name__} is not a UNet with input/middle/output blocks; "
                "only SD1.x, SD2.x and SDXL-style models are supported")
    layers: list[CrossAttentionLayer] = []
    downscale = 1
    for i, block in enumerate(diffusion_model.input_blocks):
        if any(_kind(m) == "Downsample" for m in block.children()):
            downscale *= 2
        layers += _transformer_layers(block, f"input_blocks.{i}", "input", i, downscale)
    layers += _transformer_layers(diffusion_model.middle_block, "middle_block", "middle", 0, downscale)
    for i, block in enumerate(diffusion_model.output_blocks):
        layers += _transformer_layers(block, f"output_blocks.{i}", "output", i, downscale)
        if any(_kind(m) == "Upsample" for m in block.children()):
            downscale //= 2
    return layers


_SELECTOR = re.compile(r"^latent(?:/(\d+))?$")


def select_layers(layers: Iterable[CrossAttentionLayer], selector: str) -> list[CrossAttentionLayer]:
    """Pick layers by a selector: ``"all"``, ``"latent/4"`` (and ``"latent"``, ``"latent/2"``...),
    a comma list of those, or explicit keys like ``"input:7:0,output:3"``."""
    layers = list(layers)
    chosen: list[CrossAttentionLayer] = []
    for part in (p.strip() for p in selector.split(",") if p.strip()):
        if part == "all":
            matches = layers
        elif (m := _SELECTOR.match(part)) is not None:
            factor = int(m.group(1) or 1)
            matches = [layer for layer in layers if layer.downscale == factor]
        elif ":" in part:
            fields = part.split(":")
            if len(fields) not in (2, 3) or fields[0] not in ("input", "middle", "output"):
                raise ValueError(f"bad layer key {part!r}: use block:id[:depth], e.g. 'output:3:0'")
            name, block_id = fields[0], int(fields[1])
            depth = int(fields[2]) if len(fields) == 3 else None
            matches = [layer for layer in layers if layer.key[:2] == (name, block_id)
                       and (depth is None or layer.key[2] == depth)]
        else:
            raise ValueError(f"unknown layer selector {part!r}: use 'all', 'latent/4' or 'output:3:0'")
        if not matches:
            available = sorted({f"latent/{layer.downscale}" for layer in layers})
            raise ValueError(f"layer selector {part!r} matches no cross-attention layer of this "
                             f"model; resolutions it has: {', '.join(available)}")
        chosen += [layer for layer in matches if layer not in chosen]
    return chosen
