"""Learned concepts in memory: what the CONCEPTS socket carries between nodes.

A :class:`ConceptSet` is what one training run produces: one new token embedding per concept
(per text encoder) and the cross-attention key/value weight deltas that all its concepts share.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

FORMAT_VERSION = 2  # 2: optional nested-attention token banks per concept
ENCODER_KEYS = ("clip_l", "clip_g")  # ComfyUI's textual-inversion keys, one per text encoder

# Bounds on learned values (docs/reliability.md, "Absurd values"). Training moves each value by
# about the learning rate per step (AdamW): 250 steps at 8e-5 change a value by 0.02 at most, and
# even the largest settings stay in the units. Far beyond, a model run in float16 (largest number
# 65504) overflows as soon as such a value meets a feature or a weight, and the picture comes out
# black or as noise: such a file is from a run that diverged, or was changed by hand.
MAX_ABS_VALUE = 1e4
# A K/V delta this many times the norm of the weight it patches has drowned what the layer learned.
MAX_KV_RATIO = 10.0
# A token vector this many times longer than the longest of the CLIP's own token vectors is far
# outside everything the text encoder was trained on.
MAX_EMBEDDING_RATIO = 10.0


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
    source: str = field(default="", compare=False)  # the file it was loaded from, for messages

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

    def origin(self) -> str:
        """Which concepts these are, for messages: their file if they were loaded, and triggers."""
        triggers = ", ".join(self.triggers) or "no triggers"
        return f"the concepts of '{self.source}' ({triggers})" if self.source else f"the concepts {triggers}"


def context_width(architecture: Mapping[str, Any]) -> int:
    """Width of the text features the UNet sees: the encoders' widths together (SDXL: l + g)."""
    return sum(int(w) for w in architecture.get("encoders", {}).values())


def encoder_widths(clip: Any) -> dict[str, int]:
    """Token-embedding width of each text encoder of a ComfyUI CLIP object."""
    widths = {key: int(table.shape[1]) for key, table in token_tables(clip).items()}
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
    check_magnitudes(concepts, model, clip)


def value_problem(tensor: torch.Tensor) -> str | None:
    """What is wrong with a learned tensor's values (non-finite, or beyond MAX_ABS_VALUE), or None."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        return f"contains {int((~finite).sum())} NaN or infinite values"
    peak = float(tensor.detach().abs().max()) if tensor.numel() else 0.0
    if peak > MAX_ABS_VALUE:
        return (f"holds values up to {peak:.3g}, far beyond the {MAX_ABS_VALUE:g} that no trained "
                "concept comes near")
    return None


def base_weight(model: Any, key: str) -> torch.Tensor:
    """The weight a ModelPatcher key names, as the model holds it (no patches applied)."""
    import comfy.utils

    return comfy.utils.get_attr(model.model, key).detach()


def _norm(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor.detach().float()))


def check_magnitudes(concepts: ConceptSet, model: Any | None, clip: Any | None) -> None:
    """Refuse values no training produces: non-finite or huge ones, K/V deltas out of scale with the
    weights they patch, token vectors out of scale with the CLIP's own (they sample black pictures)."""
    advice = ("it comes from a training run that diverged or was changed by hand: train the "
              "concepts again (with a lower learning rate)")
    named = [(f"K/V delta {key!r}", delta) for key, delta in concepts.kv_deltas.items()]
    named += [(f"token vector of {c.trigger!r} for {encoder}", vector)
              for c in concepts.concepts for encoder, vector in c.embeddings.items()]
    named += [(f"token bank of {c.trigger!r}", c.bank) for c in concepts.concepts if c.bank is not None]
    for name, tensor in named:
        problem = value_problem(tensor)
        if problem:
            raise ValueError(f"{concepts.origin()}: the {name} {problem}; {advice}")
    if model is not None:
        for key, delta in concepts.kv_deltas.items():
            weight = _norm(base_weight(model, key))
            ratio = _norm(delta) / weight if weight > 0 else math.inf
            if ratio > MAX_KV_RATIO:
                raise ValueError(f"{concepts.origin()}: the K/V delta {key!r} is {ratio:.3g} times the "
                                 f"size of the weight it changes (trained deltas stay well below "
                                 f"{MAX_KV_RATIO:g} times); {advice}")
    if clip is not None:
        longest = {key: float(table.float().norm(dim=1).max()) for key, table in token_tables(clip).items()}
        for concept in concepts.concepts:
            for key, vector in concept.embeddings.items():
                if key not in longest or vector.numel() == 0:
                    continue
                ratio = float(vector.detach().float().norm(dim=-1).max()) / max(longest[key], 1e-12)
                if ratio > MAX_EMBEDDING_RATIO:
                    raise ValueError(f"{concepts.origin()}: the token vector of {concept.trigger!r} for "
                                     f"{key} is {ratio:.3g} times longer than the CLIP's longest own "
                                     f"token vector (at most {MAX_EMBEDDING_RATIO:g} times); {advice}")


def token_tables(clip: Any) -> dict[str, torch.Tensor]:
    """Each text encoder's token-embedding table, by encoder key."""
    tables = {}
    for key in ENCODER_KEYS:
        encoder = getattr(clip.cond_stage_model, key, None)
        if encoder is not None:
            tables[key] = encoder.transformer.get_input_embeddings().weight.detach()
    return tables
