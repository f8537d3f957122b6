"""Put learned concepts into a MODEL and a CLIP (clones), as Apply and Train return them."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .concept_set import ConceptSet, check_compatible
from .triggers import with_triggers


def apply_concepts(model: Any, clip: Any, concepts: ConceptSet,
                   strength: float = 1.0) -> tuple[Any, Any]:
    """K/V deltas as weight patches (they stack with LoRA patches) and triggers in the tokenizer.

    Returns patched clones; either input may be None to patch only the other.
    """
    check_strength(strength)
    check_compatible(concepts, model, clip)
    patched_model = None
    if model is not None:
        patched_model = model.clone()
        patches = {key: ("diff", (delta,)) for key, delta in concepts.kv_deltas.items()}
        applied = patched_model.add_patches(patches, strength)
        if len(applied) != len(patches):
            missing = sorted(set(patches) - set(applied))[:3]
            raise ValueError(f"the model has no weights {missing}...: these concepts do not fit it")
    patched_clip = None
    if clip is not None:
        patched_clip = with_triggers(clip, {c.trigger: c.embeddings for c in concepts.concepts})
    return patched_model, patched_clip


def scaled_kv_deltas(sets: Sequence[ConceptSet], strength: float = 1.0) -> list[dict[str, torch.Tensor]]:
    """Each set's K/V deltas times ``strength``, for regional composition (one dict per set)."""
    check_strength(strength)
    return [{key: strength * delta for key, delta in s.kv_deltas.items()} for s in sets]


def check_strength(strength: float, name: str = "strength") -> float:
    """A concept strength is a finite number (NaN or infinity would sample black pictures)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"'{name}' must be a finite number, got {strength!r}: use 1.0 for the "
                         "concepts as trained, 0 for none")
    return float(strength)
