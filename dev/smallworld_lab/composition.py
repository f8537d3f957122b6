"""Composition of separately learned concepts in the toy world: combined vs. regional sampling.

For a reference scene each object is learned on its own ("Vi shape", trained with its mask, one
concept set per object, as a user would train from different pictures). The combined caption
"a V1 shape1 and a V2 shape2 on a grey background" is then sampled with fixed seeds

- ``combined``: every set's K/V deltas applied everywhere;
- ``regional_auto``: the regions found from the class words' maps over the first steps, the rest
  sampled regionally, each region reading the caption without the other concepts' phrases;
- ``regional_auto_shared``: the same regions, every region reading the whole caption (only the
  K/V deltas are regional; shows what the region texts add);
- ``regional_auto_restart``: the automatic regions, then every step sampled again with them in
  place: KSampler with Concepts' defaults;
- ``regional_masks``: the scene's true object masks as regions ('regional' mode, an upper bound for
  the automatic regions),
- ``single``: no composition at all, each concept alone with its own set ("a V1 shape1 on a grey
  background"): the leakage its learning left in it, the floor no composition can go below.

Every mode but ``single`` is one setting of KSampler with Concepts (:data:`COMPOSITIONS`), sampled
through the product's own function (``sampling.composition.sample_composed``), and read back
with evaluation v2 (``evaluate.score_picture``): fidelity of each concept, objects not
drawn, extra objects, and leakage of one concept's colour (and pattern) onto the other next to its
chance level.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from concept_attention.concepts.apply import apply_concepts
from concept_attention.concepts.concept_file import load_concepts, save_concepts
from concept_attention.sampling.composition import Composition, sample_composed
from concept_attention.sampling.ksampler import empty_latent
from concept_attention.concepts.concept_set import ConceptSet
from concept_attention.concepts.specs import ConceptSpec
from concept_attention.training.loop import train_concepts
from concept_attention.training.settings import TrainSettings
from . import evaluate as ev
from concept_attention.smallworld import model as toy
from . import quality
from . import report
from concept_attention.smallworld import scenes as sw
from .experiment import ExperimentSettings, caption_for

_AUTO = Composition(mode="regional_auto", auto_steps=0.3, region_threshold=0.4)  # the node's defaults
COMPOSITIONS = {  # each row is KSampler with Concepts with these inputs (the product's own path)
    "combined": Composition(mode="combined"),
    "regional_auto": replace(_AUTO, auto_restart=False),
    "regional_auto_shared": replace(_AUTO, auto_restart=False, region_texts=False),
    "regional_auto_restart": _AUTO,
    "regional_masks": Composition(mode="regional"),  # with the scene's true masks
}
SAMPLING_MODES = tuple(COMPOSITIONS)
MODES = (*SAMPLING_MODES, "single")  # the table's rows


def train_separately(bundle: Any, scene: sw.Scene, settings: ExperimentSettings,
                     cache: Path | None = None) -> list[ConceptSet]:
    """One concept set per object, each learned from the scene with that object's mask only.

    With ``cache`` (a file-name prefix) each set is saved as ``<cache>_V<i>.safetensors`` and loaded
    from there next time, so other sampling modes can be compared without training again.
    """
    image = torch.from_numpy(scene.image.astype(np.float32) / 255.0)[None]
    sets = []
    for i, obj in enumerate(scene.objects):
        cached = cache.with_name(f"{cache.name}_V{i + 1}.safetensors") if cache is not None else None
        if cached is not None and cached.is_file():
            sets.append(load_concepts(cached))
            continue
        train = TrainSettings(steps=settings.steps, learning_rate=settings.learning_rate,
                              micro_batch=settings.micro_batch, grad_accumulation=settings.grad_accumulation,
                              resolution=scene.size, seed=settings.seed + i, map_layers=settings.map_layers,
                              augmentation=settings.augmentation, init=settings.init,
                              loss_weighting=settings.loss_weighting,
                              caption=f"a V{i + 1} {obj.shape} on a {scene.background} background")
        train = replace(train, calibration=replace(train.calibration, weight=settings.attention_weight))
        masks = torch.from_numpy(scene.masks[i:i + 1].astype(np.float32))
        with torch.inference_mode():
            model, clip = bundle.model.clone(), bundle.clip.clone()
        sets.append(train_concepts(model, clip, bundle.vae, image, [ConceptSpec(f"V{i + 1}", obj.shape)],
                                   train, masks=masks).concepts)
        if cached is not None:
            save_concepts(cached, sets[-1])
    return sets


def sample_latent(bundle: Any, sets: list[ConceptSet], prompt: str, mode: str, seed: int,
                  settings: ExperimentSettings, masks: torch.Tensor | None = None) -> dict:
    """The LATENT KSampler with Concepts gives for ``prompt`` with the sets composed as ``mode``.

    ``masks`` ([R, H, W], one per set) are the regions of 'regional_masks'.
    """
    if mode not in COMPOSITIONS:
        raise ValueError(f"unknown composition mode {mode!r}; use one of {SAMPLING_MODES}")
    how = COMPOSITIONS[mode]
    if how.mode == "regional":
        if masks is None:
            raise ValueError("'regional_masks' needs the scene's object masks")
        how = replace(how, masks=masks.float())
    clip = bundle.clip
    for concepts in sets:
        _, clip = apply_concepts(None, clip, concepts)
    with torch.inference_mode():
        positive, negative = quality.encode(clip, prompt), quality.encode(clip, "")
        latent, _ = sample_composed(bundle.model, sets, replace(how, clip=clip, positive_text=prompt),
                                    seed=seed, steps=settings.sample_steps, cfg=settings.cfg,
                                    sampler_name="euler", scheduler="normal", positive=positive,
                                    negative=negative, latent=empty_latent(toy.IMAGE_SIZE))
    return latent


def sample_mode(bundle: Any, sets: list[ConceptSet], prompt: str, mode: str, seed: int,
                settings: ExperimentSettings, masks: torch.Tensor | None = None) -> np.ndarray:
    """One image [H, W, 3] in 0..1 of ``prompt`` with the sets composed by ``mode`` (see :func:`sample_latent`)."""
    latent = sample_latent(bundle, sets, prompt, mode, seed, settings, masks)
    with torch.inference_mode():
        return bundle.vae.decode(latent["samples"])[0].float().cpu().numpy()


def _readouts(bundle: Any, sets: list[ConceptSet], scene: sw.Scene, mode: str, seed: int,
              settings: ExperimentSettings, masks: torch.Tensor) -> list[tuple[list[ev.ObjectReadout], list[int]]]:
    """What one seed's pictures show, each with the concepts its prompt asked for.

    One picture of the combined caption asking for all, or in 'single' one picture per concept alone.
    """
    if mode == "single":
        return [(ev.read_scene(sample_mode(bundle, [sets[i]], f"a V{i + 1} {obj.shape} on a "
                                           f"{sw.DEFAULT_BACKGROUND} background", "combined", seed, settings)), [i])
                for i, obj in enumerate(scene.objects)]
    found = ev.read_scene(sample_mode(bundle, sets, caption_for(scene), mode, seed, settings, masks))
    return [(found, list(range(len(scene.objects))))]


def composition_metrics(bundle: Any, scene: sw.Scene, settings: ExperimentSettings,
                        sets: list[ConceptSet] | None = None, cache: Path | None = None,
                        modes: Sequence[str] = MODES, seeds: Sequence[int] | None = None
                        ) -> dict[str, dict[str, Any]]:
    """Per mode: the evaluation-v2 metrics of its pictures over the seeds (default: the settings').

    Keys as ``evaluate.score_picture`` (``colour_leak`` next to ``colour_leak_chance``, ``fidelity_cp``,
    ``not_drawn``, ...); ``per_seed`` keeps each seed's values (same seeds in every mode, so modes
    pair up). In 'single' each concept is read from its own picture (see :func:`_readouts`).
    """
    sets = sets if sets is not None else train_separately(bundle, scene, settings, cache)
    targets = [{"shape": o.shape, "colour": o.colour, "pattern": o.pattern} for o in scene.objects]
    seeds = tuple(seeds if seeds is not None else settings.sample_seeds)
    masks = torch.from_numpy(scene.masks.astype(np.float32))
    results = {}
    for mode in modes:
        per_seed: dict = {}
        for k, seed in enumerate(seeds):
            for found, prompted in _readouts(bundle, sets, scene, mode, seed, settings, masks):
                report.add_values(per_seed, k, ev.score_picture(found, targets, prompted))
        results[mode] = {**report.pooled_means(per_seed), "seeds": len(seeds), "per_seed": per_seed}
    return results
