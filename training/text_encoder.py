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


class PromptEncoder:
    """Training prompts through ComfyUI's CLIP, text features on ``device``.

    While token vectors train, every micro-batch encodes its prompts again (the features carry
    the gradient to them). Otherwise the text encoder cannot change during the run: each distinct
    prompt is encoded once, and later batches reuse its features (the same values, without the
    text encoder's forward and backward, or a copy to the device per batch).
    """

    def __init__(self, clip: Any, device: torch.device, trains_text: bool):
        self.clip, self.device, self.trains_text = clip, device, trains_text
        self._known: dict[str, tuple[torch.Tensor, torch.Tensor | None, dict]] = {}

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, list[dict]]:
        """Text features [B, tokens, width] on the device, pooled outputs (as ComfyUI gives them,
        None if the CLIP has none) and the token lists."""
        if self.trains_text:
            cond, pooled, token_lists = encode_prompts(self.clip, prompts)
            return self._placed(cond), pooled, token_lists
        for prompt in prompts:
            if prompt not in self._known:
                with torch.no_grad():
                    cond, pooled, token_lists = encode_prompts(self.clip, [prompt])
                self._known[prompt] = (self._placed(cond), pooled, token_lists[0])
        conds, pooled, token_lists = zip(*(self._known[prompt] for prompt in prompts))
        pooled_out = torch.cat(pooled) if all(p is not None for p in pooled) else None
        return torch.cat(conds), pooled_out, list(token_lists)

    def _placed(self, cond: torch.Tensor) -> torch.Tensor:
        # ComfyUI hands text features back on its intermediate device (the CPU): the copy back
        # waits for nothing (the encoder's read-back already did), so it need not block.
        return cond if cond.device == self.device else cond.to(self.device, non_blocking=True)
