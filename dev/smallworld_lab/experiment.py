"""One-image multi-concept learning measured in the toy world (DisenDiff vs. baselines/ablations).

For a reference scene with objects O1..On, each run learns "V1 <shape1>", ..., "Vn <shapen>" from
the scene with ``training.loop.train_concepts`` (the same code the node runs), then measures:

- attention IoU on the training image: the scene is noised and denoised part-way (img2img through
  ComfyUI's sampler, cfg 1) with the caption; head-averaged cross-attention maps of each trigger
  and class word on the ``map_layers`` are averaged over the steps and compared with the object
  masks (soft IoU, ``evaluate.mask_iou``): own object (want high) and the other objects (want low);
- the "+ token bank" variant also learns a 16-token nested-attention bank per concept and samples
  with it (its trigger's value becomes query-dependent);
- generation: "a Vi shape on a grey background" per concept and the combined caption, fixed seeds,
  read back with ``readout.read_scene`` and scored by evaluation v2 (``evaluate.score_picture``:
  one-to-one matching, fidelity of colour and pattern, shape apart, colour leakage and appearance
  swap next to their chance levels, objects not drawn, extra objects), and text alignment of
  "a Vi shape on a light blue background" (shape and background obeyed).

Rows keep every metric's values per seed (``per_seed``) for paired bootstrap intervals.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from concept_attention.attention.calibration import CalibrationSettings
from concept_attention.attention.patching import install_hook
from concept_attention.attention.recorder import AttentionRecorder, MapStore
from concept_attention.concepts.apply import apply_concepts
from concept_attention.concepts.concept_set import ConceptSet
from concept_attention.training.data import AugmentSettings
from concept_attention.concepts.specs import ConceptSpec
from concept_attention.training.loop import train_concepts
from concept_attention.training.settings import TrainResult, TrainSettings
from concept_attention.sampling.ksampler import run_ksampler
from concept_attention.sampling.nested_subjects import with_concept_banks
from concept_attention.concepts.triggers import concept_token_groups
from . import evaluate as ev
from concept_attention.smallworld import model as toy
from . import quality
from . import report
from concept_attention.smallworld import scenes as sw

VARIANTS: dict[str, dict[str, Any]] = {
    "DisenDiff": {},
    "Custom Diffusion": {"use_bind": False, "use_separation": False},
    "no L_bind": {"use_bind": False},
    "no L_s&s": {"use_separation": False},
    "no suppression": {"suppression_power": None},
    "no Gaussian": {"gaussian": False},
    "DisenDiff + token bank": {},
}
# Training switches beyond calibration: the nested-attention token bank (docs/method.md §15).
TRAIN_OVERRIDES: dict[str, dict[str, Any]] = {"DisenDiff + token bank": {"token_bank": 16}}
BACKGROUND_SWAP = "light blue"
WHAT_TRAINS = ("train_kv", "train_embeddings")  # TrainSettings switches a learnability probe may turn off


@dataclass
class ExperimentSettings:
    """Training and measurement knobs shared by every variant."""

    steps: int = 200
    learning_rate: float = 5e-4
    attention_weight: float = 0.1
    calibration_max_t: float = 1.0  # calibrate only at timestep fractions up to this (CalibrationSettings.max_t)
    micro_batch: int = 2
    grad_accumulation: int = 2
    map_layers: str = toy.CALIBRATION_LAYERS
    seed: int = 0
    sample_seeds: Sequence[int] = (11, 12, 13, 14)
    sample_steps: int = 20
    cfg: float = 5.0
    iou_steps: int = 10
    iou_denoise: float = 0.6
    augmentation: AugmentSettings = field(default_factory=toy.toy_augmentation)
    init: str = "mean"  # where triggers start (TrainSettings.init): the toy CLIP's rare rows are untrained
    loss_weighting: str = "eps+x0"  # new tokens learn a colour only so (TrainSettings.loss_weighting)


def specs_for(scene: sw.Scene) -> list[ConceptSpec]:
    """'Vi: shape' for each object of the scene."""
    return [ConceptSpec(f"V{i + 1}", obj.shape) for i, obj in enumerate(scene.objects)]


def caption_for(scene: sw.Scene, background: str = sw.DEFAULT_BACKGROUND) -> str:
    """'a V1 circle and a V2 square on a grey background' (the training caption)."""
    phrases = [f"a V{i + 1} {obj.shape}" for i, obj in enumerate(scene.objects)]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{text} on a {background} background"


def train_variant(bundle: Any, scene: sw.Scene, variant: str, settings: ExperimentSettings,
                  what_trains: Mapping[str, bool] | None = None) -> TrainResult:
    """Learn the scene's concepts with one variant's calibration switches and a probe's ``WHAT_TRAINS`` switches."""
    unknown = sorted(set(what_trains or {}) - set(WHAT_TRAINS))
    if unknown:
        raise ValueError(f"what_trains {unknown}: a recipe probe may switch only {', '.join(WHAT_TRAINS)}")
    calibration = replace(CalibrationSettings(weight=settings.attention_weight, max_t=settings.calibration_max_t),
                          **VARIANTS[variant])
    train = TrainSettings(steps=settings.steps, learning_rate=settings.learning_rate,
                          micro_batch=settings.micro_batch, grad_accumulation=settings.grad_accumulation,
                          resolution=scene.size, seed=settings.seed, calibration=calibration,
                          map_layers=settings.map_layers, caption=caption_for(scene),
                          augmentation=settings.augmentation, init=settings.init,
                          loss_weighting=settings.loss_weighting,
                          **TRAIN_OVERRIDES.get(variant, {}), **(what_trains or {}))
    image = torch.from_numpy(scene.image.astype(np.float32) / 255.0)[None]
    with torch.inference_mode():  # as inside a node: the loop must cope with inference tensors
        base_model, base_clip = bundle.model.clone(), bundle.clip.clone()
    return train_concepts(base_model, base_clip, bundle.vae, image, specs_for(scene), train)


def concept_maps(bundle: Any, scene: sw.Scene, concepts: ConceptSet,
                 settings: ExperimentSettings) -> torch.Tensor:
    """[2n, h, w] maps on the training image: trigger then class word of each concept."""
    model, clip = apply_concepts(bundle.model, bundle.clip, concepts)
    prompt = caption_for(scene)
    with torch.inference_mode():
        model = with_concept_banks(model, clip, prompt, concepts)
        tokens = clip.tokenize(prompt)
        pairs = [(c.trigger, c.class_phrase, c.embeddings[next(iter(c.embeddings))]) for c in concepts.concepts]
        groups = concept_token_groups(clip, tokens, pairs)
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        positive = [[cond, {"pooled_output": pooled}]]
        store = MapStore()
        store.set_words(groups)
        install_hook(model, AttentionRecorder(store=store), settings.map_layers)
        pixels = torch.from_numpy(scene.image.astype(np.float32) / 255.0)[None]
        latent = {"samples": bundle.vae.encode(pixels)}
        run_ksampler(model, settings.seed, settings.iou_steps, 1.0, "euler", "normal", positive, positive,
                     latent, settings.iou_denoise)
        return store.word_maps()[0].float()


def attention_ious(maps: torch.Tensor, scene: sw.Scene) -> dict[str, Any]:
    """Soft IoU of trigger/class maps with their own object and (mean) with the other objects.

    ``*_own_share`` is the own IoU as a share of the ceiling at the maps' resolution (each object's
    mask pooled to the map size, :func:`evaluate.iou_ceiling`), ``iou_ceiling`` that ceiling. The
    per-object values go to ``per_seed`` (one "seed": the training seed) for paired intervals.
    """
    n = len(scene.objects)
    values: dict[str, list[float]] = {k: [] for k in (
        "iou_trigger_own", "iou_trigger_other", "iou_class_own", "iou_class_other", "iou_ceiling",
        "iou_trigger_own_share", "iou_class_own_share")}
    for i in range(n):
        trigger, klass = maps[2 * i], maps[2 * i + 1]
        others = [j for j in range(n) if j != i]
        ceiling = ev.iou_ceiling(scene.masks[i], maps.shape[-2:])
        own_t, own_c = ev.mask_iou(trigger, scene.masks[i]), ev.mask_iou(klass, scene.masks[i])
        values["iou_trigger_own"].append(own_t)
        values["iou_class_own"].append(own_c)
        values["iou_trigger_other"].append(float(np.mean([ev.mask_iou(trigger, scene.masks[j]) for j in others])))
        values["iou_class_other"].append(float(np.mean([ev.mask_iou(klass, scene.masks[j]) for j in others])))
        values["iou_ceiling"].append(ceiling)
        values["iou_trigger_own_share"].append(own_t / ceiling)
        values["iou_class_own_share"].append(own_c / ceiling)
    per_seed: dict = {}
    report.add_values(per_seed, 0, values)
    return {**report.pooled_means(per_seed), "per_seed": per_seed}


def _target(obj: sw.ObjectSpec) -> dict:
    return {"shape": obj.shape, "colour": obj.colour, "pattern": obj.pattern}


def generation_metrics(bundle: Any, scene: sw.Scene, concepts: ConceptSet,
                       settings: ExperimentSettings) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Evaluation-v2 picture metrics of fixed-seed samples (means and ``per_seed``) and the images.

    Each concept alone ("a Vi shape on a grey background", keys ``*_single``: there ``colour_leak``
    is the appearance swap, another concept's colour on it) and the training caption (``*_combined``),
    scored by :func:`evaluate.score_picture` against all the scene's concepts; text alignment of
    "a Vi shape on a light blue background" (shape and background obeyed).
    """
    model, clip = apply_concepts(bundle.model, bundle.clip, concepts)
    seeds = list(settings.sample_seeds)
    objects = scene.objects
    targets = [_target(o) for o in objects]
    per_seed: dict = {}
    images: dict[str, np.ndarray] = {}

    def sample(prompt: str) -> list:
        with torch.inference_mode():
            patched = type(bundle)(with_concept_banks(model, clip, prompt, concepts), clip, bundle.vae)
        pictures = quality.generate(patched, prompt, seeds, steps=settings.sample_steps, cfg=settings.cfg)
        images[prompt] = pictures
        return [ev.read_scene(p) for p in pictures]

    for i, obj in enumerate(objects):
        for k, reads in enumerate(sample(f"a V{i + 1} {obj.shape} on a grey background")):
            report.add_values(per_seed, k, ev.score_picture(reads, targets, [i]), "_single")
        prompt = f"a V{i + 1} {obj.shape} on a {BACKGROUND_SWAP} background"
        for k, (reads, picture) in enumerate(zip(sample(prompt), images[prompt])):
            aligned = ev.text_alignment(reads, [{"shape": obj.shape}], BACKGROUND_SWAP, ev.read_background(picture))
            report.add_values(per_seed, k, {"text_alignment": [aligned]})
    for k, reads in enumerate(sample(caption_for(scene))):
        report.add_values(per_seed, k, ev.score_picture(reads, targets), "_combined")
    return {**report.pooled_means(per_seed), "per_seed": per_seed}, images


def run_scene(bundle: Any, scene: sw.Scene, variant: str, settings: ExperimentSettings,
              generate: bool = True) -> dict[str, float]:
    """Train one variant on one scene and measure it."""
    result = train_variant(bundle, scene, variant, settings)
    row = attention_ious(concept_maps(bundle, scene, result.concepts, settings), scene)
    if generate:
        pictures = generation_metrics(bundle, scene, result.concepts, settings)[0]
        row.update({**pictures, "per_seed": {**row["per_seed"], **pictures["per_seed"]}})
    row["stopped"] = result.stopped
    return row
