"""Nested attention inside ComfyUI's cross-attention: subjects, how rows find them, and the hook.

Two pieces cooperate in every hooked layer:

- :class:`NestedContextPatch` (an ``attn2_patch``, run before the layer projects its text
  features) finds each subject's token in every batch row and appends the token-bank subjects'
  tokens to the text features, so the layer's own ``to_k``/``to_v`` (with every weight patch on
  them: LoRA, concept deltas, trainable deltas during training) turn them into nested keys/values.
- :class:`NestedAttentionHook` (in the attention chain) takes those extra rows off again, lets the
  rest of the chain compute the plain attention over the prompt, and adds the nested update
  (:func:`~.nested.nested_update`).

A row gets a subject's update only where its text features at the subject's position equal the
features the subject was located in (its *signature*): the prompt's own rows, never the negative
prompt's or another prompt's.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from .chain import CALL_MEMO_KEY, AttentionContext, AttentionFn, AttentionHook
from .layers import LayerKey
from .nested import NestedKV, nested_update
from .on_device import keep_device, memoized

RECORD_KEY = "concept_attention_nested"
SIGNATURE_TOLERANCE = 2e-2  # relative; loose enough for fp16/bf16 text features
_ids = itertools.count()


@dataclass(frozen=True, eq=False)
class NestedSource:
    """One subject word with its nested keys/values and knobs.

    Exactly one of ``bank`` (``[M, context_dim]`` tokens in text-feature space, projected by each
    layer's own ``to_k``/``to_v``) or ``layer_kv`` (precomputed ``(keys, values)`` of shape
    ``[M, inner_dim]`` per layer key, e.g. from an image encoder) is set. ``position`` is the
    subject token's row in the encoded prompt and ``signature`` the text features there
    (``None``: every row, as in training); ``index`` overrides both with an explicit per-row
    position tensor. ``region`` (``[H, W]`` in [0, 1]) confines the update to part of the image;
    the subject acts only while the sampling sigma lies in ``[sigma_min, sigma_max]``.
    """

    name: str
    position: int = -1
    signature: torch.Tensor | None = None
    bank: torch.Tensor | None = None
    layer_kv: Mapping[LayerKey, tuple[torch.Tensor, torch.Tensor]] | None = None
    strength: float = 1.0
    token_weight: float = 1.0
    region: torch.Tensor | None = None
    index: torch.Tensor | None = None
    sigma_max: float = float("inf")
    sigma_min: float = 0.0

    def __post_init__(self) -> None:
        if (self.bank is None) == (self.layer_kv is None):
            raise ValueError(f"subject {self.name!r} needs exactly one of a token bank or per-layer keys/values")
        if self.bank is not None and (self.bank.dim() != 2 or self.bank.shape[0] == 0):
            raise ValueError(f"token bank of {self.name!r} must be [M, context_dim] with M >= 1, "
                             f"got {tuple(self.bank.shape)}")

    @property
    def has_window(self) -> bool:
        """Whether the subject acts only for some sigmas (then sigma must be read)."""
        return self.sigma_min > 0.0 or self.sigma_max != math.inf

    def rows_index(self, context: torch.Tensor, sigma: float | None = None,
                   memo: dict | None = None) -> torch.Tensor:
        """Subject position per row of ``context`` ``[B, T, C]``, -1 where the row lacks it
        (``memo`` keeps the signature's device copy)."""
        batch, n_text = context.shape[:2]
        if sigma is not None and not self.sigma_min <= sigma <= self.sigma_max:
            return torch.full((batch,), -1, dtype=torch.long, device=context.device)
        if self.index is not None:
            index = self.index if self.index.device == context.device else self.index.to(context.device)
            return index.expand(batch)
        if not 0 <= self.position < n_text:
            return torch.full((batch,), -1, dtype=torch.long, device=context.device)
        if self.signature is None:
            return torch.full((batch,), self.position, dtype=torch.long, device=context.device)
        found = context[:, self.position].float()
        signature = memoized({} if memo is None else memo, (id(self.signature), found.device, found.dtype),
                             lambda: self.signature.to(found))
        if signature.shape[-1] != found.shape[-1]:
            return torch.full((batch,), -1, dtype=torch.long, device=context.device)
        error = (found - signature).norm(dim=-1) / signature.norm().clamp(min=1e-6)
        return torch.where(error < SIGNATURE_TOLERANCE, self.position, -1).to(torch.long)


@dataclass(frozen=True, eq=False)
class _Record:
    """What the context patch found in one layer call, for the hook of the same call."""

    owner: int
    n_text: int
    indices: tuple[torch.Tensor, ...]
    bank_slices: tuple[slice | None, ...]
    positions: tuple[tuple[int, ...], ...]  # ``indices`` as Python ints (read once per evaluation)


@dataclass(frozen=True, eq=False)
class NestedContextPatch:
    """``attn2_patch``: locate subjects per row and append token banks to the text features."""

    subjects: tuple[NestedSource, ...]
    layer_keys: frozenset
    uid: int = field(default_factory=lambda: next(_ids))
    # Device copies of the subjects' constant tensors (signatures, banks that do not train).
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor | None,
                 extra_options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        extra_options.pop(RECORD_KEY, None)
        ctx = AttentionContext(extra_options, context.shape[0])
        if ctx.key not in self.layer_keys:
            return n, context, value
        value = context if value is None else value
        batch, n_text = context.shape[:2]
        indices, positions = self._locate(context, ctx)
        if all(p < 0 for row in positions for p in row):
            return n, context, value
        slices, banks, start = [], [], n_text
        for s in self.subjects:
            if s.bank is None:
                slices.append(None)
                continue
            slices.append(slice(start, start + s.bank.shape[0]))
            start += s.bank.shape[0]
            banks.append(self._bank(s.bank, context))
        if banks:
            tokens = torch.cat(banks)[None].expand(batch, -1, -1)
            context = torch.cat([context, tokens], dim=1)
            value = torch.cat([value, tokens if tokens.dtype == value.dtype else tokens.to(value.dtype)], dim=1)
        extra_options[RECORD_KEY] = _Record(self.uid, n_text, indices, tuple(slices), positions)
        return n, context, value

    def _locate(self, context: torch.Tensor, ctx: AttentionContext
                ) -> tuple[tuple[torch.Tensor, ...], tuple[tuple[int, ...], ...]]:
        """Each subject's position per row, on the device and as Python ints.

        Every layer of one model evaluation gets the same text features, so they are located
        once per evaluation (kept in its ``CALL_MEMO_KEY`` dict): one read back from the device.
        """
        call = ctx.options.get(CALL_MEMO_KEY)
        known = call.get(("nested", self.uid)) if call is not None else None
        if known is not None and known[0] is context:
            return known[1], known[2]
        sigma = ctx.sigma if any(s.has_window for s in self.subjects) else None
        indices = tuple(s.rows_index(context, sigma, self.memo) for s in self.subjects)
        positions = tuple(tuple(row) for row in torch.stack(indices).tolist())
        if call is not None:
            call[("nested", self.uid)] = (context, indices, positions)
        return indices, positions

    def _bank(self, bank: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """A token bank on the context's device and dtype: as it is while it trains (the copy
        must carry its gradient), else a copy made once."""
        if bank.device == context.device and bank.dtype == context.dtype:
            return bank
        if bank.requires_grad:
            return bank.to(context)
        return memoized(self.memo, (id(bank), context.device, context.dtype), lambda: bank.to(context))

    def to(self, *args: Any, **kwargs: Any) -> "NestedContextPatch":
        """ComfyUI moves patches with ``.to`` when it loads or offloads the model: forget the
        copies on other devices."""
        keep_device(self.memo, *args, **kwargs)
        return self

    def __deepcopy__(self, memo: dict) -> "NestedContextPatch":
        # Frozen, and nothing in the pack changes it or its subjects, so a clone (ModelPatcher.clone
        # deep-copies model_options) shares it instead of copying every bank. The one writer of
        # its tensors is the trainer that built them, on purpose (training/parameters.py, bank_index).
        return self


@dataclass(frozen=True, eq=False)
class NestedAttentionHook(AttentionHook):
    """Chain hook: strips the appended bank rows, runs the chain, adds the nested update."""

    patch: NestedContextPatch | None = None
    exclusive: bool = True

    def is_active(self, ctx: AttentionContext) -> bool:
        return True  # must always run: the patch decides, and appended rows must come off

    def apply(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
              proceed: AttentionFn) -> torch.Tensor:
        record = ctx.options.get(RECORD_KEY)
        if not isinstance(record, _Record) or self.patch is None or record.owner != self.patch.uid:
            return proceed(q, k, v)
        n_text = record.n_text
        k_text, v_text = k[:, :n_text], v[:, :n_text]
        out = proceed(q, k_text, v_text)
        subjects = []
        for source, index, bank, positions in zip(self.patch.subjects, record.indices,
                                                  record.bank_slices, record.positions):
            if all(p < 0 for p in positions):
                continue
            if bank is not None:
                nested_k, nested_v = k[:, bank], v[:, bank]
            elif ctx.key not in source.layer_kv:
                continue
            else:
                # [M, inner] for every row, or [B, M, inner] per row (a training batch)
                nested_k, nested_v = (_on(t if t.dim() == 3 else t[None], q, ctx)
                                      for t in source.layer_kv[ctx.key])
            subjects.append(NestedKV(index, nested_k, nested_v, strength=source.strength,
                                     token_weight=source.token_weight,
                                     query_mask=_region(source.region, ctx, q.device),
                                     host_index=positions))
        return nested_update(out, q, k_text, v_text, ctx.heads, subjects, exclusive=self.exclusive)


def _on(tensor: torch.Tensor, like: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """A constant tensor on ``like``'s device and dtype, copied once per chain."""
    if tensor.device == like.device and tensor.dtype == like.dtype:
        return tensor
    return memoized(ctx.memo, (id(tensor), like.device, like.dtype), lambda: tensor.to(like))


def _region(region: torch.Tensor | None, ctx: AttentionContext, device: torch.device) -> torch.Tensor | None:
    """A subject's region resized to this layer's queries, ``[1, H*W]`` on ``device`` (made once
    per chain)."""
    if region is None:
        return None
    if ctx.spatial is None:
        raise RuntimeError("a nested subject's region needs the layer's activation shape")

    def resized() -> torch.Tensor:
        small = F.interpolate(region[None, None].float(), size=ctx.spatial, mode="area")
        return small.flatten(1).clamp(0, 1).to(device)
    return memoized(ctx.memo, (id(region), "region", ctx.spatial, device), resized)
