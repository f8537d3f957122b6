"""The DisenDiff training loop: K/V deltas and one token per concept, from one picture.

Runs inside a ComfyUI node, so it leaves ``inference_mode`` itself, works on clones of MODEL and
CLIP, and never changes the objects it received. Follows ``disendiff.md``: masked eps-MSE plus
0.01 x (L_bind + L_s&s) on Gaussian-smoothed, min-max normalised latent/4 maps, SOT key/value
detached, AdamW 8e-5, effective batch 8, 250 steps. Every piece can be switched off.

With ``token_bank`` > 0 each concept also learns a nested-attention token bank
(``nested_attention.md`` §6A): ``M`` vectors in text-feature space that every cross-attention
layer projects with its own (delta-patched) ``to_k``/``to_v``, read by the trigger token.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import types
from typing import Any, Callable

import torch

from ..attention.calibration import calibration_terms, prepare_maps, soft_iou
from ..attention.patching import install_hook
from ..attention.recorder import AttentionRecorder, MapStore
from ..concepts.concept_set import FORMAT_VERSION, ConceptSet
from ..concepts.specs import ConceptSpec, check_specs
from ..concepts.triggers import known_words
from .data import TrainingSample, check_caption, default_caption, prepare_image, prepare_masks
from .parameters import ConceptParameters
from .pools import Pool, draw_micro_batch, prior_pool, view_pool
from .settings import TrainResult, TrainSettings
from .text_encoder import clip_layers_out_of_place, encode_prompts

log = logging.getLogger(__name__)

def image_hash(picture: torch.Tensor) -> str:
    """Short content hash of the training picture, kept in the concept file."""
    return hashlib.sha256((picture * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()[:16]


class ConceptTrainer:
    """One training run. Build it, then call :meth:`run` (inside inference_mode(False))."""

    def __init__(self, model: Any, clip: Any, vae: Any, image: torch.Tensor, specs: list[ConceptSpec],
                 settings: TrainSettings, masks: torch.Tensor | None = None,
                 prior: list[tuple[torch.Tensor, str]] | None = None):
        if not specs:
            raise ValueError("no concepts given: name at least one trigger and its class word")
        settings.validate()
        check_specs(specs)
        self.settings = settings
        self.specs = specs
        self.picture = prepare_image(image)
        self.masks = prepare_masks(masks, self.picture, len(specs))
        self.caption = settings.caption.strip() or default_caption(specs)
        self.model, self.clip, self.vae = model.clone(), clip.clone(), vae
        self.prior = [(prepare_image(pixels[None], f"prior image {number} (prior_images)"), caption)
                      for number, (pixels, caption) in enumerate(prior or [], 1)]
        self.rng = random.Random(settings.seed)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.parameters: ConceptParameters | None = None  # made by install()
        self.store = MapStore()
        self.history: list[dict[str, float]] = []
        self.last_maps: torch.Tensor | None = None  # maps of the last step with a finite loss
        self._step_maps: torch.Tensor | None = None
        check_caption(self.clip, self.caption, specs)
        for word in known_words(self.clip, [spec.trigger for spec in specs]):
            log.warning("trigger %r is a word this CLIP already knows (one token of its vocabulary): "
                        "training starts from what it means and changes it in every prompt with this "
                        "CLIP; a made-up word such as V1 is safer", word)

    @property
    def uses_maps(self) -> bool:
        """Whether any loss needs attention maps (if not, nothing is recorded: Custom Diffusion)."""
        calibration = self.settings.calibration
        calibrated = calibration.use_bind or calibration.use_separation
        supervised = self.masks is not None and self.settings.mask_map_weight > 0
        return calibrated or supervised

    # ----- set-up -------------------------------------------------------------------------
    def install(self) -> None:
        """Create what is learned and put it, with the loss's attention recorder, on the clones."""
        self.parameters = ConceptParameters.initial(self.model, self.clip, self.specs, self.settings)
        self.parameters.install(self.model, self.clip, self.settings)
        if self.uses_maps:
            install_hook(self.model, AttentionRecorder(store=self.store, keep_grad=True, rows="all"),
                         self.settings.map_layers)

    def load_models(self) -> None:
        """Load the patched UNet (weight wrappers and all) and the CLIP where they will run."""
        import comfy.model_management as mm

        mm.load_models_gpu([self.model], force_full_load=True)
        self.clip.load_model()

    def pools(self) -> tuple[Pool, Pool]:
        """The augmented views of the picture and the prior images, each encoded once."""
        views = view_pool(self.picture, self.masks, self.caption, self.settings, self.rng, self.vae, self.model)
        return views, prior_pool(self.prior, self.settings, self.rng, self.vae, self.model)

    # ----- one forward ----------------------------------------------------------------------
    def _extra_conds(self, pooled: torch.Tensor | None, batch: int) -> dict[str, torch.Tensor]:
        base = self.model.model
        if getattr(base, "adm_channels", 0) == 0:
            return {}
        size = self.settings.resolution
        ys = [base.encode_adm(pooled_output=pooled[i:i + 1], width=size, height=size,
                              target_width=size, target_height=size, device=pooled.device)
              for i in range(batch)]
        return {"y": torch.cat(ys)}

    def _loss(self, batch: list[tuple[TrainingSample, torch.Tensor]], with_maps: bool) -> dict[str, torch.Tensor]:
        base = self.model.model
        device = next(base.diffusion_model.parameters()).device
        x0 = torch.cat([latent for _, latent in batch]).to(device)
        cond, pooled, token_lists = encode_prompts(self.clip, [sample.prompt for sample, _ in batch])
        sigmas_table = base.model_sampling.sigmas
        t = torch.randint(0, len(sigmas_table), (x0.shape[0],), generator=self.generator)
        sigma = sigmas_table[t].to(device)
        noise = torch.randn(x0.shape, generator=self.generator).to(device)
        xt = base.model_sampling.noise_scaling(sigma, noise, x0)
        self.parameters.point_banks_at(token_lists)
        if with_maps:
            self.store.set_words([self.parameters.token_groups(self.clip, tokens) for tokens in token_lists])
        self.store.clear()
        options = dict(self.model.model_options["transformer_options"])
        with self._autocast(device):
            denoised = base.apply_model(xt, sigma, c_crossattn=cond.to(device), transformer_options=options,
                                        **self._extra_conds(pooled, x0.shape[0]))
        eps = (xt - denoised.float()) / sigma.view(-1, 1, 1, 1)
        mask = torch.stack([sample.loss_mask for sample, _ in batch])[:, None].to(device)
        err = ((eps - noise) ** 2 * mask).sum((1, 2, 3)) / (mask.sum((1, 2, 3)) * x0.shape[1]).clamp(min=1)
        losses = {"reconstruction": err.mean()}
        if with_maps:
            losses.update(self._map_losses(batch))
        else:
            zero = err.new_zeros(())
            losses.update(bind=zero, separation=zero, calibration=zero)
        return losses

    def _map_losses(self, batch) -> dict[str, torch.Tensor]:
        settings = self.settings.calibration
        maps = self.store.word_maps()  # [b, 2C, h, w]: trigger then class word of each concept
        modifiers = prepare_maps(maps[:, 0::2], settings, is_class=False)
        classes = prepare_maps(maps[:, 1::2], settings, is_class=True)
        out = calibration_terms(modifiers, classes, settings)
        self._step_maps = torch.cat([modifiers[0], classes[0]]).detach()
        losses = {"bind": out["bind"], "separation": out["separation"], "calibration": out["total"]}
        masks = [sample.concept_masks for sample, _ in batch]
        if all(m is not None for m in masks) and self.settings.mask_map_weight > 0:
            target = torch.nn.functional.adaptive_avg_pool2d(torch.stack(masks), maps.shape[-2:])
            target = target.to(maps.device)
            supervised = (2 - soft_iou(target, modifiers, settings.iou_smooth)
                          - soft_iou(target, classes, settings.iou_smooth)).sum(1).mean()
            losses["mask"] = self.settings.mask_map_weight * supervised
        return losses

    def _autocast(self, device: torch.device):
        kind = self.settings.autocast
        if kind == "none":
            return contextlib.nullcontext()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[kind]
        return torch.autocast(device_type=device.type, dtype=dtype)

    # ----- run ------------------------------------------------------------------------------
    def prepare(self) -> tuple[list, list, list[torch.Tensor], torch.optim.Optimizer]:
        """Everything before the first step: parameters, hooks, loaded models, banks, data, optimizer."""
        self.install()
        self.load_models()
        self.parameters.add_banks(self.model, self.clip, self.caption, self.settings)
        target_pool, prior_pool = self.pools()
        return target_pool, prior_pool, self.parameters.trainable(), self.parameters.optimizer(self.settings)

    def run(self, progress: Callable[[int, int, dict[str, float], torch.Tensor | None], None] | None = None,
            on_checkpoint: Callable[[ConceptSet], None] | None = None) -> TrainResult:
        """Train; ``progress`` may raise to interrupt: ``on_checkpoint`` then gets the partial
        result and the exception propagates."""
        target_pool, prior_pool, params, optimizer = self.prepare()
        snapshot = [p.detach().clone() for p in params]
        stopped = "complete"
        try:
            with clip_layers_out_of_place(self.clip.cond_stage_model), self._checkpointing():
                for step in range(self.settings.steps):
                    totals = self._step(optimizer, params, target_pool, prior_pool)
                    if totals is None:
                        stopped = "non-finite loss"
                        log.warning("training stopped at step %d: the loss or its gradient is not "
                                    "finite; keeping the last good state", step)
                        with torch.no_grad():
                            for p, good in zip(params, snapshot):
                                p.copy_(good)
                        break
                    snapshot = [p.detach().clone() for p in params]
                    self.last_maps = self._step_maps
                    totals["step"] = step + 1
                    self.history.append(totals)
                    if progress is not None:
                        progress(step + 1, self.settings.steps, totals, self.last_maps)
        except BaseException:
            # Interrupted (or failed) anywhere in the loop: hand over what was learned so far.
            if on_checkpoint is not None:
                try:
                    on_checkpoint(self.result("interrupted").concepts)
                except Exception:  # noqa: BLE001 - the original error is the one to report
                    log.exception("could not keep the partial concepts of the interrupted run")
            raise
        return self.result(stopped)

    def _step(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], target_pool: list,
              prior_pool: list) -> dict[str, float] | None:
        """One optimizer step over ``grad_accumulation`` micro-batches; None if not finite."""
        accumulation = self.settings.grad_accumulation
        totals: dict[str, float] = {}
        optimizer.zero_grad(set_to_none=True)
        for _ in range(accumulation):
            batch, from_prior = draw_micro_batch(target_pool, prior_pool, self.settings.micro_batch, self.rng)
            losses = self._loss(batch, with_maps=self.uses_maps and not from_prior)
            loss = losses["reconstruction"] + losses.get("calibration", 0) + losses.get("mask", 0)
            if not torch.isfinite(loss):
                return None
            (loss / accumulation).backward()
            for name, value in {**losses, "loss": loss}.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach()) / accumulation
        if not all(p.grad is None or torch.isfinite(p.grad).all() for p in params):
            return None
        optimizer.step()
        return totals

    def _checkpointing(self):
        if not self.settings.gradient_checkpointing:
            return contextlib.nullcontext()
        return _checkpointed(self.model.model.diffusion_model)

    def result(self, stopped: str) -> TrainResult:
        """The current state as a ConceptSet (detached copies)."""
        metadata = {
            "format_version": FORMAT_VERSION,
            "method": "disendiff",
            "settings": self.settings.to_metadata(),
            "caption": self.caption,
            "image_hash": image_hash(self.picture),
            "steps_done": len(self.history),
            "complete": stopped == "complete",
            "stopped": stopped,
            "final_loss": self.history[-1]["loss"] if self.history else math.nan,
        }
        concepts = self.parameters.concept_set(self.model, self.clip, metadata)
        return TrainResult(concepts, list(self.history), self.last_maps, stopped)


@contextlib.contextmanager
def _checkpointed(diffusion_model: torch.nn.Module):
    """Recompute activations of the UNet's top-level blocks in backward to save memory."""
    from torch.utils.checkpoint import checkpoint

    blocks = list(diffusion_model.input_blocks) + [diffusion_model.middle_block] + list(diffusion_model.output_blocks)
    for block in blocks:
        original = block.forward
        block.forward = types.MethodType(
            lambda self, *a, _f=original, **k: checkpoint(_f, *a, use_reentrant=False, **k), block)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def train_concepts(model: Any, clip: Any, vae: Any, image: torch.Tensor, specs: list[ConceptSpec],
                   settings: TrainSettings | None = None, masks: torch.Tensor | None = None,
                   prior: list[tuple[torch.Tensor, str]] | None = None,
                   progress: Callable[[int, int, dict[str, float], torch.Tensor | None], None] | None = None,
                   on_checkpoint: Callable[[ConceptSet], None] | None = None) -> TrainResult:
    """Learn ``specs`` from one picture; safe to call from a node running under inference_mode."""
    with torch.inference_mode(False), torch.enable_grad():
        image = image.clone()
        masks = None if masks is None else masks.clone()
        prior = None if prior is None else [(p.clone(), c) for p, c in prior]
        trainer = ConceptTrainer(model, clip, vae, image, specs, settings or TrainSettings(), masks, prior)
        return trainer.run(progress, on_checkpoint)
