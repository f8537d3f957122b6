"""Function-preserving widening of the toy UNet (Net2Wider): every channel doubled, same outputs.

A UNet trained at ``model_channels`` C becomes one at 2C that predicts exactly the same noise, so
pretraining can go on from it instead of from scratch. Each channel is duplicated in place
(channel ``c`` becomes ``2c`` and ``2c + 1``):

- a weight's output axis repeats its rows; its input axis repeats its columns at half the weight,
  so a layer fed duplicated channels computes what it computed before;
- GroupNorm(32) groups then hold the duplicates of one old group (same mean and variance), and a
  LayerNorm over duplicated channels has the old statistics;
- attention keeps its head count, so each head holds its old channels twice: ``q . k`` doubles
  while the softmax scale falls by sqrt(2), so ``to_q`` is scaled by 1/sqrt(2) to keep the logits;
- the timestep embedding of width 2C holds the C-wide one's frequencies at its even indices
  (``timestep_embedding`` uses ``10000^(-j / half)``), so the first time MLP layer reads only those.

Uniform doubling is the only widening that keeps the function exactly: widening one level alone
changes which channels a GroupNorm group of a skip concatenation holds, and a res block whose
1x1 skip convolution becomes an identity cannot keep the old mapping.
"""
from __future__ import annotations

import math

import torch

FACTOR = 2


def _sinusoid_columns(old: torch.Tensor, new_in: int) -> torch.Tensor:
    """``time_embed.0.weight`` [out, C] -> [out, 2C] reading the same frequencies."""
    half_old, half_new = old.shape[1] // 2, new_in // 2
    widened = torch.zeros(old.shape[0], new_in, dtype=old.dtype)
    for k in range(half_old):
        widened[:, FACTOR * k] = old[:, k]  # cos of frequency k
        widened[:, half_new + FACTOR * k] = old[:, half_old + k]  # sin of frequency k
    return widened


def widen_tensor(key: str, old: torch.Tensor, new_shape: torch.Size) -> torch.Tensor:
    """One parameter of the 2C UNet from its C-wide value (see the module docstring)."""
    out = old
    if key == "time_embed.0.weight":
        out = _sinusoid_columns(old, new_shape[1])
    elif old.ndim >= 2 and new_shape[1] == FACTOR * old.shape[1]:
        out = out.repeat_interleave(FACTOR, dim=1) / FACTOR
    if old.ndim >= 1 and new_shape[0] == FACTOR * old.shape[0]:
        out = out.repeat_interleave(FACTOR, dim=0)
    if key.endswith(("attn1.to_q.weight", "attn2.to_q.weight")):
        out = out / math.sqrt(FACTOR)
    if tuple(out.shape) != tuple(new_shape):
        raise ValueError(f"cannot widen {key}: {tuple(old.shape)} -> {tuple(new_shape)}")
    return out.contiguous()


def widen_state_dict(old: dict[str, torch.Tensor], new_shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Every parameter of the widened UNet (``new_shapes``: its state dict's shapes)."""
    if set(old) != set(new_shapes):
        missing, extra = sorted(set(new_shapes) - set(old)), sorted(set(old) - set(new_shapes))
        raise ValueError(f"the UNets differ in layers: missing {missing[:3]}, extra {extra[:3]}")
    return {key: widen_tensor(key, old[key].float(), new_shapes[key]) for key in new_shapes}
