"""Learned concepts in memory: what the CONCEPTS socket carries between nodes.

A :class:`ConceptSet` is what one training run produces: one new token embedding per concept
(per text encoder) and the cross-attention key/value weight deltas that all its concepts share.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

FORMAT_VERSION = 2  # 2: optional nested-attention token banks per concept
ENCODER_KEYS = ("clip_l", "clip_g")  # ComfyUI's textual-inversion keys, one per text encoder


@dataclass
class Concept:
    """One learned concept: the trigger the user types, its class phrase, its token vectors."""

    trigger: str
    class_phrase: str
    embeddings: dict[str, torch.Tensor]  # encoder key -> [n_tokens, width]
    bank: torch.Tensor | None = None  # nested-attention token bank [M, context width], if trained


@dataclass
class ConceptSet:
    """Concepts learned together, their shared K/V deltas, and where they come from."""

    concepts: list[Concept]
    kv_deltas: dict[str, torch.Tensor]  # ModelPatcher weight key of attn2.to_k/to_v -> delta
    architecture: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def triggers(self) -> list[str]:
        """Trigger names in training order."""
        return [c.trigger for c in self.concepts]

    def find(self, trigger: str) -> Concept:
        """The concept with this trigger, or a ValueError listing the ones there are."""
        for concept in self.concepts:
            if concept.trigger == trigger:
                return concept
        raise ValueError(f"no concept {trigger!r} in this set; it has {', '.join(self.triggers)}")

    def describe(self) -> str:
        """One line for logs and errors: triggers, classes and architecture."""
        pairs = ", ".join(f"{c.trigger} {c.class_phrase}" for c in self.concepts)
        return f"[{pairs}] for {self.architecture.get('model', '?')}"


def context_width(architecture: Mapping[str, Any]) -> int:
    """Width of the text features the UNet sees: the encoders' widths together (SDXL: l + g)."""
    return sum(int(w) for w in architecture.get("encoders", {}).values())


def encoder_widths(clip: Any) -> dict[str, int]:
    """Token-embedding width of each text encoder of a ComfyUI CLIP object."""
    widths = {}
    for key in ENCODER_KEYS:
        encoder = getattr(clip.cond_stage_model, key, None)
        if encoder is not None:
            widths[key] = int(encoder.transformer.get_input_embeddings().weight.shape[1])
    if not widths:
        raise ValueError(f"{type(clip.cond_stage_model).__name__} has no CLIP-L/CLIP-G text "
                         "encoder; only SD1.x and SDXL text encoders are supported")
    return widths


def kv_weight_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Shapes of every cross-attention to_k/to_v weight, by ModelPatcher weight key."""
    from ..attention.patching import model_layers

    state = model.model.state_dict()
    shapes = {}
    for layer in model_layers(model):
        for key in layer.weight_keys:
            shapes[key] = tuple(state[key].shape)
    return shapes


def kv_digest(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """Short digest of the K/V weight shapes: equal digests mean the deltas fit."""
    items = sorted((key, tuple(int(d) for d in shape)) for key, shape in shapes.items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def architecture_fingerprint(model: Any, clip: Any | None = None) -> dict[str, Any]:
    """What a concept file must match: model family, K/V weight shapes and text-encoder widths."""
    shapes = kv_weight_shapes(model)
    digest = kv_digest(shapes)
    fingerprint: dict[str, Any] = {
        "model": type(model.model.model_config).__name__,
        "kv_layers": len(shapes) // 2,
        "kv_digest": digest,
    }
    if clip is not None:
        fingerprint["encoders"] = encoder_widths(clip)
    return fingerprint


def check_compatible(concepts: ConceptSet, model: Any | None, clip: Any | None) -> None:
    """Refuse concepts trained for another architecture, naming both."""
    if model is not None:
        have = architecture_fingerprint(model)
        want = concepts.architecture
        if (have["model"], have["kv_digest"]) != (want.get("model"), want.get("kv_digest")):
            raise ValueError(
                f"these concepts were trained for a {want.get('model')} model "
                f"({want.get('kv_layers')} cross-attention layers, digest {want.get('kv_digest')}) "
                f"but the MODEL given is {have['model']} ({have['kv_layers']} layers, digest "
                f"{have['kv_digest']}): load a base model of the architecture they were trained on")
    if clip is not None:
        have_widths = encoder_widths(clip)
        want_widths = concepts.architecture.get("encoders", {})
        if have_widths != want_widths:
            raise ValueError(
                f"these concepts have token vectors for text encoders {want_widths} but the CLIP "
                f"given has {have_widths}: use the CLIP of the model they were trained on")
