"""What a DisenDiff training run is told (``TrainSettings``) and what it gives back (``TrainResult``)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..attention.calibration import CalibrationSettings
from ..concepts.concept_set import ConceptSet
from .data import AugmentSettings

# How the per-sample reconstruction error is weighted over noise levels. "eps": the plain noise error
# (official). "eps+x0": plus the error of the predicted clean latent (the noise error times sigma^2)
# divided by sigma^2's mean over the schedule. At high noise, where a colour is decided, the noise
# error is the clean-latent error / sigma: too small to teach a small model's new token the colour
# a single picture shows; at low noise, where fine patterns are learned, it stays as it was.
LOSS_WEIGHTINGS = ("eps", "eps+x0")
# Where a trigger's vector starts. "rare": the rare vocabulary rows Custom Diffusion and DisenDiff copy
# (official); "class": the class phrase's first token; "mean": the mean row of the token table. In a
# model whose rare rows were never trained (a toy CLIP) a rare row is a random vector that the text
# encoder still reads as something (docs/toy_world.md, "Where a learned colour comes from").
INITS = ("rare", "class", "mean")


@dataclass
class TrainSettings:
    """Every knob of a training run; defaults reproduce the official DisenDiff code."""

    steps: int = 250
    learning_rate: float = 8e-5
    micro_batch: int = 2
    grad_accumulation: int = 4
    resolution: int = 512
    seed: int = 0
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    map_layers: str = "latent/4"
    train_kv: bool = True
    train_embeddings: bool = True
    detach_start_token: bool = True
    augment: bool = True
    augmentation: AugmentSettings = field(default_factory=AugmentSettings)  # views' texts, canvas, scale
    flip: bool = True
    mask_reconstruction: bool = True  # with masks: reconstruct only the concepts' regions
    loss_weighting: str = "eps"  # "eps" (official) or "eps+x0": see LOSS_WEIGHTINGS
    mask_map_weight: float = 0.01  # with masks: weight of 1 - IoU(map, mask) per concept map
    init: str = "rare"  # where trigger vectors start: see INITS
    caption: str = ""  # empty: "photo of a V1 cat and V2 dog"
    autocast: str = "auto"  # "auto" (bf16 on CUDA GPUs that have it, else none), "none", "fp16", "bf16"
    gradient_checkpointing: bool = False
    compile_unet: bool = False  # torch.compile the UNet for the run (slow to start; pays on long GPU runs?)
    pool_size: int = 32  # augmented views encoded up front
    token_bank: int = 0  # nested-attention tokens per concept (0: none, nothing changes)
    bank_learning_rate: float = 5e-3  # AdamW learning rate of the token banks (docs/method.md §15)

    def to_metadata(self) -> dict[str, Any]:
        """JSON-able form for the concept file."""
        return asdict(self)

    def validate(self) -> None:
        """Refuse settings no run can use, naming the input and a valid range."""
        whole = {"steps": (self.steps, 1), "micro_batch": (self.micro_batch, 1),
                 "grad_accumulation": (self.grad_accumulation, 1), "pool_size": (self.pool_size, 1),
                 "token_bank": (self.token_bank, 0), "resolution": (self.resolution, 64)}
        for name, (value, least) in whole.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be a whole number of at least {least}, got {value!r}")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 px (the VAE's factor), got "
                             f"{self.resolution}: use e.g. 512 for SD1.x or 1024 for SDXL")
        for name in ("learning_rate", "bank_learning_rate"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}: the "
                                 "default is 8e-5 (5e-3 for token banks)")
        if not math.isfinite(self.mask_map_weight) or self.mask_map_weight < 0:
            raise ValueError(f"mask_map_weight must be finite and not negative, got {self.mask_map_weight!r}")
        if not isinstance(self.augmentation, AugmentSettings):
            raise ValueError(f"augmentation must be AugmentSettings, got {type(self.augmentation).__name__}")
        self.augmentation.validate()
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}: 'rare' is the official start")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if self.autocast not in ("auto", "none", "fp16", "bf16"):
            raise ValueError(f"precision/autocast must be 'auto', 'none' (fp32), 'fp16' or 'bf16', got {self.autocast!r}")


@dataclass
class TrainResult:
    """What a run produced (also when it stopped early)."""

    concepts: ConceptSet
    history: list[dict[str, float]]
    maps: torch.Tensor | None  # last calibrated maps [2C, h, w]: trigger and class per concept
    stopped: str  # "complete", "interrupted" or "non-finite loss"
