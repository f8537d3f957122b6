"""What a run trains on, each picture through the VAE once: augmented views of the training
picture and the prior images; and the draw of one micro-batch from them."""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import torch

from .data import MASK_WHITE, TrainingSample, augment
from .settings import TrainSettings

Pool = list[tuple[TrainingSample, torch.Tensor]]  # each view with its latent, ready for the UNet


def encode_picture(vae: Any, model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The UNet-space latent [1, 4, h/8, w/8] of pixels [h, w, 3] in [0, 1]; refuses non-finite ones."""
    with torch.no_grad():
        latent = vae.encode(pixels[None])
    if not torch.isfinite(latent).all():
        raise ValueError("the VAE turned the training picture into non-finite latents: check "
                         "that the VAE matches the model and try fp32")
    return model.model.process_latent_in(latent.float()).detach().clone()


def view_pool(picture: torch.Tensor, masks: torch.Tensor | None, caption: str, settings: TrainSettings,
              rng: random.Random, vae: Any, model: Any) -> Pool:
    """``pool_size`` augmented views (no more than the run can draw), cut to the concepts' regions
    when masks are given and ``mask_reconstruction`` is on."""
    size = settings.resolution
    count = max(1, min(settings.pool_size, settings.steps * settings.grad_accumulation * settings.micro_batch))
    pool = []
    for _ in range(count):
        sample = augment(picture, masks, caption, size, rng, enabled=settings.augment, flip=settings.flip,
                         settings=settings.augmentation)
        if sample.concept_masks is not None and settings.mask_reconstruction:
            union = sample.concept_masks.amax(0)[None, None]
            region = torch.nn.functional.adaptive_max_pool2d(union, size // 8)[0, 0]
            sample.loss_mask = sample.loss_mask * (region > MASK_WHITE).float()
        pool.append((sample, encode_picture(vae, model, sample.pixels)))
    return pool


def prior_pool(prior: list[tuple[torch.Tensor, str]], settings: TrainSettings, rng: random.Random,
               vae: Any, model: Any) -> Pool:
    """Each prior image with its caption, un-augmented (a flip at most)."""
    pool = []
    for pixels, caption in prior:
        sample = augment(pixels, None, caption, settings.resolution, rng, enabled=False, flip=settings.flip)
        pool.append((sample, encode_picture(vae, model, sample.pixels)))
    return pool


def on_device(pool: Pool, device: torch.device) -> Pool:
    """The pool with what each step reads (latents, loss and concept masks) on ``device``, copied
    once here instead of in every micro-batch (the pixels stay where they are)."""
    placed = []
    for sample, latent in pool:
        masks = sample.concept_masks
        sample = replace(sample, loss_mask=sample.loss_mask.to(device),
                         concept_masks=None if masks is None else masks.to(device))
        placed.append((sample, latent.to(device)))
    return placed


def draw_micro_batch(target: Pool, prior: Pool, size: int, rng: random.Random) -> tuple[Pool, bool]:
    """``size`` views drawn with replacement, from the prior pool (if any) half the time; and
    whether they are prior views."""
    from_prior = bool(prior) and rng.random() < 0.5
    pool = prior if from_prior else target
    return [pool[rng.randrange(len(pool))] for _ in range(size)], from_prior
