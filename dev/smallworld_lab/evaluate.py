"""Small-world evaluator (v2): attribute read-out (see ``readout``), matching and per-picture metrics.

Targets are attribute mappings such as ``{"shape": "circle", "colour": "purple", "pattern":
"stripes"}`` (``ObjectSpec.attributes(size)`` gives one; ``None`` values are ignored).

**Matching** (:func:`match_targets`): targets and read objects are paired one-to-one, minimising the
attribute distance; a shape mismatch weighs more than every other mismatch of the picture together
(the class word names the shape, so shape decides first). A pair is made only if the object shares
an attribute with the target and does not have another target's shape (a circle is never the
square's object). A target left without an object is *not drawn*; objects left over are *extra
objects*. Ties go to the larger object, then to the earlier target.

**Per-picture metrics** (:func:`score_picture`), for each prompted target:

- ``fidelity_cp``: share of colour and pattern right (0 when not drawn); ``shape_right`` apart;
- ``colour_leak``: per other concept of the scene with another colour, 1 if the target's object has
  that concept's colour (drawn targets only: a missing object is never leakage); ``cp_leak`` the
  share of colour and pattern (where they differ) that are the other concept's;
- ``colour_leak_chance`` / ``cp_leak_chance``: what leakage reads if wrong values were the other
  concept's by chance only. For an attribute with values V, the scene's concepts using S ⊂ V and
  U = V − S nobody asked for, an object shows one given unasked value with probability
  p = [value ∈ U] / |U|; under the null hypothesis that wrong values are exchangeable the other
  concept's value turns up just as often, so the chance level is p averaged like the leakage.
- Extra objects cannot help: objects left over that are as plausible as the matched one (same
  shape agreement, sharing an attribute with the target) are the target's *duplicates*; each
  attribute is scored on the worst of the object and its duplicates (right only if all are right,
  leaked if any has leaked; the chance level then is 1 − Π(1 − p) over them).
- ``extra_rate``: 1 for a picture with an object left over, else 0.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch

from concept_attention.smallworld import scenes as sw
from .readout import (ObjectReadout, classify_colour, classify_pattern, classify_shape,  # noqa
                      label_components, read_background, read_scene, resize, segment,
                      simulate_vae, to_rgb255)

__all__ = [
    "ATTRIBUTES", "ATTRIBUTE_VALUES", "SCORED", "ObjectReadout", "assign", "classify_colour",
    "classify_pattern", "classify_shape", "ground_truth_accuracy", "iou_ceiling", "label_components",
    "mask_iou", "match_masks", "match_targets", "read_background", "read_scene", "resize",
    "score_picture", "segment", "simulate_vae", "text_alignment", "to_rgb255",
]
ATTRIBUTES = ("shape", "colour", "pattern", "position")
ATTRIBUTE_VALUES = {"shape": sw.SHAPES, "colour": tuple(sw.COLOURS), "pattern": sw.PATTERNS}
SCORED = ("colour", "pattern")  # what fidelity and leakage score; the class word gives the shape
Target = Mapping[str, Optional[str]]


def _wanted(target: Target, keys: Sequence[str] = ATTRIBUTES) -> dict:
    return {k: target[k] for k in keys if target.get(k) is not None}


def assign(cost: "np.ndarray | Sequence[Sequence[float]]") -> List[int]:
    """Minimum-cost assignment of each row to its own column (rows <= columns): column per row.

    The Hungarian method with row and column potentials, O(rows^2 x columns).
    """
    cost = np.asarray(cost, dtype=np.float64)
    rows, cols = cost.shape
    if rows > cols:
        raise ValueError(f"assign needs at least as many columns as rows, got {cost.shape}")
    u, v = np.zeros(rows + 1), np.zeros(cols + 1)
    owner = np.zeros(cols + 1, dtype=int)  # owner[j]: 1-based row holding column j (0: free)
    for row in range(1, rows + 1):
        owner[0], col = row, 0
        slack, came_from = np.full(cols + 1, np.inf), np.zeros(cols + 1, dtype=int)
        done = np.zeros(cols + 1, dtype=bool)
        while owner[col]:  # grow the alternating tree until it reaches a free column
            done[col] = True
            r = owner[col]
            reduced = cost[r - 1] - u[r] - v[1:]
            better = ~done[1:] & (reduced < slack[1:])
            slack[1:][better] = reduced[better]
            came_from[1:][better] = col
            free = np.where(done[1:], np.inf, slack[1:])
            nxt = int(np.argmin(free)) + 1
            delta = free[nxt - 1]
            u[owner[done]] += delta
            v[done] -= delta
            slack[~done] -= delta
            col = nxt
        while col:  # flip the path back to the root
            prev = came_from[col]
            owner[col] = owner[prev]
            col = prev
    out = [-1] * rows
    for j in range(1, cols + 1):
        if owner[j]:
            out[owner[j] - 1] = j - 1
    return out


def _mismatch(readout: ObjectReadout, target: dict, shape_weight: int) -> int:
    got = readout.attributes()
    return sum((shape_weight if k == "shape" else 1) * (got[k] != v) for k, v in target.items())


def _allowed(readout: ObjectReadout, target: dict, shapes: Iterable[str]) -> bool:
    """Can this object be the target's: it shares an attribute with it and has no other target's shape.

    ``shapes`` are the shapes of every target of the picture: a circle is the circle target's object
    or an extra one, never the square target's, whatever its colours.
    """
    got = readout.attributes()
    if "shape" in target and got["shape"] != target["shape"] and got["shape"] in set(shapes):
        return False
    return any(got[k] == v for k, v in target.items())


def match_targets(readouts: Sequence[ObjectReadout], targets: Sequence[Target]) -> List[Optional[int]]:
    """Index of each target's object in ``readouts`` (None: not drawn), one-to-one; see the module doc."""
    wanted = [_wanted(t) for t in targets]
    if not wanted or not readouts:
        return [None] * len(wanted)
    shapes = [w["shape"] for w in wanted if "shape" in w]
    shape_weight = 1 + sum(len(w) - ("shape" in w) for w in wanted)  # one shape outweighs the rest
    n, m = len(wanted), len(readouts)
    by_size = sorted(range(m), key=lambda j: (-readouts[j].area, j))
    rank = {j: r + 1 for r, j in enumerate(by_size)}
    scale = n * (m + 1) * (n + 1) + 1  # tie costs (larger object, then earlier target) sum below it
    cost = np.empty((n, m + n))
    for i, target in enumerate(wanted):
        alone = sum(shape_weight if k == "shape" else 1 for k in target)  # every attribute wrong
        for j, r in enumerate(readouts):
            primary = _mismatch(r, target, shape_weight) if _allowed(r, target, shapes) else alone + 1
            cost[i, j] = primary * scale + rank[j] * (n + 1) + i
        cost[i, m:] = alone * scale  # "not drawn" columns
    return [j if j < m else None for j in assign(cost)]


def _duplicates(readouts: Sequence[ObjectReadout], target: dict, chosen: int, left: Iterable[int],
                shapes: Iterable[str]) -> List[int]:
    """Left-over objects as plausible for ``target`` as the chosen one (allowed, same shape agreement)."""
    def shape_right(j: int) -> bool:
        return readouts[j].shape == target.get("shape", readouts[j].shape)

    return [j for j in left if _allowed(readouts[j], target, shapes) and shape_right(j) == shape_right(chosen)]


def _chance(values: Sequence[str], key: str, targets: Sequence[Target]) -> float:
    """Chance that one of ``values`` (the target's objects) is a given value no concept asked for."""
    unasked = [v for v in ATTRIBUTE_VALUES[key] if v not in {t.get(key) for t in targets}]
    if not unasked:
        return 0.0
    p = [(value in unasked) / len(unasked) for value in values]
    return float(1.0 - np.prod([1.0 - q for q in p]))


def score_picture(readouts: Sequence[ObjectReadout], targets: Sequence[Target],
                  prompted: Optional[Sequence[int]] = None) -> dict:
    """The v2 metrics of one picture: per-target value lists (see the module doc), keyed by metric.

    ``targets`` are all concepts of the scene (leakage compares with each other one, chance levels
    exclude all their values); ``prompted`` the indices of those the prompt asked for (default all).
    """
    prompted = list(range(len(targets))) if prompted is None else list(prompted)
    asked = [targets[i] for i in prompted]
    matched = match_targets(readouts, asked)
    shapes = [t["shape"] for t in asked if t.get("shape") is not None]
    left = [j for j in range(len(readouts)) if j not in matched]
    out: dict = {k: [] for k in ("fidelity_cp", "shape_right", "not_drawn", "colour_leak",
                                 "colour_leak_chance", "cp_leak", "cp_leak_chance")}
    out["extra_rate"] = [float(bool(left))]
    for i, chosen in zip(prompted, matched):
        target = targets[i]
        out["not_drawn"].append(float(chosen is None))
        if chosen is None:
            out["fidelity_cp"].append(0.0)
            out["shape_right"].append(0.0)
            continue
        objects = [chosen] + _duplicates(readouts, _wanted(target), chosen, left, shapes)
        seen = {k: [readouts[j].attributes()[k] for j in objects] for k in SCORED}
        keys = [k for k in SCORED if target.get(k) is not None]
        out["fidelity_cp"].append(float(np.mean([all(v == target[k] for v in seen[k]) for k in keys]))
                                  if keys else 0.0)
        out["shape_right"].append(float(readouts[chosen].shape == target.get("shape")))
        for j, other in enumerate(targets):
            differing = [k for k in keys if other.get(k) is not None and other[k] != target[k]]
            if j == i or not differing:
                continue
            leaked = {k: float(other[k] in seen[k]) for k in differing}
            chance = {k: _chance(seen[k], k, targets) for k in differing}
            if "colour" in differing:
                out["colour_leak"].append(leaked["colour"])
                out["colour_leak_chance"].append(chance["colour"])
            out["cp_leak"].append(float(np.mean(list(leaked.values()))))
            out["cp_leak_chance"].append(float(np.mean(list(chance.values()))))
    return out


def text_alignment(readouts: Sequence[ObjectReadout], prompt_objects: Sequence[Target],
                   prompt_background: Optional[str] = None,
                   image_background: Optional[str] = None) -> float:
    """Fraction of prompted attributes obeyed (objects, plus the background if prompted).

    Prompted objects are paired one-to-one with read objects (:func:`match_targets`); a prompted
    object without a partner fails all its attributes. Pass ``image_background=read_background(image)``
    when the prompt names a background.
    """
    wanted = [_wanted(t) for t in prompt_objects]
    hits = 0
    for target, j in zip(wanted, match_targets(readouts, wanted)):
        if j is not None:
            got = readouts[j].attributes()
            hits += sum(got[k] == v for k, v in target.items())
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


def iou_ceiling(mask: np.ndarray, map_shape: Sequence[int]) -> float:
    """Soft IoU of the mask itself area-pooled to ``map_shape``: the ceiling at the map's resolution.

    Scored by :func:`mask_iou`, the same path as the attention maps (bilinear upsampling, min-max).
    """
    mask = np.asarray(mask, dtype=bool)
    return mask_iou(resize(mask.astype(np.float64), (int(map_shape[0]), int(map_shape[1])), "area"), mask)


def match_masks(readouts: Sequence[ObjectReadout], masks: np.ndarray,
                min_iou: float = 0.3) -> List[Optional[ObjectReadout]]:
    """Pair ground-truth masks [N,H,W] with read objects one-to-one by IoU (None if < min_iou)."""
    n, m = len(masks), len(readouts)
    if not n or not m:
        return [None] * n
    iou = np.array([[(gt & r.mask).sum() / max((gt | r.mask).sum(), 1) for r in readouts] for gt in masks])
    cost = np.hstack([np.where(iou >= min_iou, 1.0 - iou, 3.0), np.full((n, n), 2.0)])
    return [readouts[j] if j < m else None for j in assign(cost)]


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
