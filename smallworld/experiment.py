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
  read back with ``readout.read_scene``: fidelity (shape+colour+pattern of the learned object),
  leakage (another concept's colour/pattern on it), extra-object rate of single prompts, and text
  alignment of "a Vi shape on a light blue background" (shape and background obeyed).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch

from ..attention.calibration import CalibrationSettings
from ..attention.maps import average_token_maps
from ..attention.patching import install_hook
from ..attention.recorder import AttentionRecorder, MapStore
from ..training.apply import apply_concepts
from ..training.concepts import ConceptSet
from ..training.data import AugmentSettings, ConceptSpec
from ..training.loop import TrainResult, TrainSettings, train_concepts
from ..training.nested_subjects import with_concept_banks
from ..training.triggers import concept_token_groups
from . import evaluate as ev
from . import model as toy
from . import quality
from . import scenes as sw

VARIANTS: dict[str, dict[str, Any]] = {
    "DisenDiff": {},
    "Custom Diffusion": {"use_bind": False, "use_separation": False},
    "no L_bind": {"use_bind": False},
    "no L_s&s": {"use_separation": False},
    "no suppression": {"suppression_power": None},
    "no Gaussian": {"gaussian": False},
    "DisenDiff + token bank": {},
}
# Training switches beyond calibration: the nested-attention token bank (nested_attention.md §6A).
TRAIN_OVERRIDES: dict[str, dict[str, Any]] = {"DisenDiff + token bank": {"token_bank": 16}}
BACKGROUND_SWAP = "light blue"


@dataclass
class ExperimentSettings:
    """Training and measurement knobs shared by every variant."""

    steps: int = 200
    learning_rate: float = 5e-4
    attention_weight: float = 0.1
    micro_batch: int = 2
    grad_accumulation: int = 2
    map_layers: str = "latent/2"
    seed: int = 0
    sample_seeds: Sequence[int] = (11, 12, 13, 14)
    sample_steps: int = 20
    cfg: float = 5.0
    iou_steps: int = 10
    iou_denoise: float = 0.6
    augmentation: AugmentSettings = field(default_factory=toy.toy_augmentation)
    init: str = "rare"  # where triggers start: "rare" vocabulary rows or the "class" word
    loss_weighting: str = "eps+x0"  # new tokens learn a colour only so (TrainSettings.loss_weighting)


def specs_for(scene: sw.Scene) -> list[ConceptSpec]:
    """'Vi: shape' for each object of the scene."""
    return [ConceptSpec(f"V{i + 1}", obj.shape) for i, obj in enumerate(scene.objects)]


def caption_for(scene: sw.Scene, background: str = sw.DEFAULT_BACKGROUND) -> str:
    """'a V1 circle and a V2 square on a grey background' (the training caption)."""
    phrases = [f"a V{i + 1} {obj.shape}" for i, obj in enumerate(scene.objects)]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{text} on a {background} background"


def train_variant(bundle: Any, scene: sw.Scene, variant: str, settings: ExperimentSettings) -> TrainResult:
    """Learn the scene's concepts with one variant's calibration switches."""
    calibration = replace(CalibrationSettings(weight=settings.attention_weight), **VARIANTS[variant])
    train = TrainSettings(steps=settings.steps, learning_rate=settings.learning_rate,
                          micro_batch=settings.micro_batch, grad_accumulation=settings.grad_accumulation,
                          resolution=scene.size, seed=settings.seed, calibration=calibration,
                          map_layers=settings.map_layers, caption=caption_for(scene),
                          augmentation=settings.augmentation, init=settings.init,
                          loss_weighting=settings.loss_weighting,
                          **TRAIN_OVERRIDES.get(variant, {}))
    image = torch.from_numpy(scene.image.astype(np.float32) / 255.0)[None]
    with torch.inference_mode():  # as inside a node: the loop must cope with inference tensors
        base_model, base_clip = bundle.model.clone(), bundle.clip.clone()
    return train_concepts(base_model, base_clip, bundle.vae, image, specs_for(scene), train)


def concept_maps(bundle: Any, scene: sw.Scene, concepts: ConceptSet,
                 settings: ExperimentSettings) -> torch.Tensor:
    """[2n, h, w] maps on the training image: trigger then class word of each concept."""
    import comfy.sample

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
        store.set_tokens([p for g in groups for p in g])
        install_hook(model, AttentionRecorder(store=store), settings.map_layers)
        pixels = torch.from_numpy(scene.image.astype(np.float32) / 255.0)[None]
        latent = bundle.vae.encode(pixels)
        noise = comfy.sample.prepare_noise(latent, settings.seed)
        comfy.sample.sample(model, noise, settings.iou_steps, 1.0, "euler", "normal", positive, positive,
                            latent, denoise=settings.iou_denoise, seed=settings.seed, disable_pbar=True)
        token_maps = store.aggregate()  # [1, T, h, w]
        index, start = [], 0
        for g in groups:
            index.append(list(range(start, start + len(g))))
            start += len(g)
        return average_token_maps(token_maps, index)[0].float()


def attention_ious(maps: torch.Tensor, scene: sw.Scene) -> dict[str, float]:
    """Soft IoU of trigger/class maps with their own object and (mean) with the other objects."""
    n = len(scene.objects)
    own_t, other_t, own_c, other_c = [], [], [], []
    for i in range(n):
        trigger, klass = maps[2 * i], maps[2 * i + 1]
        own_t.append(ev.mask_iou(trigger, scene.masks[i]))
        own_c.append(ev.mask_iou(klass, scene.masks[i]))
        others = [j for j in range(n) if j != i]
        other_t.append(np.mean([ev.mask_iou(trigger, scene.masks[j]) for j in others]))
        other_c.append(np.mean([ev.mask_iou(klass, scene.masks[j]) for j in others]))
    return {"iou_trigger_own": float(np.mean(own_t)), "iou_trigger_other": float(np.mean(other_t)),
            "iou_class_own": float(np.mean(own_c)), "iou_class_other": float(np.mean(other_c))}


def _target(obj: sw.ObjectSpec) -> dict:
    return {"shape": obj.shape, "colour": obj.colour, "pattern": obj.pattern}


def generation_metrics(bundle: Any, scene: sw.Scene, concepts: ConceptSet,
                       settings: ExperimentSettings) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Fidelity, leakage, extra objects and text alignment from fixed-seed samples (and the images)."""
    model, clip = apply_concepts(bundle.model, bundle.clip, concepts)
    seeds = list(settings.sample_seeds)
    objects = scene.objects
    targets = [_target(o) for o in objects]
    fidelity, leak, extra, align, images = [], [], [], [], {}

    def sample(prompt: str) -> list:
        with torch.inference_mode():
            patched = type(bundle)(with_concept_banks(model, clip, prompt, concepts), clip, bundle.vae)
        pictures = quality.generate(patched, prompt, seeds, steps=settings.sample_steps, cfg=settings.cfg)
        images[prompt] = pictures
        return [ev.read_scene(p) for p in pictures]

    for i, obj in enumerate(objects):
        reads = sample(f"a V{i + 1} {obj.shape} on a grey background")
        fidelity += [ev.concept_fidelity(r, targets[i]) for r in reads]
        leak += [ev.leakage(r, targets[i], targets[j]) for r in reads for j in range(len(objects)) if j != i]
        extra.append(ev.extra_object_rate(reads, expected=1))
        prompt = f"a V{i + 1} {obj.shape} on a {BACKGROUND_SWAP} background"
        for r, picture in zip(sample(prompt), images[prompt]):
            align.append(ev.text_alignment(r, [{"shape": obj.shape}], BACKGROUND_SWAP,
                                           ev.read_background(picture)))
    combined_fidelity, combined_leak = [], []
    for r in sample(caption_for(scene)):
        for i in range(len(objects)):
            combined_fidelity.append(ev.concept_fidelity(r, targets[i]))
            combined_leak += [ev.leakage(r, targets[i], targets[j]) for j in range(len(objects)) if j != i]
    metrics = {"fidelity_single": float(np.mean(fidelity)), "leakage_single": float(np.mean(leak)),
               "extra_objects": float(np.mean(extra)), "text_alignment": float(np.mean(align)),
               "fidelity_combined": float(np.mean(combined_fidelity)),
               "leakage_combined": float(np.mean(combined_leak))}
    return metrics, images


def run_scene(bundle: Any, scene: sw.Scene, variant: str, settings: ExperimentSettings,
              generate: bool = True) -> dict[str, float]:
    """Train one variant on one scene and measure it."""
    result = train_variant(bundle, scene, variant, settings)
    row = attention_ious(concept_maps(bundle, scene, result.concepts, settings), scene)
    if generate:
        row.update(generation_metrics(bundle, scene, result.concepts, settings)[0])
    row["stopped"] = result.stopped
    return row
