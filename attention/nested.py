"""Nested Attention as an efficient cross-attention op (pure torch).

The literal definition (``docs/method.md`` §11) gives every query its own value table in which the subject
token's value ``V[s*]`` is replaced by a nested attention readout ``v*``. It is computed here in
the equivalent form of ``docs/method.md`` §12, which never builds that table:

    O  = softmax(q K^T / sqrt(d) + bias) V            (bias = log(w) on the s* column)
    a  = the share of s* in that softmax, per query and head
    V* = softmax(q K_nested^T / sqrt(d)) V_nested
    O += a * alpha * (V* - V[s*])

:func:`nested_update` starts from the plain output ``softmax(q K^T / sqrt(d)) V`` however it was
computed, so a hook can let the rest of the attention chain (another pack's attention included)
produce it. Rows without a subject (index -1, or no usable nested token) are returned as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .chain import rows_of
from .maps import merge_heads, split_heads
from .on_device import index_tensor

IndexLike = Union[Tensor, int, Sequence[int]]


@dataclass
class NestedKV:
    """One subject in one attention call: its token position per row (-1 = absent), nested keys/values
    and knobs (the node-level description of a subject is ``sampling.nested_subjects.SubjectSpec``,
    the hook-level one ``nested_hook.NestedSource``).

    ``nested_k``/``nested_v`` are projected ``[B or 1, M, heads*d]``; ``nested_mask`` is bool
    ``[B or 1, M]`` (True = usable); ``query_mask`` is bool or float ``[B or 1, Nq]`` and scales
    this subject's update per query (its token weight still applies to every query of the row).
    ``host_index`` is ``subject_index`` as Python ints when the caller knows them: then nothing is
    read back from the device (on a GPU every such read waits for all queued work).
    """

    subject_index: IndexLike
    nested_k: Tensor
    nested_v: Tensor
    nested_mask: Optional[Tensor] = None
    strength: float = 1.0
    token_weight: float = 1.0
    query_mask: Optional[Tensor] = None
    host_index: Optional[Sequence[int]] = None


@dataclass
class _Prepared:
    index: Tensor  # [B] long, -1 where the row gets no update
    rows: Tensor  # [R] long, rows that get the update
    nested_k: Tensor  # [B or 1, h, M, d]
    nested_v: Tensor  # [B or 1, h, M, dv]
    nested_mask: Optional[Tensor]  # [B or 1, M] bool
    strength: float
    log_weight: float  # 0.0 when token_weight == 1
    query_mask: Optional[Tensor]  # [B or 1, Nq]
    row_list: Optional[tuple[int, ...]] = None  # ``rows`` as Python ints, when known without a read


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_batch(name: str, x: Tensor, batch: int) -> None:
    if x.shape[0] not in (1, batch):
        raise ValueError(f"{name} has batch {x.shape[0]}, expected 1 or {batch}")


def _prepare(subject: NestedKV, q: Tensor, v: Tensor, heads: int, n_text: int) -> _Prepared:
    batch, n_query, channels = q.shape
    index = torch.as_tensor(subject.subject_index, dtype=torch.long, device=q.device)
    if index.dim() == 0:
        index = index.expand(batch)
    if index.shape != (batch,):
        raise ValueError(f"subject_index must have shape [{batch}], got {tuple(index.shape)}")
    known = None if subject.host_index is None else tuple(int(i) for i in subject.host_index)
    if known is not None:
        if len(known) != batch or any(not -1 <= i < n_text for i in known):
            raise IndexError(f"subject_index must lie in [-1, {n_text}) for {batch} rows, got {list(known)}")
    elif bool((index >= n_text).any()) or bool((index < -1).any()):
        raise IndexError(f"subject_index must lie in [-1, {n_text}), got {index.tolist()}")

    nested_k, nested_v = subject.nested_k, subject.nested_v
    if nested_k.dim() != 3 or nested_v.dim() != 3 or nested_k.shape[:2] != nested_v.shape[:2]:
        raise ValueError("nested_k and nested_v must be [B or 1, M, C] with matching B and M")
    if nested_k.shape[-1] != channels or nested_v.shape[-1] != v.shape[-1]:
        raise ValueError("nested_k/nested_v channels must match q/v channels")
    _check_batch("nested_k", nested_k, batch)

    active = index >= 0
    mask = subject.nested_mask
    if mask is not None:
        known = None  # rows without a usable nested token drop out: only the device knows which
        mask = mask.to(device=q.device, dtype=torch.bool)
        if mask.dim() != 2 or mask.shape[1] != nested_k.shape[1]:
            raise ValueError(f"nested_mask must be [B or 1, {nested_k.shape[1]}]")
        _check_batch("nested_mask", mask, batch)
        # A row with no usable nested token would make the inner softmax NaN: skip it instead.
        active = active & mask.any(dim=1)
    index = torch.where(active, index, torch.full_like(index, -1))

    query_mask = subject.query_mask
    if query_mask is not None:
        if query_mask.dim() != 2 or query_mask.shape[1] != n_query:
            raise ValueError(f"query_mask must be [B or 1, {n_query}]")
        _check_batch("query_mask", query_mask, batch)
        if query_mask.device != q.device:
            query_mask = query_mask.to(device=q.device)

    weight = float(subject.token_weight)
    if not (weight >= 0 and math.isfinite(weight)):
        raise ValueError(f"token_weight must be finite and >= 0, got {weight}")
    log_weight = math.log(weight) if weight > 0 else -math.inf

    if nested_k.device != q.device or nested_k.dtype != q.dtype:
        nested_k = nested_k.to(device=q.device, dtype=q.dtype)
    if nested_v.device != q.device or nested_v.dtype != q.dtype:
        nested_v = nested_v.to(device=q.device, dtype=q.dtype)
    row_list = None if known is None else tuple(i for i, position in enumerate(known) if position >= 0)
    return _Prepared(
        index=index,
        rows=active.nonzero().squeeze(1) if row_list is None else index_tensor(row_list, q.device),
        nested_k=split_heads(nested_k, heads),
        nested_v=split_heads(nested_v, heads),
        nested_mask=mask,
        strength=float(subject.strength),
        log_weight=log_weight,
        query_mask=query_mask,
        row_list=row_list,
    )


def _gates(qh: Tensor, kh: Tensor, subjects: List[_Prepared], rows: Tensor, scale: float) -> List[Tensor]:
    """Each subject's share of the plain outer softmax, ``[R, h, Nq, 1]`` over ``rows`` (0 elsewhere).

    SDPA does not return its probabilities, so the small T-wide logits are recomputed once (scale
    on the narrower q; one fused softmax, several times faster on CPU than logsumexp + exp).
    """
    cdtype = _compute_dtype(qh.dtype)
    q, k = qh.index_select(0, rows).to(cdtype), kh.index_select(0, rows).to(cdtype)
    probs = torch.softmax(torch.matmul(q * scale, k.transpose(-1, -2)), dim=-1)
    n_rows, heads, n_query, _ = probs.shape
    gates = []
    for s in subjects:
        column = s.index.index_select(0, rows).clamp(min=0)
        picked = probs.gather(-1, column[:, None, None, None].expand(n_rows, heads, n_query, 1))
        active = (s.index.index_select(0, rows) >= 0).to(cdtype)[:, None, None, None]
        gates.append(picked * active)
    return gates


def nested_update(
    out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    subjects: Sequence[NestedKV],
    *,
    scale: Optional[float] = None,
    exclusive: bool = False,
) -> Tensor:
    """Turn a plain cross-attention output ``[B, Nq, h*dv]`` into the nested one (same shape).

    ``out`` must be ``softmax(q k^T * scale) v``, however it was computed (another pack's attention
    included). Token weights are applied exactly on top of it: with plain shares ``a_j`` of the
    subject columns, re-weighting column j by ``w_j`` gives
    ``O' = (O + sum_j (w_j - 1) a_j v_j) / (1 + sum_j (w_j - 1) a_j)`` and shares
    ``a'_j = w_j a_j / (1 + sum_j (w_j - 1) a_j)``; then ``O' += a'_j * alpha_j * (V*_j - v_j)``.
    With ``exclusive`` each query takes the update of only the subject it attends to most
    (head-averaged share), so several subjects in one prompt cannot blend into each other.
    Rows without an active subject are returned untouched.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("q, k, v must be projected [B, N, heads*d] tensors")
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[1] != v.shape[1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if out.shape[:2] != q.shape[:2] or out.shape[-1] != v.shape[-1]:
        raise ValueError(f"out {tuple(out.shape)} does not match q {tuple(q.shape)} and v {tuple(v.shape)}")
    n_text = k.shape[1]
    prepared = [_prepare(s, q, v, heads, n_text) for s in subjects]
    prepared = [s for s in prepared if s.rows.numel() > 0]
    if not prepared:
        return out
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    if scale is None:
        scale = qh.shape[-1] ** -0.5
    known = all(s.row_list is not None for s in prepared)
    if known:  # the rows are known on the host: no unique/searchsorted to read back
        union = tuple(sorted(set().union(*(s.row_list for s in prepared))))
        rows = index_tensor(union, q.device)
    else:
        rows = torch.unique(torch.cat([s.rows for s in prepared]))
    cdtype = _compute_dtype(q.dtype)
    gates = _gates(qh, kh, prepared, rows, scale)
    v_rows = vh.index_select(0, rows).to(cdtype)
    result = split_heads(out, heads).index_select(0, rows).to(cdtype)

    subject_values = []
    for s in prepared:
        column = s.index.index_select(0, rows).clamp(min=0)
        subject_values.append(v_rows.gather(2, column[:, None, None, None].expand(-1, heads, 1, v_rows.shape[-1])))
    if any(s.log_weight != 0.0 for s in prepared):
        extra = [(math.exp(s.log_weight) - 1.0) * g for s, g in zip(prepared, gates)]
        denominator = 1.0 + sum(extra)
        result = (result + sum(e * vs for e, vs in zip(extra, subject_values))) / denominator
        gates = [math.exp(s.log_weight) * g / denominator for s, g in zip(prepared, gates)]

    winner = None
    if exclusive and len(prepared) > 1:
        shares = torch.stack([g.mean(dim=1)[..., 0] for g in gates])  # [S, R, Nq]
        winner = shares.argmax(dim=0)
    for j, (s, gate, v_subject) in enumerate(zip(prepared, gates, subject_values)):
        if winner is not None:
            gate = gate * (winner == j).to(cdtype)[:, None, :, None]
        local = (index_tensor(tuple(union.index(r) for r in s.row_list), q.device) if known
                 else torch.searchsorted(rows, s.rows))
        nested_mask = None
        if s.nested_mask is not None:
            nested_mask = rows_of(s.nested_mask, s.rows)[:, None, None, :]
        v_star = F.scaled_dot_product_attention(
            qh.index_select(0, s.rows), rows_of(s.nested_k, s.rows), rows_of(s.nested_v, s.rows),
            attn_mask=nested_mask, scale=scale,
        ).to(cdtype)
        update = gate.index_select(0, local) * s.strength * (v_star - v_subject.index_select(0, local))
        if s.query_mask is not None:
            update = update * rows_of(s.query_mask, s.rows).to(cdtype)[:, None, :, None]
        result = result.index_add(0, local, update)

    merged = merge_heads(result.to(out.dtype))
    return out.index_copy(0, rows, merged)


