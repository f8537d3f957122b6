"""Put learned concepts into a MODEL and a CLIP (clones), as Apply and Train return them."""
from __future__ import annotations

from typing import Any

from .concepts import ConceptSet, check_compatible
from .triggers import with_triggers


def apply_concepts(model: Any, clip: Any, concepts: ConceptSet,
                   strength: float = 1.0) -> tuple[Any, Any]:
    """K/V deltas as weight patches (they stack with LoRA patches) and triggers in the tokenizer.

    Returns patched clones; either input may be None to patch only the other.
    """
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
