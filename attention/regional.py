"""Regional K/V deltas: each region's queries attend with their own concept's keys and values.

Cross-attention with weights ``W0 + dW`` gives ``k = c W0^T + c dW^T``: the delta's effect is an
additive term computed from the text features ``c``. ComfyUI's attn2 replace only receives the
projected ``q, k, v``, so :func:`stash_context` (an ``attn2_patch``, which runs just before the
projections with the same ``extra_options`` dict) keeps the raw features for :class:`RegionalKV`.

For region weights ``w_r`` (resized to the layer's feature map, normalised so they sum to at most
one per pixel) and background ``w_0 = 1 - sum_r w_r``:

    out = w_0 * attn(q, k, v) + sum_r w_r * attn(q, k + c dK_r^T, v + c' dV_r^T)

With ``texts`` (per region, the features of its own version of the positive prompt, usually the
prompt without the other concepts' triggers), a region's queries in the positive (COND) rows read
that text instead of the prompt's: CLIP's text encoder is causal, so every token after a trigger
carries that concept's look, and only a text without the trigger keeps it out of the region.
The background and the negative (UNCOND) rows read the prompt they were given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .calibration import CalibrationSettings, prepare_maps
from .chain import AttentionContext, AttentionFn, AttentionHook, accepts_query_subsets, rows_of
from .on_device import memoized

CONTEXT_KEY = "concept_attention_context"
VALUE_KEY = "concept_attention_value"


def stash_context(n: torch.Tensor, context: torch.Tensor, value: torch.Tensor | None,
                  extra_options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """attn2_patch: remember the text features this layer is about to project; change nothing."""
    extra_options[CONTEXT_KEY] = context
    extra_options[VALUE_KEY] = context if value is None else value
    return n, context, value


def region_weights(masks: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks [R,H,W] (or [B,R,H,W]) -> per-region weights [B?,R,h*w] and background [B?,h*w]."""
    batched = masks.dim() == 4
    m = masks if batched else masks[None]
    m = F.interpolate(m.float(), size=size, mode="area").clamp(0, 1).flatten(2)  # [B,R,N]
    total = m.sum(1, keepdim=True)
    m = m / total.clamp(min=1.0)
    background = 1.0 - m.sum(1)
    return (m, background) if batched else (m[0], background[0])


def regions_from_maps(maps: torch.Tensor, threshold: float = 0.4,
                      settings: CalibrationSettings | None = None) -> torch.Tensor:
    """Class-word maps ``[R,H,W]`` (or ``[B,R,H,W]``) -> disjoint 0/1 region masks of the same shape.

    Maps are calibrated as in training (min-max per map, then the Gaussian); each pixel goes to
    the region whose map is largest there if that value reaches ``threshold``, else to the
    background (no region).
    """
    batched = maps.dim() == 4
    m = maps if batched else maps[None]
    if m.dim() != 4 or m.shape[1] == 0:
        raise ValueError(f"expected class maps [R, H, W] or [B, R, H, W], got {tuple(maps.shape)}")
    calibrated = prepare_maps(m.float(), settings or CalibrationSettings(), is_class=False)
    best, winner = calibrated.max(dim=1, keepdim=True)
    regions = torch.arange(m.shape[1], device=m.device)[None, :, None, None]
    masks = ((winner == regions) & (best >= threshold)).float()
    return masks if batched else masks[0]


def _plus_delta(projected: torch.Tensor, features: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """``projected + features @ delta^T``: a K or V projection with a weight delta added (``delta``
    already on the projection's device and dtype)."""
    return projected if delta is None else projected + features.to(projected.dtype) @ delta.T


@dataclass(frozen=True)
class _Layout:
    """Where each region's weight is, for one feature-map size, batch and device (made once)."""

    weights: torch.Tensor  # [R, N] or [B, R, N]
    background: torch.Tensor  # [N] or [B, N]
    present: tuple[bool, ...]  # per region: any weight anywhere
    # query-subset path (shared weights only): per part, background first, then each region:
    # (query indices with weight, how many, their weights [n]) or None where it has none
    parts: tuple[tuple[torch.Tensor, int, torch.Tensor] | None, ...] = ()


def _layout(masks: torch.Tensor, size: tuple[int, int], batch: int, device: torch.device) -> _Layout:
    weights, background = region_weights(masks.to(device), size)
    if weights.dim() == 3 and weights.shape[0] != batch:  # per image: repeat for cond/uncond
        repeat = batch // weights.shape[0]
        weights, background = weights.repeat(repeat, 1, 1), background.repeat(repeat, 1)
    per_row = weights.dim() == 3
    regions = weights.shape[1] if per_row else weights.shape[0]
    present = tuple(bool((weights[:, r] if per_row else weights[r]).gt(0).any()) for r in range(regions))
    parts = []
    if not per_row:
        for w in [background, *weights]:
            index = (w > 0).nonzero().squeeze(1)
            parts.append((index, index.numel(), w.index_select(0, index)) if index.numel() else None)
    return _Layout(weights, background, present, tuple(parts))


@dataclass(frozen=True, eq=False)
class RegionalKV(AttentionHook):
    """Per-region key/value deltas ``deltas[r] = (dK [inner, ctx], dV [inner, ctx])`` of one layer.

    What it derives from its masks, deltas and texts on the device (resized weights, the queries
    of each region, the deltas in the projections' dtype) is made once per chain and device
    (``AttentionContext.memo``), so a call reads nothing back from the device.
    """

    deltas: tuple[tuple[torch.Tensor | None, torch.Tensor | None], ...] = ()
    masks: torch.Tensor | None = None  # [R,H,W] or [B,R,H,W], any resolution, values in [0,1]
    texts: tuple[torch.Tensor | None, ...] = ()  # per region: [1, T, ctx] its COND queries read
    attention: Any = None  # the layer's attention module, whose to_k / to_v project ``texts``

    def apply(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
              proceed: AttentionFn) -> torch.Tensor:
        context, value = ctx.options.get(CONTEXT_KEY), ctx.options.get(VALUE_KEY)
        if context is None or self.masks is None or ctx.spatial is None:
            raise RuntimeError("RegionalKV needs the stash_context attn2_patch, masks and the layer's "
                               "activation shape; install it with attention.patching.install_regional")
        # Hooks outside this one (nested attention) may have taken appended rows off k and v.
        context, value = context[:, :k.shape[1]], value[:, :v.shape[1]]
        layout = memoized(ctx.memo, (id(self), "layout", ctx.spatial, q.shape[0], q.device),
                          lambda: _layout(self.masks, ctx.spatial, q.shape[0], q.device))
        weights, background = layout.weights, layout.background
        per_row = weights.dim() == 3
        if not per_row and accepts_query_subsets(proceed):
            return self._on_query_subsets(q, k, v, context, value, layout, ctx, proceed)
        out = proceed(q, k, v) * (background[..., None] if per_row else background[None, :, None])
        for r in range(len(self.deltas)):
            if not layout.present[r]:
                continue
            w = weights[:, r, :, None] if per_row else weights[r][None, :, None]
            k_r, v_r = self._region_kv(r, k, v, context, value, ctx)
            out = out + self._attend(q, k_r, v_r, self._text_kv(r, context, k, ctx), ctx, proceed) * w
        return out

    def _delta(self, delta: torch.Tensor | None, like: torch.Tensor, ctx: AttentionContext) -> torch.Tensor | None:
        """``delta`` on ``like``'s device and dtype (made once per chain)."""
        if delta is None:
            return None
        if delta.device == like.device and delta.dtype == like.dtype:
            return delta
        return memoized(ctx.memo, (id(delta), like.device, like.dtype), lambda: delta.to(like))

    def _region_kv(self, region: int, k: torch.Tensor, v: torch.Tensor, context: torch.Tensor,
                   value: torch.Tensor, ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        d_k, d_v = self.deltas[region]
        return (_plus_delta(k, context, self._delta(d_k, k, ctx)),
                _plus_delta(v, value, self._delta(d_v, v, ctx)))

    def _text_kv(self, region: int, context: torch.Tensor, k: torch.Tensor, ctx: AttentionContext
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values ``[1, T, inner]`` of the region's own text, with its deltas; None if none."""
        text = self.texts[region] if region < len(self.texts) else None
        if text is None:
            return None
        if self.attention is None:
            raise RuntimeError("RegionalKV with region texts needs the layer's attention module")
        if text.device != context.device or text.dtype != context.dtype:
            text = memoized(ctx.memo, (id(text), context.device, context.dtype),
                            lambda: text.to(device=context.device, dtype=context.dtype))
        d_k, d_v = self.deltas[region]
        k_text, v_text = self.attention.to_k(text), self.attention.to_v(text)
        if k_text.dtype != k.dtype:  # a patched projection may compute in another precision
            k_text, v_text = k_text.to(k.dtype), v_text.to(k.dtype)
        return (_plus_delta(k_text, text, self._delta(d_k, k_text, ctx)),
                _plus_delta(v_text, text, self._delta(d_v, v_text, ctx)))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                text_kv: tuple[torch.Tensor, torch.Tensor] | None, ctx: AttentionContext,
                proceed: AttentionFn) -> torch.Tensor:
        """Attention of one region's queries: COND rows read the region's own text if it has one."""
        n_cond = len(ctx.row_list("cond"))
        if text_kv is None or n_cond == 0:
            return proceed(q, k, v)
        k_text, v_text = text_kv
        if n_cond == q.shape[0]:
            return proceed(q, k_text.expand(q.shape[0], -1, -1), v_text.expand(q.shape[0], -1, -1))
        cond = ctx.rows("cond", q.device)
        if accepts_query_subsets(proceed):  # stock attention: batch rows are independent too
            other = ctx.rows("uncond", q.device)
            out_cond = proceed(q.index_select(0, cond), rows_of(k_text, cond), rows_of(v_text, cond))
            out_other = proceed(q.index_select(0, other), rows_of(k, other), rows_of(v, other))
            out = out_cond.new_empty(q.shape[0], *out_cond.shape[1:])
            return out.index_copy(0, cond, out_cond).index_copy(0, other, out_other)
        # Another pack's attention may need the whole batch: run it twice and pick rows.
        batch = q.shape[0]
        read_text = proceed(q, k_text.expand(batch, -1, -1), v_text.expand(batch, -1, -1))
        return proceed(q, k, v).index_copy(0, cond, read_text.index_select(0, cond))

    def _on_query_subsets(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: torch.Tensor,
                          value: torch.Tensor, layout: _Layout, ctx: AttentionContext,
                          proceed: AttentionFn) -> torch.Tensor:
        """Same result, but each attention call sees only the queries with weight there.

        With hard (0/1) regions every query is attended once instead of once per region plus
        the background, so regional sampling costs about what stock sampling does.
        """
        n_query = q.shape[1]
        out = None
        whole = [layout.background, *layout.weights]
        for region, part in enumerate(layout.parts, -1):  # -1: the background
            if part is None:
                continue
            index, count, w_part = part
            k_part, v_part = (k, v) if region < 0 else self._region_kv(region, k, v, context, value, ctx)
            text_kv = None if region < 0 else self._text_kv(region, context, k, ctx)
            attend = proceed if text_kv is None else (
                lambda q_, k_, v_, kv=text_kv: self._attend(q_, k_, v_, kv, ctx, proceed))
            if count == n_query:
                term = attend(q, k_part, v_part) * whole[region + 1][None, :, None]
                out = term if out is None else out + term
                continue
            term = attend(q.index_select(1, index), k_part, v_part) * w_part[None, :, None]
            if out is None:
                out = term.new_zeros(q.shape[0], n_query, term.shape[-1])
            out = out.index_add(1, index, term)
        if out is None:  # no weight anywhere cannot happen (background fills the rest); stay safe
            out = proceed(q, k, v)
        return out
