"""Regions found by the concepts themselves: class-word maps over the first sampling steps.

Sampling is split like KSamplerAdvanced: the first steps run with every concept set applied
everywhere while the class words' cross-attention maps are recorded; the maps are calibrated as
in training and turned into one region per set (:func:`~..attention.regional.regions_from_maps`);
the remaining steps run with each set's K/V deltas only inside its region and the base weights
in the background.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Callable, Literal, Sequence

import torch

from ..attention.patching import install_hook, install_regional
from ..attention.recorder import AttentionRecorder, MapStore
from ..attention.regional import regions_from_maps
from ..attention.tokens import find_subsequence, flatten_tokens, phrase_ids
from ..concepts.apply import apply_concepts, scaled_kv_deltas
from ..concepts.concept_set import ConceptSet
from ..concepts.triggers import locate_words_and_triggers

log = logging.getLogger(__name__)

Sampler = Callable[..., dict]


def class_word_positions(clip: Any, text: str, sets: Sequence[ConceptSet]) -> list[list[int]]:
    """Per set, token positions of its concepts' class phrases that follow their triggers in ``text``."""
    stream = flatten_tokens(clip.tokenize(text))
    per_set = []
    for concepts in sets:
        positions: list[int] = []
        for concept in concepts.concepts:
            try:
                trigger = locate_words_and_triggers(clip, text, [concept.trigger])[0]
            except ValueError:
                continue  # this concept is not in the prompt
            ids = phrase_ids(clip, concept.class_phrase)
            starts = [s for s in find_subsequence(stream, ids) if s > trigger[-1]]
            if not starts:
                raise ValueError(f"automatic regions need the class after each trigger: write "
                                 f"'{concept.trigger} {concept.class_phrase}' in the prompt")
            positions += range(starts[0], starts[0] + len(ids))
        if not positions:
            log.warning("no trigger of %s occurs in the prompt: that set gets no region", concepts.describe())
        per_set.append(positions)
    if not any(per_set):
        raise ValueError(f"none of the concepts' triggers ({', '.join(t for s in sets for t in s.triggers)}) "
                         "occurs in the prompt text: automatic regions need them")
    return per_set


def without_words(text: str, words: Sequence[str]) -> str:
    """``text`` with each whole-word occurrence of ``words`` removed and spaces tidied."""
    for word in words:
        text = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def without_concepts(text: str, concepts: Sequence[Any]) -> str:
    """``text`` without each concept's phrase: its trigger, the class after it and an article before."""
    for concept in concepts:
        phrase = rf"(?:(?<!\w)(?i:a|an|the)\s+)?(?<!\w){re.escape(concept.trigger)}" \
                 rf"(?:\s+{re.escape(concept.class_phrase)})?(?!\w)"
        text = re.sub(phrase, " ", text)
    return re.sub(r"\s+", " ", text).strip()


def region_text_features(clip: Any, text: str, sets: Sequence[ConceptSet],
                         drop: Literal["concepts", "triggers"] = "concepts") -> list[torch.Tensor]:
    """Per set, features ``[1, T, ctx]`` of ``text`` without the other sets' concepts.

    What each region reads instead of the prompt: its own concept and the rest of the scene, but
    nothing of the others: with ``drop="concepts"`` their whole phrases go ("a V2 dog"), since a
    region that still reads "dog" may draw one and give it its own look; ``drop="triggers"``
    removes only the trigger words (and so every later token CLIP derived from them).
    """
    if drop not in ("concepts", "triggers"):
        raise ValueError(f"drop must be 'concepts' or 'triggers', not {drop!r}")
    texts = []
    for r in range(len(sets)):
        others = [c for s, concepts in enumerate(sets) if s != r for c in concepts.concepts]
        own_text = (without_concepts(text, others) if drop == "concepts"
                    else without_words(text, [c.trigger for c in others]))
        texts.append(clip.encode_from_tokens_scheduled(clip.tokenize(own_text))[0][0])
    return texts


def sample_auto_regional(sample: Sampler, model: Any, sets: Sequence[ConceptSet], strength: float,
                         per_set: Sequence[Sequence[int]], steps: int, auto_fraction: float,
                         threshold: float, latent: dict, texts: Sequence[torch.Tensor] | None = None,
                         restart: bool = False, **sampling: Any) -> tuple[dict, torch.Tensor]:
    """Two-stage sampling with regions from class-word maps; returns (latent, masks ``[B, R, h, w]``).

    ``texts`` (per set, see :func:`region_text_features`) are what each region reads in the second stage.
    With ``restart`` the first stage only finds the regions: the second samples every step again
    from the same noise with the regions in place, so each concept is drawn in its region from the
    start instead of finishing what the first steps blended with every set everywhere (it costs the
    first stage's steps once more).
    """
    if steps < 2:
        raise ValueError(f"'steps' is {steps}: automatic regions need at least 2 sampling steps (some "
                         "to find the regions, the rest to draw in them)")
    split = min(steps - 1, max(1, round(auto_fraction * steps)))
    combined = model
    for concepts in sets:
        combined, _ = apply_concepts(combined, None, concepts, strength)
    combined = combined.clone()
    store = MapStore()
    store.set_words(per_set)
    install_hook(combined, AttentionRecorder(store=store), "all")
    first = sample(combined, steps=steps, latent=latent, last_step=split, force_full_denoise=False, **sampling)

    samples = first["samples"]
    masks = regions_from_maps(store.word_maps(size=tuple(samples.shape[-2:])), threshold)
    masks = masks[: samples.shape[0]]
    regional = model.clone()
    install_regional(regional, scaled_kv_deltas(sets, strength),
                     masks if masks.shape[0] > 1 else masks[0], texts)
    if restart:
        second = sample(regional, steps=steps, latent=latent, **sampling)
    else:
        second = sample(regional, steps=steps, latent=first, start_step=split, disable_noise=True,
                        force_full_denoise=True, **sampling)
    return second, masks
