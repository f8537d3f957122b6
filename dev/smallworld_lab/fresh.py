"""Toy-world models with fresh, seeded weights: where pretraining starts, and what tests sample.

The pack's ``smallworld.model`` only loads weights; the seeds here are the ones every earlier
pretraining run used (UNet ``seed``, text model ``seed + 1``, TAESD ``seed + 2``), through the one
seeded init of the development support (``devkit.tiny_models.seeded_init_``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from devkit.tiny_models import seeded_init_

from concept_attention.smallworld import model as toy


def seeded(seed: int) -> Callable[[torch.nn.Module], None]:
    """An init filling a module's weights from ``seed`` (norms 1/0, weights N(0, 1/fan_in))."""
    return lambda module: seeded_init_(module, torch.Generator().manual_seed(seed))


def random_model(seed: int = 0, model_channels: Optional[int] = None):
    """The toy UNet (ModelPatcher) with seeded random weights."""
    return toy.build_model(model_channels=model_channels, init=seeded(seed))


def random_clip(seed: int = 0):
    """The toy CLIP with a seeded random text model."""
    return toy.build_clip(init=seeded(seed + 1))


def new_taesd(seed: int = 0) -> torch.nn.Module:
    """A fresh TAESD module with seeded weights and identity latent scale."""
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD()
    seeded(seed + 2)(taesd)
    with torch.no_grad():
        taesd.vae_scale.fill_(1.0)
        taesd.vae_shift.fill_(0.0)
    return taesd


def random_bundle(seed: int = 0) -> toy.ToyBundle:
    """MODEL, CLIP and VAE of the toy world's architecture, all with seeded random weights."""
    return toy.ToyBundle(random_model(seed), random_clip(seed), toy.build_vae(new_taesd(seed).state_dict()))
