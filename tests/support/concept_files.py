"""Small valid (and deliberately broken) concept files, written without any model (fast)."""
from __future__ import annotations

from pathlib import Path

import torch

# Two made-up cross-attention layers; the shapes only have to agree with the encoder width.
_LAYERS = ("input_blocks.1.1.transformer_blocks.0.attn2", "output_blocks.3.1.transformer_blocks.0.attn2")
_WIDTH = 16


def write_concept_file(path: str | Path, pairs: list[tuple[str, str]], seed: int = 0) -> Path:
    """Save a tiny SD1.5-labelled concept file with one concept per ``(trigger, class_phrase)``."""
    from concept_attention.concepts.concept_file import kv_digest, save_concepts
    from concept_attention.concepts.concept_set import Concept, ConceptSet

    generator = torch.Generator().manual_seed(seed)
    shapes = {f"diffusion_model.{layer}.{proj}.weight": (8, _WIDTH)
              for layer in _LAYERS for proj in ("to_k", "to_v")}
    deltas = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    concepts = [Concept(trigger, phrase, {"clip_l": torch.randn(1, _WIDTH, generator=generator)})
                for trigger, phrase in pairs]
    architecture = {"model": "SD15", "kv_layers": len(_LAYERS), "kv_digest": kv_digest(shapes),
                    "encoders": {"clip_l": _WIDTH}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_concepts(path, ConceptSet(concepts, deltas, architecture, {"complete": True, "steps_done": 3}))
    return path


def write_broken_file(path: str | Path) -> Path:
    """A ``.safetensors`` name holding bytes that are not a safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return path
