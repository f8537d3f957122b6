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

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..attention.tokens import flatten_tokens, phrase_ids
from .concept_set import ConceptSet, base_weight as comfy_weight, check_compatible  # noqa: F401 - re-exported
from .triggers import trigger_positions, with_triggers


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


GENERIC_CAPTIONS = Path(__file__).resolve().parent / "data" / "generic_captions.txt"


def generic_captions(path: Path = GENERIC_CAPTIONS) -> list[str]:
    """The shipped regulariser captions, one per line."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _features(clip: Any, text: str) -> tuple[Tensor, dict]:
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens(tokens)[0].float(), tokens


def _regulariser_features(clip: Any, captions: Sequence[str]) -> Tensor:
    """Text features of every token up to and including each caption's end token."""
    rows = []
    for caption in captions:
        features, tokens = _features(clip, caption)
        stream = flatten_tokens(tokens)
        length = len(phrase_ids(clip, caption)) + 2  # start, words, end
        rows.append(features[: min(length, len(stream))])
    return torch.cat(rows)


def _trigger_features(clip: Any, concepts: ConceptSet) -> Tensor:
    """Features of each trigger's tokens in 'photo of a TRIGGER class' (contextual, like training)."""
    rows = []
    for concept in concepts.concepts:
        features, tokens = _features(clip, f"photo of a {concept.trigger} {concept.class_phrase}")
        vector = concept.embeddings[next(iter(concept.embeddings))]
        positions = trigger_positions(tokens, vector)
        rows.append(features[positions])
    return torch.cat(rows)


def merge_concept_sets(model: Any, clip: Any, sets: Sequence[ConceptSet],
                       captions: Sequence[str] | None = None, ridge: float = 1e-6) -> ConceptSet:
    """One ConceptSet whose K/V deltas keep every set's trigger outputs (closed form, per layer).

    Each concept's token vectors and nested-attention token bank are per concept: they are kept
    as they are (a bank is projected by the merged K/V weights from then on).
    """
    if len(sets) < 2:
        raise ValueError("give at least two concept sets to merge")
    for number, concepts in enumerate(sets, 1):
        if not concepts.concepts:
            raise ValueError(f"concepts_{number} ({concepts.origin()}) holds no concepts, so there is "
                             "nothing of it to merge: connect a set trained with Train Concepts")
    triggers = [t for s in sets for t in s.triggers]
    if len({t.lower() for t in triggers}) != len(triggers):
        raise ValueError(f"trigger words must be unique across the merged sets, got {triggers}: "
                         "rename one when training")
    for concepts in sets:
        check_compatible(concepts, model, clip)
    with torch.inference_mode(False), torch.no_grad():
        every = with_triggers(clip, {c.trigger: c.embeddings for s in sets for c in s.concepts})
        regulariser = _regulariser_features(clip, captions or generic_captions())
        inputs = [_trigger_features(every, s) for s in sets]
        deltas = {}
        for key in sorted({k for s in sets for k in s.kv_deltas}):
            base = comfy_weight(model, key).float()
            targets = [(c, c @ (base + s.kv_deltas.get(key, torch.zeros_like(base)).float()).T)
                       for c, s in zip(inputs, sets)]
            deltas[key] = (merge_projection(base, targets, regulariser, ridge) - base).contiguous()
    merged = ConceptSet([c for s in sets for c in s.concepts], deltas, dict(sets[0].architecture),
                        {"merged_from": [s.describe() for s in sets], "merge_ridge": ridge})
    return merged
