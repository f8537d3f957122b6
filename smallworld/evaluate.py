"""Small-world evaluator: attribute read-out (see ``readout``) and per-prompt metrics.

Targets are attribute mappings such as ``{"shape": "circle", "colour": "purple", "pattern":
"stripes"}`` (``ObjectSpec.attributes(size)`` gives one; ``None`` values are ignored). An object is
identified with a target by shape first (the class word names it), then by the other attributes.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch

from . import scenes as sw
from .readout import (ObjectReadout, classify_colour, classify_pattern, classify_shape,  # noqa
                      label_components, read_background, read_scene, resize, segment,
                      simulate_vae, to_rgb255)

__all__ = [
    "ATTRIBUTES", "ATTRIBUTE_VALUES", "ObjectReadout", "best_match", "chance_leakage", "classify_colour",
    "classify_pattern", "classify_shape", "concept_fidelity", "extra_object_rate", "ground_truth_accuracy",
    "label_components", "leakage", "mask_iou", "match_masks", "read_background", "read_scene",
    "resize", "segment", "simulate_vae", "text_alignment", "to_rgb255",
]
ATTRIBUTES = ("shape", "colour", "pattern", "position")
ATTRIBUTE_VALUES = {"shape": sw.SHAPES, "colour": tuple(sw.COLOURS), "pattern": sw.PATTERNS}
Target = Mapping[str, Optional[str]]


def _wanted(target: Target, keys: Sequence[str] = ATTRIBUTES) -> dict:
    return {k: target[k] for k in keys if target.get(k) is not None}


def _score(readout: ObjectReadout, target: Target) -> float:
    got = readout.attributes()
    return sum((2.0 if k == "shape" else 1.0) * (got[k] == v) for k, v in _wanted(target).items())


def best_match(readouts: Sequence[ObjectReadout], target: Target) -> Optional[ObjectReadout]:
    """The object most like ``target`` (shape counts double; ties go to the larger object)."""
    if not readouts:
        return None
    return max(readouts, key=lambda r: (_score(r, target), r.area))


def concept_fidelity(readouts: Sequence[ObjectReadout], target: Target,
                     keys: Sequence[str] = ("shape", "colour", "pattern")) -> float:
    """Fraction of the target's ``keys`` reproduced by its best-matching object (0 if none)."""
    wanted = _wanted(target, keys)
    obj = best_match(readouts, wanted)
    if obj is None or not wanted:
        return 0.0
    got = obj.attributes()
    return sum(got[k] == v for k, v in wanted.items()) / len(wanted)


def leakage(readouts: Sequence[ObjectReadout], target: Target, other: Target,
            keys: Sequence[str] = ("colour", "pattern")) -> float:
    """Fraction of ``other``'s distinct ``keys`` (default colour, pattern) found on target's object.

    Only attributes where the two concepts differ count; 0.0 when they never differ or when no
    object is found (a missing object shows up in ``concept_fidelity`` instead).
    """
    differing = [k for k in keys if other.get(k) is not None and other.get(k) != target.get(k)]
    obj = best_match(readouts, target)
    if obj is None or not differing:
        return 0.0
    got = obj.attributes()
    return sum(got[k] == other[k] for k in differing) / len(differing)


def chance_leakage(readouts: Sequence[ObjectReadout], target: Target, other: Target,
                   used: Mapping[str, Iterable[str]], keys: Sequence[str] = ("colour", "pattern")) -> float:
    """What :func:`leakage` would read if a wrong attribute were the other's by chance only.

    For each attribute where the two concepts differ: the share of the target's object showing one
    given value that no object of the scene has (``used``: the values the scene's objects have),
    i.e. how often a value nobody asked for turns up. Leakage well above this is real bleed.
    """
    differing = [k for k in keys if other.get(k) is not None and other.get(k) != target.get(k)]
    obj = best_match(readouts, target)
    if obj is None or not differing:
        return 0.0
    got = obj.attributes()
    shares = []
    for key in differing:
        unused = [v for v in ATTRIBUTE_VALUES[key] if v not in set(used[key])]
        shares.append((got[key] in unused) / len(unused) if unused else 0.0)
    return float(np.mean(shares))


def extra_object_rate(readouts_per_image: Iterable[Sequence[ObjectReadout]],
                      expected: int = 1) -> float:
    """Fraction of images with more than ``expected`` objects (for single-concept prompts)."""
    counts = [len(r) for r in readouts_per_image]
    return float(np.mean([c > expected for c in counts])) if counts else 0.0


def text_alignment(readouts: Sequence[ObjectReadout], prompt_objects: Sequence[Target],
                   prompt_background: Optional[str] = None,
                   image_background: Optional[str] = None) -> float:
    """Fraction of prompted attributes obeyed (objects, plus the background if prompted).

    Prompted objects are paired one-to-one with read objects, best pairs first; a prompted object
    without a partner fails all its attributes. Pass ``image_background=read_background(image)``
    when the prompt names a background.
    """
    wanted = [_wanted(t) for t in prompt_objects]
    pairs = sorted(((_score(r, t), i, j) for i, t in enumerate(wanted)
                    for j, r in enumerate(readouts)), key=lambda p: (-p[0], p[1], p[2]))
    used_t, used_r, hits = set(), set(), 0
    for _, i, j in pairs:
        if i in used_t or j in used_r:
            continue
        used_t.add(i)
        used_r.add(j)
        got = readouts[j].attributes()
        hits += sum(got[k] == v for k, v in wanted[i].items())
    total = sum(len(w) for w in wanted)
    if prompt_background is not None:
        total += 1
        hits += int(image_background == prompt_background)
    return hits / total if total else 1.0


def mask_iou(attention: "np.ndarray | torch.Tensor", mask: np.ndarray,
             threshold: Optional[float] = None) -> float:
    """IoU of an attention map [h,w] with a ground-truth mask [H,W].

    The map is resized bilinearly to the mask's size and min-max normalised to [0, 1]. With
    ``threshold=None`` it is the soft (fuzzy Jaccard) IoU sum(min(m, g)) / sum(max(m, g)), which
    rewards maps that are both concentrated and on the object; with a threshold the map is first
    binarised at ``m >= threshold``. Both empty -> 1.0.
    """
    if isinstance(attention, torch.Tensor):
        attention = attention.detach().cpu().float().numpy()
    m, g = np.asarray(attention, dtype=np.float64), np.asarray(mask, dtype=bool)
    if m.ndim != 2 or g.ndim != 2:
        raise ValueError(f"expected 2-D map and mask, got {m.shape} and {g.shape}")
    m = resize(m, g.shape)
    span = m.max() - m.min()
    m = (m - m.min()) / span if span > 0 else np.zeros_like(m)
    if threshold is not None:
        m = (m >= threshold).astype(np.float64)
    union = np.maximum(m, g).sum()
    return float(np.minimum(m, g).sum() / union) if union > 0 else 1.0


def match_masks(readouts: Sequence[ObjectReadout], masks: np.ndarray,
                min_iou: float = 0.3) -> List[Optional[ObjectReadout]]:
    """Pair ground-truth masks [N,H,W] with read objects one-to-one by IoU (None if < min_iou)."""
    ious = [((gt & r.mask).sum() / max((gt | r.mask).sum(), 1), i, j)
            for i, gt in enumerate(masks) for j, r in enumerate(readouts)]
    out: List[Optional[ObjectReadout]] = [None] * len(masks)
    used = set()
    for iou, i, j in sorted(ious, reverse=True):
        if iou >= min_iou and out[i] is None and j not in used:
            out[i] = readouts[j]
            used.add(j)
    return out


def ground_truth_accuracy(scenes: Iterable[sw.Scene],
                          transform: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> dict:
    """Read-out accuracy on generator scenes (optionally transformed, e.g. ``simulate_vae``).

    Returns per-object accuracies for shape, colour, pattern and position (an unmatched object
    counts as wrong), per-scene count accuracy, background accuracy and the totals.
    """
    keys = ("shape", "colour", "pattern", "position")
    hits = dict.fromkeys(keys, 0)
    n_obj = n_scene = count_ok = bg_ok = 0
    for scene in scenes:
        image = scene.image if transform is None else transform(scene.image)
        readouts = read_scene(image)
        n_scene += 1
        count_ok += len(readouts) == len(scene.objects)
        bg_ok += read_background(image) == scene.background
        for obj, got in zip(scene.objects, match_masks(readouts, scene.masks)):
            n_obj += 1
            if got is not None:
                want = obj.attributes(scene.size)
                for k in keys:
                    hits[k] += got.attributes()[k] == want[k]
    acc = {k: hits[k] / max(n_obj, 1) for k in keys}
    acc.update(count=count_ok / max(n_scene, 1), background=bg_ok / max(n_scene, 1),
               objects=n_obj, scenes=n_scene)
    return acc
