"""Do the base model's class words localise? The toy world's stand-in for SD's class-word maps.

DisenDiff binds each trigger to its class word's cross-attention map, so those maps must be good
pseudo-masks. Protocol (``docs/toy_world.md``): held-out scenes of the pretraining distribution
(distinct shapes, so every class word names one object), each encoded with the VAE, noised at
timestep fraction ``t`` (sigma index ``round(t (N - 1))``), one UNet pass with the scene's full
caption (cond only); each class word's head-averaged probability map (softmax over all 77 keys),
averaged over the layers of a group (same resolution). Per object:

- soft IoU: ``evaluate.mask_iou`` (bilinear to the image, min-max normalised) with its mask;
  thresholded IoU: the same map binarised at 0.5;
- ceiling: the same two numbers for the object's mask area-pooled to the map's size, through the
  same code path (the best any map of that resolution can score);
- mass: the raw map, bilinear to the image, on the own object, the other objects, the background;
- argmax (scenes with several objects): share of object pixels whose strongest class word is their
  own; chance is what guessing each word in proportion to its object's area gets.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from concept_attention.attention.patching import install_hook, model_layers
from concept_attention.attention.recorder import AttentionRecorder, MapStore
from concept_attention.attention.tokens import phrase_ids, token_stream
from concept_attention.smallworld import scenes as sw
from .evaluate import mask_iou
from .readout import resize
from .supervision import WordPositions

NOISE_LEVELS: tuple[float, ...] = tuple(round(0.05 + 0.1 * i, 2) for i in range(10))  # uniform-t bins
LOW_NOISE = 0.5  # the "t <= 0.5" average
HELD_OUT_SEED = 424242  # never a pretraining seed
GATES = {"soft_low": 0.8, "soft_uniform": 0.6, "thresholded_objects": 0.9, "argmax": 0.95}


def held_out_scenes(n: int, seed: int = HELD_OUT_SEED) -> list[sw.Scene]:
    """``n`` scenes of the pretraining distribution, full captions, no shape twice in a scene."""
    scenes, i = [], 0
    while len(scenes) < n:
        scene = sw.pretraining_scene(np.random.default_rng([seed, i]))
        i += 1
        shapes = [o.shape for o in scene.objects]
        if len(set(shapes)) == len(shapes):
            scenes.append(scene)
    return scenes


def object_word_positions(clip: Any, caption: str, objects: Sequence[sw.ObjectSpec]) -> list[dict[str, list[int]]]:
    """Token positions of each object's shape, colour and pattern words in ``caption`` (see ``WordPositions``)."""
    return WordPositions(lambda word: phrase_ids(clip, word))(token_stream(clip, caption), objects)


def sigma_at(model: Any, t: float) -> torch.Tensor:
    """The model's sigma at timestep fraction ``t`` (index ``round(t (N - 1))`` of its table)."""
    sigmas = model.model.model_sampling.sigmas
    return sigmas[int(round(t * (len(sigmas) - 1)))].float()


def group_names(model: Any) -> list[str]:
    """Layer groups of a model, finest first: ``latent/1``, ``latent/2``, ..."""
    return [f"latent/{d}" for d in sorted({layer.downscale for layer in model_layers(model)})]


def word_maps(model: Any, latents: torch.Tensor, context: torch.Tensor, sigma: torch.Tensor,
              token_index: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Noise ``latents`` [B,4,h,w] at ``sigma``, one UNet pass: maps [B,T,H,W] per layer group.

    ``token_index`` [B, T] picks the words per row; each word's map is the head-averaged
    probability, averaged over the group's layers.
    """
    import comfy.model_management as mm

    base = model.model
    store = MapStore()
    store.set_tokens(token_index)
    patched = model.clone()
    install_hook(patched, AttentionRecorder(store=store, rows="all"), "all")
    # Clones share one UNet whose weights hold the patches of whichever clone ComfyUI loaded last
    # (a LoRA, a learned concept's K/V); a direct UNet call must load this model's own first.
    mm.load_models_gpu([patched], force_full_load=True)
    device = patched.load_device
    noise = torch.randn(latents.shape, generator=generator)
    sigmas = sigma.reshape(1).expand(latents.shape[0]).to(device)
    x_t = base.model_sampling.noise_scaling(sigmas, noise.to(device), latents.to(device))
    options = dict(patched.model_options["transformer_options"])
    with torch.no_grad():
        base.apply_model(x_t, sigmas, c_crossattn=context.to(device), transformer_options=options)
    by_size: dict[int, list[torch.Tensor]] = {}
    for maps in store.layer_maps():
        by_size.setdefault(maps.shape[-1], []).append(maps.float().cpu())
    latent_side = latents.shape[-1]
    return {f"latent/{latent_side // side}": torch.stack(group).mean(0) for side, group in by_size.items()}


def pooled_mask(mask: np.ndarray, side: int) -> np.ndarray:
    """The mask area-averaged to ``side`` x ``side`` (what a perfect map of that size holds)."""
    return resize(mask.astype(np.float64), (side, side), mode="area")


@dataclass
class ObjectRow:
    """One object's numbers at one layer group, noise level and noise seed."""

    scene: int
    obj: int
    objects: int
    group: str
    t: float
    soft: float
    thresholded: float
    ceiling: float
    ceiling_thresholded: float
    own: float
    other: float
    background: float


@dataclass
class ArgmaxRow:
    """Object pixels of one multi-object scene assigned to their own class word."""

    scene: int
    group: str
    t: float
    right: int
    pixels: int
    chance: float  # expected right pixels of an area-proportional guess


def measure_scene(scene_id: int, scene: sw.Scene, maps: torch.Tensor, group: str, t: float,
                  ceilings: dict) -> tuple[list[ObjectRow], Optional[ArgmaxRow]]:
    """Rows of one scene's class-word maps [T, h, w] (one per object, in order)."""
    n, size = len(scene.objects), scene.size
    up = np.stack([np.clip(resize(m.numpy().astype(np.float64), (size, size)), 0, None) for m in maps[:n]])
    total = up.sum((1, 2)) + 1e-12
    union = scene.masks.any(0)
    rows = []
    for i in range(n):
        key = (scene_id, i, maps.shape[-1])
        if key not in ceilings:
            pooled = pooled_mask(scene.masks[i], maps.shape[-1])
            ceilings[key] = (mask_iou(pooled, scene.masks[i]), mask_iou(pooled, scene.masks[i], 0.5))
        own = float((up[i] * scene.masks[i]).sum() / total[i])
        other = float((up[i] * (union & ~scene.masks[i])).sum() / total[i])
        rows.append(ObjectRow(scene_id, i, n, group, t, mask_iou(maps[i], scene.masks[i]),
                              mask_iou(maps[i], scene.masks[i], 0.5), *ceilings[key], own, other,
                              1.0 - own - other))
    if n < 2:
        return rows, None
    owner = np.argmax(scene.masks, 0)
    strongest = np.argmax(up, 0)
    areas = scene.masks.reshape(n, -1).sum(1).astype(np.float64)
    right = int((strongest[union] == owner[union]).sum())
    return rows, ArgmaxRow(scene_id, group, t, right, int(union.sum()), float((areas ** 2).sum() / areas.sum()))


@dataclass
class LocalisationReport:
    """Object and argmax rows over groups and noise levels, with the tables and gates built on them."""

    objects: list[ObjectRow] = field(default_factory=list)
    argmax: list[ArgmaxRow] = field(default_factory=list)

    def summary(self, group: str, t: Optional[float] = None, low_only: bool = False) -> dict[str, float]:
        """Means at one noise level (``t``), over t <= 0.5 (``low_only``) or over every level."""
        rows = [r for r in self.objects if r.group == group and (t is None or r.t == t)
                and (not low_only or r.t <= LOW_NOISE)]
        picks = [r for r in self.argmax if r.group == group and (t is None or r.t == t)
                 and (not low_only or r.t <= LOW_NOISE)]
        mean = {name: float(np.mean([getattr(r, name) for r in rows]))
                for name in ("soft", "thresholded", "ceiling", "ceiling_thresholded", "own", "other", "background")}
        mean["share"] = mean["soft"] / mean["ceiling"]
        per_object: dict[tuple[int, int], list[float]] = {}
        for r in rows:
            per_object.setdefault((r.scene, r.obj), []).append(r.thresholded)
        mean["objects_thresholded"] = float(np.mean([np.mean(v) >= 0.5 for v in per_object.values()]))
        pixels = sum(p.pixels for p in picks)
        mean["argmax"] = sum(p.right for p in picks) / pixels if pixels else float("nan")
        mean["chance"] = sum(p.chance for p in picks) / pixels if pixels else float("nan")
        return mean

    def groups(self) -> list[str]:
        """Layer groups measured, finest first."""
        return sorted({r.group for r in self.objects}, key=lambda g: int(g.split("/")[1]))

    def levels(self) -> list[float]:
        """Noise levels measured."""
        return sorted({r.t for r in self.objects})

    def table(self, levels: Optional[Sequence[float]] = None) -> str:
        """Markdown: one row per group and noise level (``levels``: a subset), then the t <= 0.5 and
        uniform-t averages (always over every level measured)."""
        head = ("| group | t | soft IoU | ceiling | share | own / other / bg mass | thr. IoU (ceiling) "
                "| objects thr. ≥ 0.5 | argmax (chance) |\n|---|---|---|---|---|---|---|---|---|")
        lines = [head]
        for group in self.groups():
            cases = [(f"{t:.2f}", self.summary(group, t=t)) for t in self.levels() if levels is None or t in levels]
            cases += [("**≤ 0.5**", self.summary(group, low_only=True)), ("**all**", self.summary(group))]
            for label, s in cases:
                lines.append(f"| {group} | {label} | {s['soft']:.2f} | {s['ceiling']:.2f} | {s['share']:.0%} | "
                             f"{s['own']:.2f} / {s['other']:.2f} / {s['background']:.2f} | "
                             f"{s['thresholded']:.2f} ({s['ceiling_thresholded']:.2f}) | "
                             f"{s['objects_thresholded']:.0%} | {s['argmax']:.0%} ({s['chance']:.0%}) |")
        return "\n".join(lines)

    def gates(self, group: str) -> dict[str, tuple[float, float, bool]]:
        """Each acceptance gate at ``group``: (measured, required, passed)."""
        low, every = self.summary(group, low_only=True), self.summary(group)
        values = {"soft_low": low["share"], "soft_uniform": every["share"],
                  "thresholded_objects": low["objects_thresholded"], "argmax": low["argmax"]}
        return {name: (value, GATES[name], bool(value >= GATES[name])) for name, value in values.items()}

    def to_json(self) -> str:
        """Raw rows, one column per field, floats to 4 decimals (every table is rebuilt from them)."""
        def columns(rows: list) -> dict:
            names = list(vars(rows[0])) if rows else []
            return {n: [round(v, 4) if isinstance(v, float) else v for v in (getattr(r, n) for r in rows)]
                    for n in names}
        return json.dumps({"objects": columns(self.objects), "argmax": columns(self.argmax)})

    @classmethod
    def from_json(cls, text: str) -> "LocalisationReport":
        """Rows written by ``to_json``."""
        raw = json.loads(text)

        def rows(kind: type, cols: dict) -> list:
            return [kind(*values) for values in zip(*(cols[f] for f in kind.__dataclass_fields__))] if cols else []
        return cls(rows(ObjectRow, raw["objects"]), rows(ArgmaxRow, raw["argmax"]))


def localisation_report(bundle: Any, scenes: Sequence[sw.Scene], levels: Sequence[float] = NOISE_LEVELS,
                        seeds: int = 2, batch: int = 32) -> LocalisationReport:
    """Measure every scene's class-word maps at every layer group and noise level."""
    report = LocalisationReport()
    model, clip, vae = bundle.model, bundle.clip, bundle.vae
    width = max(len(s.objects) for s in scenes)
    contexts, indices, latents = [], [], []
    with torch.inference_mode():
        for scene in scenes:
            positions = object_word_positions(clip, scene.caption, scene.objects)
            shape_rows = [p["shape"][0] for p in positions]
            indices.append(shape_rows + [0] * (width - len(shape_rows)))  # padding reads the start token
            contexts.append(clip.encode_from_tokens(clip.tokenize(scene.caption)))
            pixels = torch.from_numpy(scene.image.astype(np.float32) / 255.0)[None]
            latents.append(model.model.process_latent_in(vae.encode(pixels)).float())
    rows = [(k, seed) for k in range(len(scenes)) for seed in range(seeds)]
    ceilings: dict = {}
    for t in levels:
        sigma = sigma_at(model, t)
        generator = torch.Generator().manual_seed(int(1000 * t))
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            picked = [k for k, _ in chunk]
            maps = word_maps(model, torch.cat([latents[k] for k in picked]), torch.cat([contexts[k] for k in picked]),
                             sigma, torch.tensor([indices[k] for k in picked]), generator)
            for group, grouped in maps.items():
                for row, k in enumerate(picked):
                    found, choice = measure_scene(k, scenes[k], grouped[row], group, t, ceilings)
                    report.objects += found
                    if choice is not None:
                        report.argmax.append(choice)
    return report
