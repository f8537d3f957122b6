"""Nested-attention subjects as nodes pass them around, and how they become hook sources.

A :class:`SubjectSpec` says *what* a subject word should look like (a learned token bank, or
per-layer keys/values from an image encoder) and with which knobs; :func:`build_sources` finds the
word in an encoded prompt and turns specs into :class:`~..attention.nested_hook.NestedSource`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from ..attention.layers import CrossAttentionLayer, LayerKey
from ..attention.nested_hook import NestedSource
from ..concepts.triggers import locate_words_and_triggers

LayerKV = Mapping[LayerKey, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SubjectSpec:
    """One subject word and where its nested keys/values come from.

    ``bank``: ``[M, context_dim]`` tokens in text-feature space. ``layer_kv``: a function from the
    model's cross-attention layers to ``(keys, values)`` ``[M, inner_dim]`` per layer key.
    """

    word: str
    bank: torch.Tensor | None = None
    layer_kv: Callable[[Sequence[CrossAttentionLayer]], LayerKV] | None = None
    strength: float = 1.0
    token_weight: float = 1.0
    region: torch.Tensor | None = None  # [H, W] in [0, 1]
    sigma_max: float = float("inf")
    sigma_min: float = 0.0

    def with_knobs(self, **knobs: Any) -> "SubjectSpec":
        """A copy with other strength/token_weight/region/sigma settings."""
        return replace(self, **knobs)


def encode_prompt(clip: Any, text: str) -> tuple[list, torch.Tensor]:
    """CONDITIONING as CLIPTextEncode makes it, and the text features ``[T, C]`` of its first entry."""
    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return conditioning, conditioning[0][0][0]


def subject_position(clip: Any, text: str, word: str) -> int:
    """Row of the subject word's last token in the encoded prompt (its first occurrence).

    A learned trigger (a CLIP from Apply/Train Concepts) is found where its vector was spliced in.
    """
    positions = locate_words_and_triggers(clip, text, [word])[0]
    return positions[-1]


def build_sources(clip: Any, text: str, features: torch.Tensor, specs: Sequence[SubjectSpec],
                  layers: Sequence[CrossAttentionLayer]) -> list[NestedSource]:
    """Hook sources for ``specs``, located in ``text`` whose text features are ``features`` ``[T, C]``."""
    words = [s.word for s in specs]
    if len(set(words)) != len(words):
        raise ValueError(f"subject words must differ, got {words}")
    sources = []
    for spec in specs:
        position = subject_position(clip, text, spec.word)
        if position >= features.shape[0]:
            raise ValueError(f"the subject word {spec.word!r} lies beyond the encoded prompt")
        bank, layer_kv = spec.bank, None
        if bank is not None and bank.shape[-1] != features.shape[-1]:
            raise ValueError(f"the token bank for {spec.word!r} has width {bank.shape[-1]} but this "
                             f"text encoder's features have width {features.shape[-1]}: it was "
                             "learned on another model architecture")
        if spec.layer_kv is not None:
            layer_kv = spec.layer_kv(layers)
        sources.append(NestedSource(
            name=spec.word, position=position, signature=features[position].detach().float().clone(),
            bank=None if bank is None else bank.detach().float(), layer_kv=layer_kv,
            strength=spec.strength, token_weight=spec.token_weight, region=spec.region,
            sigma_max=spec.sigma_max, sigma_min=spec.sigma_min))
    return sources


def with_concept_banks(model: Any, clip: Any, text: str, concepts: Any) -> Any:
    """``model`` (a clone) with nested attention for every banked concept whose trigger is in ``text``.

    ``clip`` must know the triggers (a CLIP from Apply/Train Concepts); the prompt's own encoding
    locates them, so sample with conditioning encoded from the same ``clip`` and ``text``.
    """
    from ..attention.patching import install_nested, model_layers

    specs = []
    for concept in concepts.concepts:
        if concept.bank is None:
            continue
        try:
            subject_position(clip, text, concept.trigger)
        except ValueError:
            continue  # not in this prompt
        specs.append(SubjectSpec(concept.trigger, bank=concept.bank))
    patched = model.clone()
    if specs:
        _, features = encode_prompt(clip, text)
        install_nested(patched, build_sources(clip, text, features, specs, model_layers(patched)))
    return patched
