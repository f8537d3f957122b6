"""Read shape, colour, pattern and position of objects back from a small-world image.

- Segmentation: the background colour is the median of the border pixels; object pixels differ
  from it by more than ``threshold`` (RGB distance); holes are filled; 4-connected components
  smaller than ``min_area`` (default 0.2 % of the image) are dropped as specks.
- Colour (analytic): blur and patterns only mix the object colour with ``INK`` and the background,
  so the object colour is the palette colour whose triangle (colour, ink, background) lies nearest
  (mean distance, capped) to the object's interior pixels.
- Pattern and shape (small classifiers trained on generator output): 7-nearest neighbours over
  objects of fixed-seed generator scenes, each drawn sharp and through ``simulate_vae``. Pattern
  features are the autocorrelations of the colour->ink coordinate at lags of one pattern cell
  (along y, x, diagonal; orientation-free) plus its mean and spread; an object whose coordinate
  hardly varies is solid. Shape features are the mask's bounding-box crop resized to 24x24.
- Position: thirds of the image, as in captions.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Tuple

import numpy as np
import torch

from concept_attention.smallworld import scenes as sw

_PALETTE = np.array(list(sw.COLOURS.values()), dtype=np.float64)
_INK = np.array(sw.INK, dtype=np.float64)
_CROP = 24
_FIT_SEED, _FIT_SCENES, _K = 8675309, 120, 7


@dataclass
class ObjectReadout:
    """One object found in an image: attribute names, centre (x, y), area and its mask [H,W]."""

    shape: str
    colour: str
    pattern: str
    position: str
    centre: Tuple[float, float]
    area: int
    mask: np.ndarray

    def attributes(self) -> dict:
        """Attribute names, keyed like ``ObjectSpec.attributes``."""
        return {"shape": self.shape, "colour": self.colour, "pattern": self.pattern,
                "position": self.position}


def to_rgb255(image) -> np.ndarray:
    """[H,W,3] uint8 / float in [0,1] / torch tensor -> float64 array in 0..255."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an [H,W,3] image, got shape {arr.shape}")
    floating = np.issubdtype(arr.dtype, np.floating)
    arr = arr.astype(np.float64)
    return arr * 255.0 if floating and arr.max() <= 1.0 + 1e-6 else arr


def resize_matrix(n_in: int, n_out: int, mode: str = "bilinear") -> np.ndarray:
    """[n_out, n_in] 1-D resampling weights: 'bilinear' (half-pixel centres) or 'area' overlap."""
    if mode == "area":
        edges = np.arange(n_out + 1) * (n_in / n_out)
        lo, hi = edges[:-1, None], edges[1:, None]
        src = np.arange(n_in)[None]
        overlap = np.clip(np.minimum(hi, src + 1) - np.maximum(lo, src), 0.0, None)
        return overlap / overlap.sum(1, keepdims=True)
    pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = np.zeros((n_out, n_in))
    np.add.at(w, (np.arange(n_out), i0), 1.0 - (pos - i0))
    np.add.at(w, (np.arange(n_out), i1), pos - i0)
    return w


def resize(array: np.ndarray, shape: Tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Resize the first two axes of ``array`` (numpy only, separable weights)."""
    wy = resize_matrix(array.shape[0], shape[0], mode)
    wx = resize_matrix(array.shape[1], shape[1], mode)
    out = np.tensordot(wy, array.astype(np.float64), axes=(1, 0))
    return np.swapaxes(np.tensordot(wx, out, axes=(1, 1)), 0, 1)


def simulate_vae(image, factor: int = 8, shift: int = 0) -> np.ndarray:
    """Crude VAE stand-in: ``factor``x average-pool, bilinear upsample (grid offset ``shift``)."""
    img = np.roll(to_rgb255(image), (shift, shift), axis=(0, 1))
    h, w, _ = img.shape
    if h % factor or w % factor:
        raise ValueError(f"image side {h}x{w} is not a multiple of {factor}")
    small = img.reshape(h // factor, factor, w // factor, factor, 3).mean((1, 3))
    up = np.roll(resize(small, (h, w)), (-shift, -shift), axis=(0, 1))
    return np.clip(np.round(up), 0, 255).astype(np.uint8)


def border_colour(img: np.ndarray) -> np.ndarray:
    """Median RGB of the image border (the background estimate)."""
    return np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]), axis=0)


def read_background(image) -> str:
    """Nearest background name to the median border colour."""
    colour = border_colour(to_rgb255(image))
    names = list(sw.BACKGROUNDS)
    return names[int(np.argmin([np.linalg.norm(colour - sw.BACKGROUNDS[n]) for n in names]))]


def label_components(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """4-connected components: (labels [H,W], 0 = off, count); scipy when installed."""
    try:
        from scipy import ndimage
    except ImportError:
        return _label_numpy(mask)
    labels, count = ndimage.label(mask)
    return labels.astype(np.int64), int(count)


def _label_numpy(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        new = lab.copy()
        new[1:] = np.minimum(new[1:], lab[:-1])
        new[:-1] = np.minimum(new[:-1], lab[1:])
        new[:, 1:] = np.minimum(new[:, 1:], lab[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], lab[:, 1:])
        new = np.where(mask, new, big)
        new = np.where(mask, np.append(new.ravel(), big)[new], big)  # pointer jumping
        if np.array_equal(new, lab):
            break
        lab = new
    roots, inverse = np.unique(lab[mask], return_inverse=True)
    out = np.zeros((h, w), dtype=np.int64)
    out[mask] = inverse + 1
    return out, len(roots)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    labels, _ = label_components(~mask)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return mask | ((labels > 0) & ~np.isin(labels, edge))


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        inner = out.copy()
        inner[1:] &= out[:-1]
        inner[:-1] &= out[1:]
        inner[:, 1:] &= out[:, :-1]
        inner[:, :-1] &= out[:, 1:]
        inner[[0, -1]] = False
        inner[:, [0, -1]] = False
        out = inner
    return out


def _interior(mask: np.ndarray) -> np.ndarray:
    for steps in (3, 2, 1):
        inner = _erode(mask, steps)
        if inner.sum() >= max(20, 0.3 * mask.sum()):
            return inner
    return mask


def segment(image, threshold: float = 45.0, min_area: Optional[int] = None) -> List[np.ndarray]:
    """Object masks: pixels farther than ``threshold`` from the border colour, holes filled."""
    img = to_rgb255(image)
    h, w, _ = img.shape
    min_area = max(16, h * w // 500) if min_area is None else min_area
    fg = np.linalg.norm(img - border_colour(img), axis=-1) > threshold
    labels, count = label_components(_fill_holes(fg))
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    return [labels == k for k in range(1, count + 1) if areas[k] >= min_area]


def _seg_dist(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-9), 0.0, 1.0)
    return np.linalg.norm(p - a - t[..., None] * ab, axis=-1)


def classify_colour(pixels: np.ndarray, background: Optional[np.ndarray] = None) -> str:
    """Palette colour whose (colour, ink, background) triangle best explains [N,3] pixels."""
    p = pixels[::max(1, len(pixels) // 1500), None, :]
    k = _INK
    g = _INK if background is None else np.asarray(background, dtype=np.float64)
    e1, e2, rel = _PALETTE - k, g - k, p - k
    a11, a12, a22 = (e1 * e1).sum(-1), (e1 * e2).sum(-1), float(e2 @ e2)
    r1, r2 = (rel * e1).sum(-1), rel @ e2
    det = np.maximum(a11 * a22 - a12 * a12, 1e-9)
    a, b = (r1 * a22 - r2 * a12) / det, (a11 * r2 - a12 * r1) / det
    inside = (a >= 0) & (b >= 0) & (a + b <= 1) & (a22 > 0)
    plane = np.linalg.norm(rel - a[..., None] * e1 - b[..., None] * e2, axis=-1)
    edges = np.minimum(np.minimum(_seg_dist(p, k, _PALETTE), _seg_dist(p, k, g[None])),
                       _seg_dist(p, _PALETTE, g[None]))
    dist = np.minimum(np.where(inside, plane, edges), 60.0)
    return list(sw.COLOURS)[int(dist.mean(0).argmin())]


def _autocorr(t: np.ndarray, mask: np.ndarray, dy: int, dx: int) -> float:
    h, w = t.shape
    a, b = (slice(0, h - dy), slice(0, w - dx)), (slice(dy, h), slice(dx, w))
    both = mask[a] & mask[b]
    if both.sum() < 8:
        return 0.0
    mu, var = t[mask].mean(), max(float(t[mask].var()), 1e-9)
    return float(((t[a][both] - mu) * (t[b][both] - mu)).mean() / var)


def pattern_features(img: np.ndarray, inner: np.ndarray, colour: str, cell: int) -> np.ndarray:
    """[corr lo, corr hi, corr diagonal, mean, std] of the colour->ink coordinate in ``inner``."""
    base = np.array(sw.COLOURS[colour], dtype=np.float64)
    axis = _INK - base
    t = np.clip(((img - base) @ axis) / (axis @ axis), 0.0, 1.0)
    ay, ax = _autocorr(t, inner, cell, 0), _autocorr(t, inner, 0, cell)
    vals = t[inner]
    return np.array([min(ay, ax), max(ay, ax), _autocorr(t, inner, cell, cell),
                     vals.mean(), vals.std()])


def shape_features(mask: np.ndarray) -> np.ndarray:
    """The mask's bounding-box crop resized (area weights) to 24x24, flattened."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return resize(box, (_CROP, _CROP), "area").ravel()


@lru_cache(maxsize=4)
def _classifiers(size: int) -> dict:
    """Fit the k-NN shape and pattern classifiers on fixed-seed generator scenes of this size."""
    shapes, shape_y, pats, pat_y = [], [], [], []
    cell = sw.default_cell(size)
    for i in range(_FIT_SCENES):
        scene = sw.random_scene(np.random.default_rng([_FIT_SEED, i]), size=size)
        variants = [scene.image] + ([simulate_vae(scene.image)] if size % 8 == 0 else [])
        for img in variants:
            img = to_rgb255(img)
            bg = border_colour(img)
            segs = segment(img)
            for obj, gt in zip(scene.objects, scene.masks):
                hits = [s for s in segs if (s & gt).sum() > 0.5 * (s | gt).sum()]
                if not hits:
                    continue
                shapes.append(shape_features(hits[0]))
                shape_y.append(obj.shape)
                if obj.pattern != "solid":
                    inner = _interior(hits[0])
                    pats.append(pattern_features(img, inner, classify_colour(img[inner], bg),
                                                 cell))
                    pat_y.append(obj.pattern)
    pats_arr = np.array(pats)
    scale = pats_arr.std(0) + 1e-6
    return {"shape_x": np.array(shapes), "shape_y": np.array(shape_y),
            "pat_x": pats_arr / scale, "pat_y": np.array(pat_y), "pat_scale": scale}


def _knn(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray) -> str:
    dist = ((train_x - x) ** 2).sum(1)
    names, counts = np.unique(train_y[np.argsort(dist)[:_K]], return_counts=True)
    return str(names[int(counts.argmax())])


def classify_shape(mask: np.ndarray, size: Optional[int] = None) -> str:
    """Shape name of a boolean object mask (k-NN on generator objects)."""
    fit = _classifiers(size or mask.shape[1])
    return _knn(fit["shape_x"], fit["shape_y"], shape_features(mask))


def classify_pattern(image, inner: np.ndarray, colour: str) -> str:
    """Pattern name of an object's interior mask given its colour (k-NN on generator objects)."""
    img = to_rgb255(image)
    size = img.shape[1]
    feats = pattern_features(img, inner, colour, sw.default_cell(size))
    if feats[4] < 0.06:
        return "solid"
    fit = _classifiers(size)
    return _knn(fit["pat_x"], fit["pat_y"], feats / fit["pat_scale"])


def read_scene(image, threshold: float = 45.0, min_area: Optional[int] = None
               ) -> List[ObjectReadout]:
    """Objects in an [H,W,3] image (uint8 or float in [0,1]), sorted left to right."""
    img = to_rgb255(image)
    size = img.shape[1]
    bg = border_colour(img)
    out = []
    for mask in segment(img, threshold, min_area):
        inner = _interior(mask)
        colour = classify_colour(img[inner], bg)
        ys, xs = np.nonzero(mask)
        cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
        out.append(ObjectReadout(
            shape=classify_shape(mask, size), colour=colour,
            pattern=classify_pattern(img, inner, colour),
            position=sw.position_word(cx, cy, size), centre=(cx, cy),
            area=int(mask.sum()), mask=mask))
    return sorted(out, key=lambda r: r.centre[0])
