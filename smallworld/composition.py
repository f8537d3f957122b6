"""Composition of separately learned concepts in the toy world: combined vs. regional sampling.

For a reference scene each object is learned on its own ("Vi shape", trained with its mask, one
concept set per object, as a user would train from different pictures). The combined caption
"a V1 shape1 and a V2 shape2 on a grey background" is then sampled with fixed seeds

- ``combined``: every set's K/V deltas applied everywhere (Apply Concepts / KSampler with
  Concepts 'combined');
- ``regional_auto``: the regions found from the class words' maps over the first steps, the rest
  sampled regionally, each region reading the caption without the other concepts' triggers
  (KSampler with Concepts 'regional_auto' before ``auto_restart`` and whole-phrase region texts);
- ``regional_auto_shared``: the same regions, every region reading the whole caption (only the
  K/V deltas are regional; shows what the region texts add);
- ``regional_auto_restart_triggers``: the automatic regions, then every step sampled again with
  them in place (``auto_restart``), regions reading the caption without the other triggers;
- ``regional_auto_restart``: the same, each region reading the caption without the other concepts'
  whole phrases ("a V2 diamond"): KSampler with Concepts' defaults;
- ``regional_masks``: the scene's true object masks as regions, reading the caption without the
  other triggers (an upper bound for the automatic regions),
- ``single``: no composition at all, each concept alone with its own set ("a V1 shape1 on a grey
  background"): the leakage its learning left in it, the floor no composition can go below,

and read back: fidelity of each concept and leakage of one concept's colour/pattern onto the other.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..training.apply import apply_concepts
from ..training.concept_file import load_concepts, save_concepts
from ..attention.patching import install_regional
from ..training.auto_regions import class_word_positions, region_text_features, sample_auto_regional
from ..training.concepts import ConceptSet
from ..training.data import ConceptSpec
from ..training.loop import TrainSettings, train_concepts
from . import evaluate as ev
from . import model as toy
from . import quality
from . import scenes as sw
from .experiment import ExperimentSettings, caption_for

SAMPLING_MODES = ("combined", "regional_auto", "regional_auto_shared", "regional_auto_restart_triggers",
                  "regional_auto_restart", "regional_masks")
MODES = (*SAMPLING_MODES, "single")  # the table's rows
AUTO_MODES = {  # mode: (restart, what region texts drop; None = regions read the whole caption)
    "regional_auto": (False, "triggers"), "regional_auto_shared": (False, None),
    "regional_auto_restart_triggers": (True, "triggers"), "regional_auto_restart": (True, "concepts")}
AUTO_FRACTION = 0.3
REGION_THRESHOLD = 0.4


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


def _sampler(model: Any, steps: int, latent: dict, seed: int, cfg: float, positive: Any, negative: Any,
             start_step: int | None = None, last_step: int | None = None, disable_noise: bool = False,
             force_full_denoise: bool = False, **_: Any) -> dict:
    """KSamplerAdvanced-style call of ComfyUI's sampler (euler, normal schedule)."""
    import comfy.sample

    samples = latent["samples"]
    noise = torch.zeros_like(samples) if disable_noise else comfy.sample.prepare_noise(samples, seed)
    out = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, samples,
                              start_step=start_step, last_step=last_step, force_full_denoise=force_full_denoise,
                              disable_noise=disable_noise, seed=seed, disable_pbar=True)
    return {"samples": out}


def sample_mode(bundle: Any, sets: list[ConceptSet], prompt: str, mode: str, seed: int,
                settings: ExperimentSettings, masks: torch.Tensor | None = None) -> np.ndarray:
    """One image [H, W, 3] in 0..1 of ``prompt`` with the sets composed by ``mode``.

    ``masks`` ([R, H, W], one per set) are the regions of 'regional_masks'.
    """
    clip = bundle.clip
    for concepts in sets:
        _, clip = apply_concepts(None, clip, concepts)
    with torch.inference_mode():
        positive, negative = quality.encode(clip, prompt), quality.encode(clip, "")
        latent = {"samples": torch.zeros(1, 4, toy.IMAGE_SIZE // 8, toy.IMAGE_SIZE // 8)}
        args = dict(seed=seed, cfg=settings.cfg, positive=positive, negative=negative)
        if mode == "combined":
            model = bundle.model
            for concepts in sets:
                model, _ = apply_concepts(model, None, concepts)
            out = _sampler(model, settings.sample_steps, latent, **args)
        elif mode in AUTO_MODES:
            restart, drop = AUTO_MODES[mode]
            classes = class_word_positions(clip, prompt, sets)
            texts = region_text_features(clip, prompt, sets, drop) if drop else None
            out, _ = sample_auto_regional(_sampler, bundle.model, sets, 1.0, classes, settings.sample_steps,
                                          AUTO_FRACTION, REGION_THRESHOLD, latent, texts=texts,
                                          restart=restart, **args)
        elif mode == "regional_masks":
            if masks is None:
                raise ValueError("'regional_masks' needs the scene's object masks")
            model = bundle.model.clone()
            install_regional(model, [dict(s.kv_deltas) for s in sets], masks.float(),
                             region_text_features(clip, prompt, sets, "triggers"))
            out = _sampler(model, settings.sample_steps, latent, **args)
        else:
            raise ValueError(f"unknown composition mode {mode!r}; use one of {SAMPLING_MODES}")
        return bundle.vae.decode(out["samples"])[0].float().cpu().numpy()


def _readouts(bundle: Any, sets: list[ConceptSet], scene: sw.Scene, mode: str, seed: int,
              settings: ExperimentSettings, masks: torch.Tensor) -> list[list[ev.ObjectReadout]]:
    """Per target object, what one seed's picture shows: one picture for all, or in 'single' one each."""
    if mode == "single":
        return [ev.read_scene(sample_mode(bundle, [sets[i]], f"a V{i + 1} {obj.shape} on a "
                                          f"{sw.DEFAULT_BACKGROUND} background", "combined", seed, settings))
                for i, obj in enumerate(scene.objects)]
    found = ev.read_scene(sample_mode(bundle, sets, caption_for(scene), mode, seed, settings, masks))
    return [found] * len(scene.objects)


def composition_metrics(bundle: Any, scene: sw.Scene, settings: ExperimentSettings,
                        sets: list[ConceptSet] | None = None, cache: Path | None = None,
                        modes: Sequence[str] = MODES, seeds: Sequence[int] | None = None
                        ) -> dict[str, dict[str, float]]:
    """Per mode: fidelity and leakage of the combined caption over the seeds (default: the settings').

    ``leakage_combined`` counts every target (its best-matching object, whatever it is);
    ``leakage_found`` only targets whose own shape was drawn, so a mode is not credited with low
    leakage for drawing fewer of the objects; ``colour_leakage`` is that for colour alone (the
    read-out's exact attribute: patterns are read right only about 60 % of the time through the
    VAE), and ``colour_chance`` what it would read if a wrong colour were the other's by chance.
    ``per_seed`` keeps each seed's leakage values (same seeds in every mode, so modes pair up).
    In 'single' each target is read from its own picture (the concept alone, see :func:`_readouts`).
    """
    sets = sets if sets is not None else train_separately(bundle, scene, settings, cache)
    targets = [{"shape": o.shape, "colour": o.colour, "pattern": o.pattern} for o in scene.objects]
    seeds = tuple(seeds if seeds is not None else settings.sample_seeds)
    results = {}
    masks = torch.from_numpy(scene.masks.astype(np.float32))
    used = {"colour": {t["colour"] for t in targets}}
    for mode in modes:
        fidelity, leak_found, chance = [], [], []
        per_seed: dict[str, list[list[float]]] = {"leakage_combined": [], "colour_leakage": []}
        for seed in seeds:
            image_leak, image_colour = [], []
            for i, (target, found) in enumerate(zip(targets, _readouts(bundle, sets, scene, mode, seed,
                                                                       settings, masks))):
                fidelity.append(ev.concept_fidelity(found, target))
                others = [other for j, other in enumerate(targets) if j != i]
                values = [ev.leakage(found, target, other) for other in others]
                image_leak += values
                if any(r.attributes()["shape"] == target["shape"] for r in found):
                    leak_found += values
                    image_colour += [ev.leakage(found, target, other, ("colour",)) for other in others]
                    chance += [ev.chance_leakage(found, target, other, used, ("colour",)) for other in others]
            per_seed["leakage_combined"].append(image_leak)
            per_seed["colour_leakage"].append(image_colour)
        leak = [v for image in per_seed["leakage_combined"] for v in image]
        colour = [v for image in per_seed["colour_leakage"] for v in image]
        results[mode] = {"fidelity_combined": float(np.mean(fidelity)), "leakage_combined": float(np.mean(leak)),
                         "leakage_found": float(np.mean(leak_found)) if leak_found else 0.0,
                         "colour_leakage": float(np.mean(colour)) if colour else 0.0,
                         "colour_chance": float(np.mean(chance)) if chance else 0.0,
                         "found": len(leak_found) / len(leak), "seeds": len(seeds), "per_seed": per_seed}
    return results
