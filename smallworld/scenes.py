"""Deterministic procedural scenes: flat objects with shape, colour and pattern, masks and captions.

Drawing rules (the evaluator relies on them):
- No anti-aliasing: a pixel belongs to an object iff its centre lies inside the shape, so the
  ground-truth masks are exactly the drawn pixels. Later objects occlude earlier ones and the
  masks hold visible pixels only.
- A pattern is the object colour plus ``INK`` (near-black, never a palette or background colour)
  on a grid of ``cell``-pixel squares anchored at the image origin: stripes = every other cell row,
  checks = every other cell, dots = a disc filling one cell of every 2x2 block. The default cell is
  ``size // 16`` (8 px at 128 px), so with an 8x-down VAE each latent cell is pure colour or pure
  ink and the stripe/check period is two latent cells (16 px).
- ``HIDDEN_COMBOS`` are (colour, pattern) pairs drawn in images but never named in captions: such
  an object is captioned by its shape alone ("a circle"), like a personal concept, or, where a
  caption is given ``hints``, by its shape and one of its two words ("a purple circle").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
COLOURS: dict = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 220, 50),
    "green": (40, 160, 60), "cyan": (40, 190, 205), "blue": (40, 80, 220),
    "purple": (140, 60, 190), "pink": (245, 125, 190),
}
INK: Tuple[int, int, int] = (20, 20, 20)
PATTERNS: Tuple[str, ...] = ("solid", "stripes", "dots", "checks")
PATTERN_WORDS: dict = {"solid": "", "stripes": "striped", "dots": "dotted", "checks": "checkered"}
BACKGROUNDS: dict = {
    "grey": (205, 205, 205), "light blue": (195, 215, 240),
    "light green": (205, 230, 195), "beige": (235, 220, 190),
}
DEFAULT_BACKGROUND = "grey"
HIDDEN_COMBOS: frozenset = frozenset(
    {("purple", "stripes"), ("orange", "dots"), ("green", "checks"), ("yellow", "stripes")})
HINTS: Tuple[str, ...] = ("", "colour", "pattern")  # which one word of a hidden combo a caption may name
# Nominal ink fraction of each pattern; placement rejects objects whose visible pattern is far off.
INK_FRACTION: dict = {"solid": 0.0, "stripes": 0.5, "dots": np.pi / 16, "checks": 0.5}
Generator = Union[np.random.Generator, int]


@dataclass(frozen=True)
class ObjectSpec:
    """One object: shape, colour and pattern names, centre (x, y) and box side in pixels."""

    shape: str
    colour: str
    pattern: str
    cx: float
    cy: float
    size: float

    @property
    def hidden(self) -> bool:
        """True when this colour+pattern pair is never named in captions."""
        return (self.colour, self.pattern) in HIDDEN_COMBOS

    def centroid(self, image_size: int) -> Tuple[float, float]:
        """Centre of mass (x, y) of the drawn shape, in pixels."""
        ys, xs = np.nonzero(shape_mask(self.shape, self.cx, self.cy, self.size, image_size))
        return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5

    def position(self, image_size: int) -> str:
        """Position word of the shape's centre of mass (what captions and the evaluator use)."""
        return position_word(*self.centroid(image_size), image_size)

    def attributes(self, image_size: int) -> dict:
        """Attribute names as the evaluator reports them (shape, colour, pattern, position)."""
        return {"shape": self.shape, "colour": self.colour, "pattern": self.pattern,
                "position": self.position(image_size)}


@dataclass
class Scene:
    """A drawn scene: uint8 image [H,W,3], visible masks [N,H,W], objects, background, caption."""

    image: np.ndarray
    masks: np.ndarray
    objects: Tuple[ObjectSpec, ...]
    background: str
    caption: str
    cell: int

    @property
    def size(self) -> int:
        """Image side in pixels."""
        return int(self.image.shape[0])


def default_cell(size: int) -> int:
    """Pattern cell side for an image side: size // 16, at least 4 (8 px at 128 px)."""
    return max(4, size // 16)


def position_word(cx: float, cy: float, size: int) -> str:
    """Position word from thirds of the image: 'top left', 'top', 'left', 'center', ..."""
    col = "left" if cx < size / 3 else "right" if cx > 2 * size / 3 else ""
    row = "top" if cy < size / 3 else "bottom" if cy > 2 * size / 3 else ""
    return " ".join(w for w in (row, col) if w) or "center"


def _polygon(px: np.ndarray, py: np.ndarray, pts: Sequence[Tuple[float, float]]) -> np.ndarray:
    inside = np.zeros(px.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(pts, list(pts[1:]) + [pts[0]]):
        crosses = (y1 > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = (x2 - x1) * (py - y1) / (y2 - y1 + 1e-12) + x1
        inside ^= crosses & (px < xint)
    return inside


def shape_mask(shape: str, cx: float, cy: float, size: float, image_size: int) -> np.ndarray:
    """Boolean [H,W] mask of pixels whose centres lie inside the shape (box side ``size``)."""
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float64) + 0.5
    dx, dy, h = xs - cx, ys - cy, size / 2.0
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (np.abs(dx) <= 0.84 * h) & (np.abs(dy) <= 0.84 * h)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= h
    if shape == "triangle":
        return _polygon(dx, dy, [(0.0, -h), (h, 0.8 * h), (-h, 0.8 * h)])
    if shape == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, h, 0.5 * h)
        pts = list(zip(rad * np.cos(ang), rad * np.sin(ang) + 0.05 * size))
        return _polygon(dx, dy, pts)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def pattern_mask(pattern: str, image_size: int, cell: int) -> np.ndarray:
    """Boolean [H,W] mask of the pattern's ink pixels over the whole image (grid at the origin)."""
    ys, xs = np.mgrid[0:image_size, 0:image_size]
    row, col = ys // cell, xs // cell
    if pattern == "solid":
        return np.zeros((image_size, image_size), dtype=bool)
    if pattern == "stripes":
        return row % 2 == 1
    if pattern == "checks":
        return (row + col) % 2 == 1
    if pattern == "dots":
        fy, fx = ys % cell + 0.5 - cell / 2, xs % cell + 0.5 - cell / 2
        return (row % 2 == 0) & (col % 2 == 0) & (fx * fx + fy * fy <= (cell / 2) ** 2)
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def draw_scene(objects: Sequence[ObjectSpec], background: str = DEFAULT_BACKGROUND,
               size: int = 128, caption: Optional[str] = None,
               cell: Optional[int] = None) -> Scene:
    """Draw objects in order (later ones on top); masks are the visible pixels of each object."""
    cell = default_cell(size) if cell is None else cell
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[background]
    masks = np.zeros((len(objects), size, size), dtype=bool)
    for i, obj in enumerate(objects):
        mask = shape_mask(obj.shape, obj.cx, obj.cy, obj.size, size)
        masks[:i] &= ~mask
        masks[i] = mask
        image[mask] = COLOURS[obj.colour]
        image[mask & pattern_mask(obj.pattern, size, cell)] = INK
    if caption is None:
        caption = caption_for(objects, background, size)
    return Scene(image, masks, tuple(objects), background, caption, cell)


def with_article(words: str) -> str:
    """'a red circle', 'an orange circle': the indefinite article for ``words``."""
    return f"{'an' if words[:1] in tuple('aeiou') else 'a'} {words}"


def object_phrase(obj: ObjectSpec, image_size: int, colour: bool = True, pattern: bool = True,
                  position: bool = False, hint: str = "") -> str:
    """'a red striped circle [on the left]'; hidden combos never name both their colour and pattern.

    ``hint`` ("colour" or "pattern") names that one attribute of a hidden combo; without it a hidden
    object is named by its shape word alone.
    """
    if hint not in HINTS:
        raise ValueError(f"hint must be one of {HINTS}, got {hint!r}")
    words = []
    if colour and (not obj.hidden or hint == "colour"):
        words.append(obj.colour)
    if pattern and (not obj.hidden or hint == "pattern") and PATTERN_WORDS[obj.pattern]:
        words.append(PATTERN_WORDS[obj.pattern])
    words = [with_article(" ".join(words + [obj.shape]))]
    if position:
        pos = obj.position(image_size)
        if pos == "center":
            words.append("in the center")
        elif pos.split()[0] in ("top", "bottom"):
            words.append(f"at the {pos}")
        else:
            words.append(f"on the {pos}")
    return " ".join(words)


def caption_for(objects: Sequence[ObjectSpec], background: Optional[str], image_size: int = 128,
                colour: bool = True, pattern: bool = True, position: bool = False,
                hints: Sequence[str] = ()) -> str:
    """Caption listing the objects; ``background=None`` leaves the background out; ``hints[i]``: object_phrase's."""
    if len(hints) > len(objects):
        raise ValueError(f"{len(hints)} hints for {len(objects)} objects")
    hints = tuple(hints) + ("",) * (len(objects) - len(hints))
    phrases = [object_phrase(o, image_size, colour, pattern, position, hint) for o, hint in zip(objects, hints)]
    if not phrases:
        return "" if background is None else f"a {background} background"
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text if background is None else f"{text} on a {background} background"


def random_caption(objects: Sequence[ObjectSpec], background: str, image_size: int,
                   rng: np.random.Generator, drop: float = 0.2, hints: Sequence[str] = ()) -> str:
    """Caption with colour, pattern and background words each dropped at rate ``drop``; ``hints`` as caption_for's."""
    keep = rng.random(3) >= drop
    position = bool(rng.random() < 0.3)
    return caption_for(objects, background if keep[2] else None, image_size,
                       colour=bool(keep[0]), pattern=bool(keep[1]), position=position, hints=hints)


def hidden_hints(objects: Sequence[ObjectSpec], rng: np.random.Generator, rate: float) -> Tuple[str, ...]:
    """Per object, the one attribute of a hidden combo to name (a share ``rate`` of them), else "".

    Hidden combos named by their shape word alone leave each of their words anti-correlated with the
    other attribute: a named striped object is never purple or yellow, so "striped" pulls a colour
    away from exactly the hidden ones. Naming one attribute at a time keeps the pair unnamed.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"the hidden-hint rate must lie in [0, 1], got {rate}")
    if rate == 0.0:
        return ("",) * len(objects)
    hints = []
    for obj in objects:
        if obj.hidden and rng.random() < rate:
            hints.append(("colour", "pattern")[int(rng.integers(2))])
        else:
            hints.append("")
    return tuple(hints)


def _visible_pattern_ok(mask: np.ndarray, ink: np.ndarray, pattern: str) -> bool:
    if pattern == "solid":
        return True
    frac = float(ink[mask].mean()) if mask.any() else 0.0
    return 0.6 * INK_FRACTION[pattern] <= frac <= 1.4 * INK_FRACTION[pattern]


def place_objects(rng: np.random.Generator, attrs: Sequence[Tuple[str, str, str]], size: int,
                  size_range: Tuple[float, float], cell: int, gap: float = 0.1,
                  margin: float = 0.04, tries: int = 400) -> Tuple[ObjectSpec, ...]:
    """Place (shape, colour, pattern) triples with disjoint boxes ``gap*size`` apart."""
    for _ in range(tries):
        boxes: list = []
        placed: list = []
        for shape, colour, pattern in attrs:
            ink = pattern_mask(pattern, size, cell)
            for _ in range(tries):
                side = rng.uniform(*size_range) * size
                lo, hi = margin * size + side / 2, size - margin * size - side / 2
                cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
                g = gap * size
                if any(abs(cx - bx) < (side + bs) / 2 + g and abs(cy - by) < (side + bs) / 2 + g
                       for bx, by, bs in boxes):
                    continue
                if not _visible_pattern_ok(shape_mask(shape, cx, cy, side, size), ink, pattern):
                    continue
                boxes.append((cx, cy, side))
                placed.append(ObjectSpec(shape, colour, pattern, float(cx), float(cy),
                                         float(side)))
                break
            else:
                break
        if len(placed) == len(attrs):
            return tuple(placed)
    raise RuntimeError(f"could not place {len(attrs)} objects in a {size} px image")


SIZE_RANGES = {1: (0.32, 0.5), 2: (0.28, 0.42), 3: (0.25, 0.36)}


def _rng(rng: Generator) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


OBJECT_COUNTS = (0.4, 0.35, 0.25)  # chances of 1, 2 and 3 objects (the first base model's scenes)
PRETRAIN_COUNTS = (0.25, 0.4, 0.35)  # base model v2: more scenes whose class words must tell objects apart
PRETRAIN_HIDDEN_RATE = 0.25  # base model v2: more objects named by their shape word alone


def random_scene(rng: Generator, n_objects: Optional[int] = None, size: int = 128,
                 hidden_rate: float = 0.15, background: Optional[str] = None,
                 random_words: bool = False, counts: Sequence[float] = OBJECT_COUNTS,
                 twin: bool = False) -> Scene:
    """A random scene of 1-3 non-overlapping objects; same generator state -> identical scene.

    Each object is forced into a hidden combo with probability ``hidden_rate`` (otherwise colour
    and pattern are uniform, so hidden combos also occur by chance). ``random_words`` drops caption
    words at random (for pretraining); otherwise the caption names every visible attribute.
    ``counts`` are the chances of 1, 2 and 3 objects. ``twin``: distinct shapes that all share the
    first object's colour and pattern, so that only shape (and, in some captions, position) words
    tell them apart.
    """
    rng = _rng(rng)
    n = int(rng.choice([1, 2, 3], p=list(counts))) if n_objects is None else n_objects
    hidden = sorted(HIDDEN_COMBOS)
    attrs = []
    for _ in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        if rng.random() < hidden_rate:
            colour, pattern = hidden[rng.integers(len(hidden))]
        else:
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            pattern = PATTERNS[rng.integers(len(PATTERNS))]
        attrs.append((shape, colour, pattern))
    if twin:
        shapes = [SHAPES[j] for j in rng.permutation(len(SHAPES))[:n]]
        attrs = [(shape, attrs[0][1], attrs[0][2]) for shape in shapes]
    if background is None:
        names = list(BACKGROUNDS)
        background = names[0] if rng.random() < 0.5 else names[1 + rng.integers(len(names) - 1)]
    cell = default_cell(size)
    objects = place_objects(rng, attrs, size, SIZE_RANGES[min(max(n, 1), 3)], cell)
    caption = (random_caption(objects, background, size, rng) if random_words
               else caption_for(objects, background, size))
    return draw_scene(objects, background, size, caption, cell)


def pretraining_scene(rng: Generator, size: int = 128, random_words: bool = False) -> Scene:
    """A scene of base model v2's pretraining distribution (``PRETRAIN_COUNTS``, ``PRETRAIN_HIDDEN_RATE``)."""
    return random_scene(rng, size=size, hidden_rate=PRETRAIN_HIDDEN_RATE, random_words=random_words,
                        counts=PRETRAIN_COUNTS)


def dataset(n: int, seed: int = 0, size: int = 128) -> Iterator[Scene]:
    """Pretraining scenes with randomly dropped caption words; scene i depends only on (seed, i)."""
    for i in range(n):
        yield random_scene(np.random.default_rng([seed, i]), size=size, random_words=True)


def reference_scenes(n: int, seed: int = 0, size: int = 128) -> list:
    """DisenDiff test scenes: 2 objects (every 4th scene 3), distinct shapes, colours and patterns.

    The first object is always a hidden combo; the second is a different hidden combo half the time,
    otherwise a visible one. Background grey; the caption names only visible attributes.
    """
    scenes = []
    hidden = sorted(HIDDEN_COMBOS)
    for i in range(n):
        rng = np.random.default_rng([seed, i, 7])
        k = 3 if i % 4 == 3 else 2
        shapes = [SHAPES[j] for j in rng.permutation(len(SHAPES))[:k]]
        first = hidden[rng.integers(len(hidden))]
        combos = [first]
        others = [c for c in hidden if c[0] != first[0] and c[1] != first[1]]
        while len(combos) < k:
            if len(combos) == 1 and rng.random() < 0.5 and others:
                combos.append(others[rng.integers(len(others))])
                continue
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            pattern = PATTERNS[rng.integers(len(PATTERNS))]
            if (colour, pattern) in HIDDEN_COMBOS or any(
                    colour == c or pattern == p for c, p in combos):
                continue
            combos.append((colour, pattern))
        attrs = [(s, c, p) for s, (c, p) in zip(shapes, combos)]
        rng_range = (0.34, 0.44) if k == 2 else (0.27, 0.36)
        objects = place_objects(rng, attrs, size, rng_range, default_cell(size))
        scenes.append(draw_scene(objects, DEFAULT_BACKGROUND, size))
    return scenes
