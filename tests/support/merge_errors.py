"""How well a merged K/V weight keeps its constraints and the regulariser's outputs (test measures)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor


def regulariser_error(weight: Tensor, base: Tensor, regulariser: Tensor) -> float:
    """Mean squared change of the regulariser's outputs: ||R (W - W0)^T||^2 / numel."""
    change = regulariser.double() @ (weight.double() - base.double()).T
    return float(change.pow(2).mean())


def constraint_error(weight: Tensor, targets: Sequence[tuple[Tensor, Tensor]]) -> float:
    """Largest absolute deviation of the targets' outputs from the wanted ones."""
    return max(float((c.double() @ weight.double().T - v.double()).abs().max()) for c, v in targets)
