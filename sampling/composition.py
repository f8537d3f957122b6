"""Composing concept sets while sampling: the modes of KSampler with Concepts as one function.

The node and the toy-world benchmark both call :func:`sample_composed`, so what the benchmark
measures is the product's own code path.

- ``off``: the stock KSampler;
- ``combined``: every set's K/V deltas everywhere (as Apply Concepts);
- ``regional``: each set's deltas only inside its mask (elsewhere the base weights);
- ``regional_auto``: regions found from the class words' attention maps over the first
  ``auto_steps``, then (``auto_restart``) every step sampled again with them in place, or the rest
  of the steps sampled regionally.

In the regional modes each region can read its own version of the positive text
(``region_texts``): the prompt without the other sets' whole phrases ("a V2 dog"), so one
concept's look cannot reach another's region through the text; off, every region reads the whole
prompt.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..attention.patching import install_regional
from ..concepts.apply import apply_concepts, scaled_kv_deltas
from ..concepts.concept_set import ConceptSet
from .auto_regions import class_word_positions, region_text_features, sample_auto_regional
from .ksampler import run_ksampler

MODES = ("off", "combined", "regional", "regional_auto")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Composition:
    """How concept sets are composed: the composition inputs of KSampler with Concepts."""

    mode: str = "combined"
    strength: float = 1.0
    masks: torch.Tensor | None = None  # regional: [R, H, W] (or [H, W]), one per set, in order
    clip: Any = None  # regional modes: the CLIP that encoded the positive prompt
    positive_text: str = ""  # regional modes: the text of the positive prompt
    auto_steps: float = 0.3
    region_threshold: float = 0.4
    region_texts: bool = True
    auto_restart: bool = True


def check_positive_text(clip: Any, positive_text: str, positive: Any, mode: str) -> None:
    """Refuse a ``positive_text`` that, encoded with ``clip``, is not the ``positive`` conditioning."""
    if clip is None or not positive_text.strip():
        raise ValueError(f"{mode} needs 'clip' and 'positive_text' (the positive prompt's text) to find "
                         "the class words; or use 'regional' with masks")
    encoded = clip.encode_from_tokens_scheduled(clip.tokenize(positive_text))[0][0]
    given = positive[0][0]
    if encoded.shape != given.shape or not torch.allclose(encoded.float(), given.float(), atol=1e-3, rtol=1e-3):
        raise ValueError("'positive_text' encoded with 'clip' does not give the 'positive' "
                         "conditioning: connect the same text and CLIP that made 'positive'")


def sample_composed(model: Any, sets: Sequence[ConceptSet], composition: Composition, *, seed: int,
                    steps: int, cfg: float, sampler_name: str, scheduler: str, positive: Any,
                    negative: Any, latent: dict, denoise: float = 1.0) -> tuple[dict, torch.Tensor]:
    """Sample with ``sets`` composed as ``composition`` says: (LATENT, regions ``[R, H, W]`` at
    image size: where each set acted; all white when combined, all black when off)."""
    c = composition
    sampling = dict(seed=seed, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                    positive=positive, negative=negative, denoise=denoise)
    size = latent["samples"].shape[-2:]
    image_size = (size[0] * 8, size[1] * 8)
    if c.mode == "regional_auto":
        if denoise == 0:
            raise ValueError("'denoise' is 0, so no step is sampled, but regional_auto finds its "
                             "regions while sampling: set denoise above 0 (1.0 for a new picture), "
                             "or use 'regional' with masks")
        check_positive_text(c.clip, c.positive_text, positive, c.mode)
        per_set = class_word_positions(c.clip, c.positive_text, sets)
        texts = region_text_features(c.clip, c.positive_text, sets) if c.region_texts else None
        out, regions = sample_auto_regional(run_ksampler, model, sets, c.strength, per_set, steps, c.auto_steps,
                                            c.region_threshold, latent, texts=texts, restart=c.auto_restart,
                                            **sampling)
        regions = regions.reshape(-1, *regions.shape[-2:])
        return out, F.interpolate(regions[None], size=image_size, mode="nearest")[0]
    patched, regions = model, torch.zeros(len(sets), *image_size)
    if c.mode == "combined":
        regions = torch.ones(len(sets), *image_size)
        for concepts in sets:
            patched, _ = apply_concepts(patched, None, concepts, c.strength)
    elif c.mode == "regional":
        masks = c.masks
        if masks is None:
            raise ValueError("regional composition needs a MASK batch with one mask per "
                             "concept set (connect Load Image (as Mask) / mask nodes to 'masks')")
        masks = masks[None] if masks.dim() == 2 else masks
        if masks.shape[0] != len(sets):
            raise ValueError(f"{len(sets)} concept sets are connected but 'masks' holds "
                             f"{masks.shape[0]} masks: give exactly one per set, in order")
        texts = None
        if c.region_texts and c.clip is not None and c.positive_text.strip():
            check_positive_text(c.clip, c.positive_text, positive, c.mode)
            texts = region_text_features(c.clip, c.positive_text, sets)
        elif c.region_texts:
            log.info("regional: no 'clip' and 'positive_text' connected, so every region reads the "
                     "whole prompt; connect them to give each region its own text")
        patched = model.clone()
        install_regional(patched, scaled_kv_deltas(sets, c.strength), masks.float(), texts)
        regions = masks.float()
    elif c.mode != "off":
        raise ValueError(f"unknown composition {c.mode!r}; use one of {MODES}")
    return run_ksampler(patched, steps=steps, latent=latent, **sampling), regions
