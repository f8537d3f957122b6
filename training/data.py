"""Training data from one picture: validation, Custom-Diffusion-style augmentation, prompts."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MIN_IMAGE_SIZE = 64
FAR_PREFIXES = ("a far away ", "very small ")
ZOOM_PREFIXES = ("zoomed in ", "close up ")


@dataclass(frozen=True)
class ConceptSpec:
    """What the user asks to learn: a trigger name bound to a class phrase."""

    trigger: str
    class_phrase: str


@dataclass
class TrainingSample:
    """One augmented view: pixels in [0, 1], a latent-size loss mask, concept masks, the prompt."""

    pixels: torch.Tensor  # [size, size, 3]
    loss_mask: torch.Tensor  # [size // 8, size // 8]
    concept_masks: torch.Tensor | None  # [C, size, size]
    prompt: str


def prepare_image(image: torch.Tensor) -> torch.Tensor:
    """A ComfyUI IMAGE batch of one picture -> ``[H, W, 3]`` float in [0, 1], or a clear error."""
    if image.ndim != 4:
        raise ValueError(f"IMAGE must be [batch, height, width, channels], got {tuple(image.shape)}")
    if image.shape[0] != 1:
        raise ValueError(f"the image input holds a batch of {image.shape[0]} pictures; the trainer "
                         "learns from ONE picture: pick one (e.g. with ImageFromBatch)")
    picture = image[0].float()
    height, width, channels = picture.shape
    if min(height, width) < MIN_IMAGE_SIZE:
        raise ValueError(f"the image is {width}x{height} px; it must be at least "
                         f"{MIN_IMAGE_SIZE} px on each side")
    if channels == 1:
        picture = picture.expand(height, width, 3)
    elif channels == 4:
        log.info("dropping the alpha channel of the training image")
        picture = picture[..., :3]
    elif channels != 3:
        raise ValueError(f"the image has {channels} channels; expected RGB")
    if not torch.isfinite(picture).all():
        raise ValueError("the image contains NaN or infinite values")
    return picture.clamp(0, 1).contiguous()


def prepare_masks(masks: torch.Tensor | None, picture: torch.Tensor, count: int) -> torch.Tensor | None:
    """MASK input -> ``[C, H, W]`` in [0, 1] matching the image, one per concept, or an error."""
    if masks is None:
        return None
    if masks.ndim == 2:
        masks = masks[None]
    if masks.shape[0] != count:
        raise ValueError(f"{masks.shape[0]} masks were given for {count} concepts: give one mask "
                         "per concept, in the order of the concepts")
    if tuple(masks.shape[-2:]) != tuple(picture.shape[:2]):
        raise ValueError(f"the masks are {masks.shape[-1]}x{masks.shape[-2]} px but the image is "
                         f"{picture.shape[1]}x{picture.shape[0]} px: make them the same size")
    masks = masks.float().clamp(0, 1)
    empty = [i for i in range(count) if float(masks[i].max()) <= 0]
    if empty:
        raise ValueError(f"mask {empty[0] + 1} is empty: each concept's mask must cover its object")
    return masks


def default_caption(specs: list[ConceptSpec]) -> str:
    """DisenDiff's caption: "photo of a V1 cat and V2 dog"."""
    return "photo of a " + " and ".join(f"{s.trigger} {s.class_phrase}" for s in specs)


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


def augment(picture: torch.Tensor, masks: torch.Tensor | None, caption: str, size: int,
            rng: random.Random, enabled: bool = True, flip: bool = True) -> TrainingSample:
    """One Custom-Diffusion-style view: small-and-pasted, plain, or zoomed-in; maybe flipped."""
    square, square_masks = _center_square(picture, masks)
    chw = square.permute(2, 0, 1)
    latent = size // 8
    loss_mask = torch.ones(latent, latent)
    prompt = caption
    if not enabled:
        scale = size
    elif rng.random() < 2 / 3:
        scale = rng.randint(int(size / 3), size)
    else:
        scale = rng.randint(int(size * 1.2), int(size * 1.4))
    scale += scale % 2
    if scale < int(0.6 * size):
        small = _resize(chw, scale, "bicubic").clamp(0, 1)
        canvas = torch.full((3, size, size), 0.5)  # zero in the model's [-1, 1] range
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
        prompt = rng.choice(FAR_PREFIXES) + caption
    elif scale <= size:
        chw = _resize(chw, size, "bicubic").clamp(0, 1)
        square_masks = None if square_masks is None else _resize(square_masks, size, "bilinear")
    else:
        big = _resize(chw, scale, "bicubic").clamp(0, 1)
        top, left = rng.randint(0, scale - size), rng.randint(0, scale - size)
        chw = big[:, top:top + size, left:left + size]
        if square_masks is not None:
            square_masks = _resize(square_masks, scale, "bilinear")[:, top:top + size, left:left + size]
        prompt = rng.choice(ZOOM_PREFIXES) + caption
    if flip and rng.random() < 0.5:
        chw = chw.flip(-1)
        loss_mask = loss_mask.flip(-1)
        square_masks = None if square_masks is None else square_masks.flip(-1)
    return TrainingSample(chw.permute(1, 2, 0).contiguous(), loss_mask, square_masks, prompt)


_TRIGGER = __import__("re").compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def parse_concept_specs(text: str) -> list[ConceptSpec]:
    """Parse "V1: cat" lines (or ';'-separated) into specs, with clear errors for bad input."""
    specs = []
    for entry in (e.strip() for e in text.replace(";", "\n").splitlines()):
        if not entry:
            continue
        trigger, sep, phrase = entry.partition(":")
        if not sep:
            raise ValueError(f"cannot read {entry!r}: write one concept per line as 'TRIGGER: class', "
                             "e.g. 'V1: cat'")
        trigger, phrase = trigger.strip(), " ".join(phrase.split())
        if not _TRIGGER.match(trigger):
            raise ValueError(f"trigger {trigger!r} must be one word of letters, digits or _, "
                             "starting with a letter (e.g. V1, sks_cat)")
        if not phrase:
            raise ValueError(f"trigger {trigger!r} has no class word: e.g. '{trigger}: cat'")
        if trigger.lower() in phrase.lower().split():
            raise ValueError(f"trigger {trigger!r} must differ from its class word")
        specs.append(ConceptSpec(trigger, phrase))
    if not specs:
        raise ValueError("no concepts given: write one per line as 'TRIGGER: class', e.g. 'V1: cat'")
    names = [s.trigger.lower() for s in specs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ValueError(f"trigger {duplicate!r} is used twice: give each concept its own trigger")
    return specs
