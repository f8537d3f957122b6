"""Training through ComfyUI's CLIP: gradients to the input embeddings, and prompts encoded per row."""
from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator

import torch


def _out_of_place_clip_layer(self, x, mask=None, optimized_attention=None):
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


@contextlib.contextmanager
def clip_layers_out_of_place(clip_model: torch.nn.Module) -> Iterator[None]:
    """ComfyUI's CLIPLayer adds in place, which breaks gradients to input embeddings."""
    layers = [m for m in clip_model.modules() if type(m).__name__ == "CLIPLayer"]
    for layer in layers:
        layer.forward = types.MethodType(_out_of_place_clip_layer, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def encode_prompts(clip: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, list[dict]]:
    """Text features [B, tokens, width], pooled outputs (None if the CLIP has none) and the token lists."""
    conds, pooled, token_lists = [], [], []
    for prompt in prompts:
        tokens = clip.tokenize(prompt)
        cond, pool = clip.cond_stage_model.encode_token_weights(tokens)[:2]
        conds.append(cond)
        pooled.append(pool)
        token_lists.append(tokens)
    pooled_out = torch.cat(pooled) if all(p is not None for p in pooled) else None
    return torch.cat(conds), pooled_out, token_lists
