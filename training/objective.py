"""What a DisenDiff run minimises on one micro-batch (``docs/method.md`` §4-§8).

``reconstruction``: the UNet's eps-MSE on the noised views, inside each view's loss mask. With
attention maps (the trigger's and its class phrase's, recorded at ``map_layers``), DisenDiff's
calibration terms ``bind`` and ``separation`` (weighted into ``calibration``) and, with concept
masks, ``mask``: 1 - soft IoU of each map with its concept's mask.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..attention.calibration import calibration_terms, prepare_maps, soft_iou
from ..attention.patching import install_hook
from ..attention.recorder import AttentionRecorder, MapStore
from .parameters import ConceptParameters
from .pools import Pool
from .settings import TrainSettings
from .text_encoder import PromptEncoder


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor made on the CPU (the run's generator lives there) on ``device``, without waiting
    for the work queued there: on CUDA through pinned memory, elsewhere as it is."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class TrainingObjective:
    """One micro-batch's losses, with timesteps and noise drawn from the run's generator."""

    def __init__(self, model: Any, clip: Any, parameters: ConceptParameters, settings: TrainSettings,
                 generator: torch.Generator, masked: bool):
        self.model, self.clip, self.parameters = model, clip, parameters
        self.settings, self.generator = settings, generator
        calibration = settings.calibration
        calibrated = calibration.use_bind or calibration.use_separation
        # Whether any loss needs attention maps (if not, nothing is recorded: Custom Diffusion).
        self.uses_maps = calibrated or (masked and settings.mask_map_weight > 0)
        self.store = MapStore()
        self.maps: torch.Tensor | None = None  # calibrated maps [2C, h, w] of the last batch with maps
        self.encoder: PromptEncoder | None = None  # made with the first batch, on the UNet's device
        self.sigma_table: torch.Tensor | None = None  # the model's sigmas, on the CPU (timesteps are drawn there)
        self.mean_sigma_sq: torch.Tensor | None = None  # their mean square, for loss_weighting "eps+x0"

    def install(self) -> None:
        """Record the attention maps the map losses read, on the run's MODEL clone (if any loss does)."""
        if self.uses_maps:
            install_hook(self.model, AttentionRecorder(store=self.store, keep_grad=True, rows="all"),
                         self.settings.map_layers)

    def losses(self, batch: Pool, with_maps: bool) -> dict[str, torch.Tensor]:
        """Reconstruction, calibration (bind, separation) and mask losses of one micro-batch."""
        base = self.model.model
        device = next(base.diffusion_model.parameters()).device
        if self.encoder is None:
            self.encoder = PromptEncoder(self.clip, device, trains_text=self.settings.train_embeddings)
            self.sigma_table = base.model_sampling.sigmas.detach().to("cpu", copy=True)
            self.mean_sigma_sq = (self.sigma_table.float() ** 2).mean()
        x0 = torch.cat([latent for _, latent in batch])  # the pool is on the device already
        cond, pooled, token_lists = self.encoder([sample.prompt for sample, _ in batch])
        t = torch.randint(0, len(self.sigma_table), (x0.shape[0],), generator=self.generator)
        sigma = upload(self.sigma_table[t], device)
        noise = upload(torch.randn(x0.shape, generator=self.generator), device)
        xt = base.model_sampling.noise_scaling(sigma, noise, x0)
        self.parameters.point_banks_at(token_lists)
        if with_maps:
            self.store.set_words([self.parameters.token_groups(self.clip, tokens) for tokens in token_lists])
        self.store.clear()
        options = dict(self.model.model_options["transformer_options"])
        with self._autocast(device):
            denoised = base.apply_model(xt, sigma, c_crossattn=cond, transformer_options=options,
                                        **self._extra_conds(pooled, x0.shape[0]))
        eps = (xt - denoised.float()) / sigma.view(-1, 1, 1, 1)
        mask = torch.stack([sample.loss_mask for sample, _ in batch])[:, None]
        err = ((eps - noise) ** 2 * mask).sum((1, 2, 3)) / (mask.sum((1, 2, 3)) * x0.shape[1]).clamp(min=1)
        if self.settings.loss_weighting == "eps+x0":
            err = err * upload(1 + self.sigma_table[t].float() ** 2 / self.mean_sigma_sq, device)
        losses = {"reconstruction": err.mean()}
        if with_maps:
            losses.update(self._map_losses(batch, t))
        else:
            zero = err.new_zeros(())
            losses.update(bind=zero, separation=zero, calibration=zero)
        return losses

    def _map_losses(self, batch: Pool, t: torch.Tensor) -> dict[str, torch.Tensor]:
        settings = self.settings.calibration
        maps = self.store.word_maps()  # [b, 2C, h, w]: trigger then class word of each concept
        modifiers = prepare_maps(maps[:, 0::2], settings, is_class=False)
        classes = prepare_maps(maps[:, 1::2], settings, is_class=True)
        rows = None
        if settings.max_t < 1:  # the sigma table ascends: index 0 is the least noise
            rows = upload(t <= settings.max_t * (len(self.sigma_table) - 1), maps.device)
        out = calibration_terms(modifiers, classes, settings, rows)
        self.maps = torch.cat([modifiers[0], classes[0]]).detach()
        losses = {"bind": out["bind"], "separation": out["separation"], "calibration": out["total"]}
        masks = [sample.concept_masks for sample, _ in batch]
        if all(m is not None for m in masks) and self.settings.mask_map_weight > 0:
            target = torch.nn.functional.adaptive_avg_pool2d(torch.stack(masks), maps.shape[-2:])
            supervised = (2 - soft_iou(target, modifiers, settings.iou_smooth)
                          - soft_iou(target, classes, settings.iou_smooth)).sum(1).mean()
            losses["mask"] = self.settings.mask_map_weight * supervised
        return losses

    def _extra_conds(self, pooled: torch.Tensor | None, batch: int) -> dict[str, torch.Tensor]:
        """The ADM vector ``y`` (SDXL: pooled text plus size and crop); nothing for models without one."""
        base = self.model.model
        if getattr(base, "adm_channels", 0) == 0:
            return {}
        size = self.settings.resolution
        ys = [base.encode_adm(pooled_output=pooled[i:i + 1], width=size, height=size,
                              target_width=size, target_height=size, device=pooled.device)
              for i in range(batch)]
        return {"y": torch.cat(ys)}

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        kind = autocast_kind(self.settings.autocast, device)
        if kind == "none":
            return contextlib.nullcontext()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[kind]
        return torch.autocast(device_type=device.type, dtype=dtype)


def autocast_kind(setting: str, device: torch.device) -> str:
    """The autocast a run on ``device`` uses: ``"auto"`` is bf16 on CUDA GPUs with bf16 matrix
    units (compute capability 8.0 and up), no autocast elsewhere (the CPU trains in fp32)."""
    if setting != "auto":
        return setting
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "bf16"
    return "none"
