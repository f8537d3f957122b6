"""Training data from one picture: checked inputs (picture, masks, caption), Custom-Diffusion-style
augmentation, prompts."""
from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..attention.tokens import phrase_ids
from ..concepts.specs import ConceptSpec
from ..concepts.triggers import SUB_TOKENIZERS


log = logging.getLogger(__name__)

MIN_IMAGE_SIZE = 64
# Two concept masks may touch, but if their overlap covers more than this share of the smaller
# one they describe the same region and the calibration losses cannot tell the concepts apart.
MAX_MASK_OVERLAP = 0.5
MASK_WHITE = 0.5  # mask values above this are the object (the reconstruction region is cut there)
FAR_PREFIXES = ("a far away ", "very small ")
ZOOM_PREFIXES = ("zoomed in ", "close up ")
ARTICLES = ("a ", "an ")
CANVASES = ("grey", "border")


@dataclass(frozen=True)
class AugmentSettings:
    """How augmented views are made and captioned; the defaults are the official DisenDiff code's.

    A model whose captions never held the prefix words (a toy model) or whose pictures hold detail
    that must not shrink (pattern cells as small as the VAE's latent cell) needs others.
    """

    far_prefixes: tuple[str, ...] = FAR_PREFIXES  # texts of shrunk-and-pasted views; () for none
    zoom_prefixes: tuple[str, ...] = ZOOM_PREFIXES  # texts of zoomed-in views; () for none
    canvas: str = "grey"  # what a shrunk view is pasted on: "grey" (0.5) or "border" (the picture's)
    smallest_scale: float = 1 / 3  # smallest side of a shrunk view, as a fraction of the size

    def validate(self) -> None:
        """Refuse settings no run can use, naming the setting and what is allowed."""
        if self.canvas not in CANVASES:
            raise ValueError(f"augmentation canvas must be one of {CANVASES}, got {self.canvas!r}")
        if not (math.isfinite(self.smallest_scale) and 0 < self.smallest_scale <= 1):
            raise ValueError(f"augmentation smallest_scale must be in (0, 1], got {self.smallest_scale!r}")
        for name in ("far_prefixes", "zoom_prefixes"):
            texts = getattr(self, name)
            if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
                raise ValueError(f"augmentation {name} must be a list of texts, got {texts!r}")


@dataclass
class TrainingSample:
    """One augmented view: pixels in [0, 1], a latent-size loss mask, concept masks, the prompt."""

    pixels: torch.Tensor  # [size, size, 3]
    loss_mask: torch.Tensor  # [size // 8, size // 8]
    concept_masks: torch.Tensor | None  # [C, size, size]
    prompt: str


def prepare_image(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """A ComfyUI IMAGE batch of one picture -> ``[H, W, 3]`` float in [0, 1], or a clear error.

    ``name`` is the input the picture came from, as the messages call it (``prior image 2``).
    """
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"the {name} input is a {type(image).__name__}, not an IMAGE: connect a "
                         "Load Image node (or another IMAGE output)")
    if image.ndim != 4:
        raise ValueError(f"the {name} input must be an IMAGE [batch, height, width, channels], got "
                         f"shape {tuple(image.shape)}: connect a Load Image node")
    if image.shape[0] == 0:
        raise ValueError(f"the {name} input is an empty batch (no picture): the trainer learns from "
                         "ONE picture, connect a Load Image node")
    if image.shape[0] != 1:
        raise ValueError(f"the {name} input holds a batch of {image.shape[0]} pictures; the trainer "
                         "learns from ONE picture: pick one (e.g. with ImageFromBatch)")
    picture = image[0].float()
    height, width, channels = picture.shape
    if min(height, width) < MIN_IMAGE_SIZE:
        raise ValueError(f"the {name} is {width}x{height} px; it must be at least "
                         f"{MIN_IMAGE_SIZE} px on each side: use a larger picture")
    if channels == 1:
        picture = picture.expand(height, width, 3)
    elif channels == 4:
        log.info("dropping the alpha channel of the %s", name)
        picture = picture[..., :3]
    elif channels != 3:
        raise ValueError(f"the {name} has {channels} channels; expected RGB (3), greyscale (1) or "
                         "RGBA (4): convert it to RGB")
    if not torch.isfinite(picture).all():
        raise ValueError(f"the {name} contains NaN or infinite values: reload the picture, or fix "
                         "the node that produced it")
    return picture.clamp(0, 1).contiguous()


def prepare_masks(masks: torch.Tensor | None, picture: torch.Tensor, count: int) -> torch.Tensor | None:
    """MASK input -> ``[C, H, W]`` in [0, 1] matching the image, one per concept, or an error."""
    if masks is None:
        return None
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]  # [N, 1, H, W] from some mask nodes
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"the masks input must be a MASK batch [count, height, width], got shape "
                         f"{tuple(masks.shape)}: give one mask per concept")
    if masks.shape[0] != count:
        raise ValueError(f"{masks.shape[0]} masks were given for {count} concepts: give one mask "
                         "per concept, in the order of the concepts")
    if tuple(masks.shape[-2:]) != tuple(picture.shape[:2]):
        raise ValueError(f"the masks are {masks.shape[-1]}x{masks.shape[-2]} px but the image is "
                         f"{picture.shape[1]}x{picture.shape[0]} px: make them the same size")
    if not torch.isfinite(masks).all():
        raise ValueError("the masks contain NaN or infinite values: redraw or reload them")
    masks = masks.float().clamp(0, 1)
    empty = [i for i in range(count) if float(masks[i].max()) <= 0]
    if empty:
        raise ValueError(f"mask {empty[0] + 1} is empty: each concept's mask must cover its object")
    check_mask_overlap(masks)
    faint = [i for i in range(count) if float(masks[i].max()) <= MASK_WHITE]
    if faint:
        raise ValueError(f"mask {faint[0] + 1} is too faint: its strongest value is "
                         f"{float(masks[faint[0]].max()):.2f}, and training takes only values above "
                         f"{MASK_WHITE} as the object: paint the object white")
    return masks


def check_mask_overlap(masks: torch.Tensor) -> None:
    """Refuse two concept masks that cover mostly the same pixels (e.g. both all white).

    Soft masks count as much as they cover: the shared part of two masks is the sum of their
    pixel-wise minimum, so two masks of 0.5 over the whole picture overlap on 100 %, and for
    black-and-white masks this is the number of shared pixels.
    """
    weights = masks.flatten(1).float()
    areas = weights.sum(1)
    for i in range(masks.shape[0]):
        for j in range(i + 1, masks.shape[0]):
            smaller = float(min(areas[i], areas[j]))
            if smaller <= 0:
                continue
            shared = float(torch.minimum(weights[i], weights[j]).sum())
            if shared > MAX_MASK_OVERLAP * smaller + 1e-6:
                raise ValueError(
                    f"masks {i + 1} and {j + 1} overlap on {int(100 * shared / smaller)}% of the smaller "
                    f"one (at most {int(100 * MAX_MASK_OVERLAP)}% allowed, soft masks counted by how "
                    "much they cover): each concept's mask must cover its own object, not the whole "
                    "picture or the other object")


def default_caption(specs: list[ConceptSpec]) -> str:
    """DisenDiff's caption: "photo of a V1 cat and V2 dog"."""
    return "photo of a " + " and ".join(f"{s.trigger} {s.class_phrase}" for s in specs)


def check_caption(clip: Any, caption: str, specs: list[ConceptSpec]) -> None:
    """Refuse a caption a run cannot bind: each trigger once, right before a class phrase of
    ordinary tokens, all in one CLIP window."""
    special = _special_token_ids(clip)
    for spec in specs:
        # Whole words only: "V1 cats" contains the text "V1 cat" but not the token "cat".
        pair = re.escape(f"{spec.trigger} {spec.class_phrase}")
        if not re.search(rf"(?<!\w){pair}(?!\w)", caption):
            raise ValueError(f"the caption {caption!r} must contain "
                             f"'{spec.trigger} {spec.class_phrase}' (trigger right before its class)")
        uses = len(re.findall(rf"(?<![\w:]){re.escape(spec.trigger)}(?!\w)", caption))
        if uses > 1:
            raise ValueError(f"the caption {caption!r} uses the trigger {spec.trigger!r} "
                             f"{uses} times: write it once, right before its class word")
        ids = phrase_ids(clip, spec.class_phrase)
        if not ids or special & set(ids):
            raise ValueError(f"the class phrase {spec.class_phrase!r} of {spec.trigger!r} gives "
                             "no ordinary tokens for this CLIP: use a plain word such as 'cat'")
    windows = max(len(chunks) for chunks in clip.tokenize(caption).values())
    if windows > 1:
        raise ValueError(f"the caption {caption!r} is longer than CLIP's 75-token window "
                         f"({len(specs)} concepts): a trigger and its class in different "
                         "windows cannot be bound. Train fewer concepts per run (or use shorter "
                         "class phrases / caption) and combine the sets with Merge Concepts")


def _special_token_ids(clip: Any) -> set[int]:
    """Start, end and padding token ids of the CLIP's tokenizers (never a class word)."""
    ids: set[int] = set()
    for name in SUB_TOKENIZERS:
        sub = getattr(clip.tokenizer, name, None)
        for attr in ("start_token", "end_token"):
            value = getattr(sub, attr, None)
            if isinstance(value, int):
                ids.add(value)
    return ids


def _center_square(pixels: torch.Tensor, masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    height, width = pixels.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = pixels[top:top + side, left:left + side]
    return crop, None if masks is None else masks[:, top:top + side, left:left + side]


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize ``[C, H, W]`` to ``[C, size, size]``."""
    kwargs = {"align_corners": False} if mode == "bicubic" else {}
    return F.interpolate(x[None], size=(size, size), mode=mode, **kwargs)[0]


def with_prefix(prefix: str, caption: str) -> str:
    """``prefix + caption``, the prefix after the caption's leading article if it has one.

    "a far away " + "a V1 cat" is "a far away V1 cat" (not "a far away a V1 cat"), "very small " +
    "a V1 cat" is "a very small V1 cat"; "photo of a V1 cat" keeps the official "a far away photo ...".
    """
    if not prefix.strip():
        return caption
    article = next((a for a in ARTICLES if caption.lower().startswith(a)), None)
    if article is None:
        return prefix + caption
    words = prefix.lstrip()
    words = next((words[len(a):] for a in ARTICLES if words.lower().startswith(a)), words)
    return caption[:len(article)] + words + caption[len(article):]


def _pick_prefix(rng: random.Random, prefixes: tuple[str, ...], caption: str) -> str:
    return with_prefix(rng.choice(prefixes), caption) if prefixes else caption


def _canvas(picture: torch.Tensor, size: int, kind: str) -> torch.Tensor:
    """``[3, size, size]`` backdrop for a shrunk view: mid-grey, or the picture's border colour."""
    if kind == "grey":
        return torch.full((3, size, size), 0.5)  # zero in the model's [-1, 1] range
    border = torch.cat([picture[0], picture[-1], picture[:, 0], picture[:, -1]])
    return border.median(0).values[:, None, None].expand(3, size, size).clone()


def augment(picture: torch.Tensor, masks: torch.Tensor | None, caption: str, size: int,
            rng: random.Random, enabled: bool = True, flip: bool = True,
            settings: AugmentSettings = AugmentSettings()) -> TrainingSample:
    """One Custom-Diffusion-style view: small-and-pasted, plain, or zoomed-in; maybe flipped."""
    square, square_masks = _center_square(picture, masks)
    chw = square.permute(2, 0, 1)
    latent = size // 8
    loss_mask = torch.ones(latent, latent)
    prompt = caption
    if not enabled:
        scale = size
    elif rng.random() < 2 / 3:
        scale = rng.randint(math.floor(size * settings.smallest_scale + 1e-9), size)
    else:
        scale = rng.randint(int(size * 1.2), int(size * 1.4))
    scale += scale % 2
    if scale < int(0.6 * size):
        small = _resize(chw, scale, "bicubic").clamp(0, 1)
        canvas = _canvas(square, size, settings.canvas)
        top, left = rng.randint(0, size - scale), rng.randint(0, size - scale)
        canvas[:, top:top + scale, left:left + scale] = small
        chw = canvas
        if square_masks is not None:
            mask_canvas = torch.zeros(square_masks.shape[0], size, size)
            mask_canvas[:, top:top + scale, left:left + scale] = _resize(square_masks, scale, "bilinear")
            square_masks = mask_canvas
        loss_mask = torch.zeros(latent, latent)
        t, lft, s = top // 8 + 1, left // 8 + 1, scale // 8 - 2
        loss_mask[t:t + max(s, 1), lft:lft + max(s, 1)] = 1
        prompt = _pick_prefix(rng, settings.far_prefixes, caption)
    elif scale <= size:
        chw = _resize(chw, size, "bicubic").clamp(0, 1)
        square_masks = None if square_masks is None else _resize(square_masks, size, "bilinear")
    else:
        big = _resize(chw, scale, "bicubic").clamp(0, 1)
        top, left = rng.randint(0, scale - size), rng.randint(0, scale - size)
        chw = big[:, top:top + size, left:left + size]
        if square_masks is not None:
            square_masks = _resize(square_masks, scale, "bilinear")[:, top:top + size, left:left + size]
        prompt = _pick_prefix(rng, settings.zoom_prefixes, caption)
    if flip and rng.random() < 0.5:
        chw = chw.flip(-1)
        loss_mask = loss_mask.flip(-1)
        square_masks = None if square_masks is None else square_masks.flip(-1)
    return TrainingSample(chw.permute(1, 2, 0).contiguous(), loss_mask, square_masks, prompt)
