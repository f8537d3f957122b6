"""Per-token cross-attention probability maps and their aggregation (pure torch).

Conventions:
- Projected tensors are ``[B, N, heads * d]``; split tensors are ``[B, heads, N, d]``.
- A query index ``n`` on an ``H x W`` latent grid is row-major: ``n = y * W + x``.
- Probabilities are computed in float32 (float64 stays float64) and returned in that compute
  dtype, never in half precision, because the losses built on them need the precision.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_heads(x: Tensor, heads: int) -> Tensor:
    """Reshape ``[B, N, heads*d]`` into ``[B, heads, N, d]``."""
    if x.dim() != 3:
        raise ValueError(f"expected a [B, N, heads*d] tensor, got shape {tuple(x.shape)}")
    batch, tokens, channels = x.shape
    if heads <= 0 or channels % heads != 0:
        raise ValueError(f"channel count {channels} is not divisible by heads={heads}")
    return x.reshape(batch, tokens, heads, channels // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """Reshape ``[B, heads, N, d]`` into ``[B, N, heads*d]`` (inverse of ``split_heads``)."""
    if x.dim() != 4:
        raise ValueError(f"expected a [B, heads, N, d] tensor, got shape {tuple(x.shape)}")
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


def _logits(q: Tensor, k: Tensor, heads: int, scale: Optional[float]) -> Tensor:
    """Scaled logits ``q k^T * scale`` as ``[B, heads, Nq, Nk]`` in the compute dtype."""
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not match")
    dtype = _compute_dtype(q.dtype)
    qh = split_heads(q, heads).to(dtype)
    kh = split_heads(k, heads).to(dtype)
    if scale is None:
        scale = qh.shape[-1] ** -0.5
    return torch.matmul(qh, kh.transpose(-1, -2)) * scale


def token_probs(
    q: Tensor,
    k: Tensor,
    heads: int,
    token_index: Tensor,
    scale: Optional[float] = None,
    check: bool = True,
) -> Tensor:
    """Return the probability columns of chosen keys, ``[B, heads, Nq, T]``; softmax is over all keys.

    ``token_index`` is ``[T]`` (same positions for every row) or ``[B, T]`` (per row). ``check``
    off skips the range check, which reads the positions back (a host sync on a GPU), for callers
    that checked them already.
    """
    logits = _logits(q, k, heads, scale)
    batch, n_heads, n_query, n_keys = logits.shape
    index = torch.as_tensor(token_index, dtype=torch.long, device=logits.device)
    if index.dim() == 1:
        index = index.unsqueeze(0).expand(batch, -1)
    if index.dim() != 2 or index.shape[0] != batch:
        raise ValueError(f"token_index must be [T] or [{batch}, T], got {tuple(index.shape)}")
    if check and index.numel() and (bool((index < 0).any()) or bool((index >= n_keys).any())):
        raise IndexError(f"token_index out of range for {n_keys} keys")
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    gather_index = index[:, None, None, :].expand(batch, n_heads, n_query, index.shape[1])
    return torch.exp(torch.gather(logits, -1, gather_index) - lse)


def maps_to_grid(probs_tok: Tensor, height: int, width: int) -> Tensor:
    """Reshape ``[B, heads, Nq, T]`` token columns into ``[B, heads, T, H, W]`` spatial maps."""
    if probs_tok.dim() != 4:
        raise ValueError(f"expected [B, heads, Nq, T], got shape {tuple(probs_tok.shape)}")
    batch, heads, n_query, tokens = probs_tok.shape
    if n_query != height * width:
        raise ValueError(f"Nq={n_query} does not equal height*width={height}*{width}")
    return probs_tok.permute(0, 1, 3, 2).reshape(batch, heads, tokens, height, width)


def aggregate_maps(
    layer_maps: Sequence[Tensor],
    size: Optional[Tuple[int, int]] = None,
) -> Tensor:
    """Average ``[B, heads, T, H, W]`` maps over heads, then over layers, into ``[B, T, H, W]``.

    Each layer is first averaged over its own heads, so layers weigh equally even if their head
    counts differ. When ``size`` is given, every layer whose ``(H, W)`` differs from it is resized
    with bilinear interpolation (``align_corners=False``, no antialiasing) before the layer mean;
    ``size`` is required when the layers' sizes differ.
    """
    if len(layer_maps) == 0:
        raise ValueError("aggregate_maps needs at least one layer")
    per_layer = []
    for i, layer in enumerate(layer_maps):
        if layer.dim() != 5:
            raise ValueError(f"layer {i}: expected [B, heads, T, H, W], got {tuple(layer.shape)}")
        per_layer.append(layer.mean(dim=1))
    lead = per_layer[0].shape[:2]
    if any(m.shape[:2] != lead for m in per_layer):
        raise ValueError("all layers must share the batch and token dimensions")
    sizes = {tuple(m.shape[-2:]) for m in per_layer}
    if size is None:
        if len(sizes) > 1:
            raise ValueError(
                f"layers have different spatial sizes {sorted(sizes)}; pass size=(H, W) to resize"
            )
    else:
        target = (int(size[0]), int(size[1]))
        resized = []
        for m in per_layer:
            if tuple(m.shape[-2:]) != target:
                logger.debug("resizing attention maps %s -> %s", tuple(m.shape[-2:]), target)
                m = F.interpolate(m, size=target, mode="bilinear", align_corners=False)
            resized.append(m)
        per_layer = resized
    return torch.stack(per_layer, dim=0).mean(dim=0)


def minmax_normalize(maps: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale each ``[..., H, W]`` map to ``(x - min) / (max - min + eps)`` over its spatial dims."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low + eps)
