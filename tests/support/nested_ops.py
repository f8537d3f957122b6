"""Whole cross-attention calls with nested subjects, built on the pack's ``nested_update`` (test helper).

The pack only ever adds the nested update to an output the attention chain computed; these compute
that output with plain SDPA first, so the math can be checked on its own.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor

from concept_attention.attention.maps import merge_heads, split_heads
from concept_attention.attention.nested import IndexLike, NestedKV, nested_update


def nested_attention_multi(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    subjects: Sequence[NestedKV],
    *,
    scale: Optional[float] = None,
) -> Tensor:
    """Cross-attention with several nested subjects whose updates add up; returns ``[B, Nq, h*dv]``.

    All subjects' token weights bias the same outer softmax, so each gate sees all of them.
    Subjects should use distinct token positions within a row.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("q, k, v must be projected [B, N, heads*d] tensors")
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[1] != v.shape[1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    if scale is None:
        scale = qh.shape[-1] ** -0.5
    out = merge_heads(F.scaled_dot_product_attention(qh, kh, vh, scale=scale))
    return nested_update(out, q, k, v, heads, subjects, scale=scale)


def nested_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    subject_index: IndexLike,
    nested_k: Tensor,
    nested_v: Tensor,
    *,
    nested_mask: Optional[Tensor] = None,
    strength: float = 1.0,
    token_weight: float = 1.0,
    scale: Optional[float] = None,
) -> Tensor:
    """Cross-attention where subject token s* reads its value from nested keys/values; ``[B, Nq, h*dv]``."""
    subject = NestedKV(
        subject_index=subject_index,
        nested_k=nested_k,
        nested_v=nested_v,
        nested_mask=nested_mask,
        strength=strength,
        token_weight=token_weight,
    )
    return nested_attention_multi(q, k, v, heads, [subject], scale=scale)
