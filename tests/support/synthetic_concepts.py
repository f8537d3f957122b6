"""Concept sets as training would produce them, but drawn at random (fast, for composition tests)."""
from __future__ import annotations

from typing import Any

import torch


def synthetic_set(bundle: Any, triggers: list[str], seed: int, scale: float = 0.05,
                  classes: tuple[str, ...] = ("cat", "dog", "bird")) -> Any:
    """Random K/V deltas on every attn2 layer and one random vector per trigger and encoder."""
    from concept_attention.concepts.concept_set import (Concept, ConceptSet, architecture_fingerprint,
                                                     encoder_widths, kv_weight_shapes)

    g = torch.Generator().manual_seed(seed)
    deltas = {k: scale * torch.randn(shape, generator=g) for k, shape in kv_weight_shapes(bundle.model).items()}
    widths = encoder_widths(bundle.clip)
    concepts = [Concept(t, classes[i % len(classes)],
                        {key: torch.randn(1, w, generator=g) for key, w in widths.items()})
                for i, t in enumerate(triggers)]
    return ConceptSet(concepts, deltas, architecture_fingerprint(bundle.model, bundle.clip))
