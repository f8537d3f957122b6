"""Closed-form merge of separately trained K/V weights (Custom Diffusion's constrained least squares).

For one projection with base weight ``W0`` (out x in), find ``W`` that

    minimises  || R W^T - R W0^T ||_F^2          (other text keeps its base outputs)
    subject to  C W^T = V                        (each concept's tokens keep their trained outputs)

where ``R`` [n, in] are text features of generic captions (the regulariser), ``C`` [m, in] the
features of the concepts' tokens and ``V`` [m, out] their outputs under each concept's own trained
weights. With ``A = R^T R + ridge I``, the Lagrangian gives

    W = W0 + (V^T - W0 C^T) (C A^-1 C^T)^+ C A^-1

so the constraints hold exactly whenever the target features are linearly independent.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def merge_projection(base: Tensor, targets: Sequence[tuple[Tensor, Tensor]], regulariser: Tensor,
                     ridge: float = 1e-6) -> Tensor:
    """Merged weight [out, in] from ``targets`` = [(inputs [m_i, in], wanted outputs [m_i, out])]."""
    if not targets:
        return base.clone()
    w0 = base.double()
    inputs = torch.cat([c for c, _ in targets]).double()
    outputs = torch.cat([v for _, v in targets]).double()
    if inputs.shape[1] != w0.shape[1] or outputs.shape[1] != w0.shape[0]:
        raise ValueError(f"target shapes {tuple(inputs.shape)} -> {tuple(outputs.shape)} do not fit "
                         f"a weight of shape {tuple(w0.shape)}")
    reg = regulariser.double()
    gram = reg.T @ reg
    scale = float(gram.diagonal().mean()) or 1.0
    gram = gram + ridge * scale * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    a_inv_ct = torch.linalg.solve(gram, inputs.T)  # [in, m]
    system = inputs @ a_inv_ct  # [m, m]
    residual = outputs.T - w0 @ inputs.T  # [out, m]
    update = residual @ torch.linalg.pinv(system, hermitian=True) @ a_inv_ct.T
    return (w0 + update).to(base.dtype)


def regulariser_error(weight: Tensor, base: Tensor, regulariser: Tensor) -> float:
    """Mean squared change of the regulariser's outputs: ||R (W - W0)^T||^2 / numel."""
    change = regulariser.double() @ (weight.double() - base.double()).T
    return float(change.pow(2).mean())


def constraint_error(weight: Tensor, targets: Sequence[tuple[Tensor, Tensor]]) -> float:
    """Largest absolute deviation of the targets' outputs from the wanted ones."""
    return max(float((c.double() @ weight.double().T - v.double()).abs().max()) for c, v in targets)
