"""The DisenDiff training run: K/V deltas and one token per concept, from one picture.

Runs inside a ComfyUI node, so it leaves ``inference_mode`` itself, works on clones of MODEL and
CLIP, and never changes the objects it received. Follows ``docs/method.md`` §1-§9: masked eps-MSE (§4)
plus 0.01 x (L_bind + L_s&s) (§8) on Gaussian-smoothed, min-max normalised latent/4 maps (§5-§6),
start-token key/value detached (§1), AdamW 8e-5, effective batch 8, 250 steps (§9). Every piece can be switched off.

:class:`ConceptTrainer` orchestrates the parts, each in its own module: ``settings`` (the knobs
and the result), ``data`` (checked inputs, augmentation), ``parameters`` (what is learned and how
it is put on the clones), ``pools`` (views encoded once, the micro-batch draw), ``objective``
(one micro-batch's losses) and ``text_encoder`` (training through ComfyUI's CLIP). Here: the order
of set-up, the optimizer steps, the roll-back of a non-finite step, interrupts, checkpointing.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import types
from typing import Any, Callable, Iterator

import torch

from ..concepts.concept_set import FORMAT_VERSION, ConceptSet
from ..concepts.specs import ConceptSpec, check_specs
from ..concepts.triggers import known_words
from .data import check_caption, default_caption, prepare_image, prepare_masks
from .objective import TrainingObjective
from .parameters import ConceptParameters
from .pools import Pool, draw_micro_batch, on_device, prior_pool, view_pool
from .settings import TrainResult, TrainSettings
from .text_encoder import clip_layers_out_of_place

log = logging.getLogger(__name__)

Progress = Callable[[int, int, dict[str, float], torch.Tensor | None], None]


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
        self.rng = random.Random(settings.seed)  # views, then micro-batch draws
        self.generator = torch.Generator().manual_seed(settings.seed)  # timesteps and noise
        self.parameters: ConceptParameters | None = None  # made by install()
        self.objective: TrainingObjective | None = None  # made by install()
        self.history: list[dict[str, float]] = []
        self.last_maps: torch.Tensor | None = None  # maps of the last step with a finite loss
        check_caption(self.clip, self.caption, specs)
        for word in known_words(self.clip, [spec.trigger for spec in specs]):
            log.warning("trigger %r is a word this CLIP already knows (one token of its vocabulary): "
                        "training starts from what it means and changes it in every prompt with this "
                        "CLIP; a made-up word such as V1 is safer", word)

    # ----- set-up, in this order --------------------------------------------------------------
    def install(self) -> None:
        """Create what is learned and put it, with the objective's map recorder, on the clones."""
        self.parameters = ConceptParameters.initial(self.model, self.clip, self.specs, self.settings)
        self.parameters.install(self.model, self.clip, self.settings)
        self.objective = TrainingObjective(self.model, self.clip, self.parameters, self.settings,
                                           self.generator, masked=self.masks is not None)
        self.objective.install()

    def load_models(self) -> None:
        """Load the patched UNet (weight wrappers and all) and the CLIP where they will run."""
        import comfy.model_management as mm

        if self.settings.compile_unet:
            unet = self.model.get_model_object("diffusion_model")
            self.model.add_object_patch("diffusion_model", torch.compile(unet))
        mm.load_models_gpu([self.model], force_full_load=True)
        self.clip.load_model()

    def pools(self) -> tuple[Pool, Pool]:
        """The augmented views of the picture and the prior images, each encoded once and kept
        on the UNet's device."""
        views = view_pool(self.picture, self.masks, self.caption, self.settings, self.rng, self.vae, self.model)
        prior = prior_pool(self.prior, self.settings, self.rng, self.vae, self.model)
        device = self.model.load_device
        return on_device(views, device), on_device(prior, device)

    def prepare(self) -> tuple[Pool, Pool, list[torch.Tensor], torch.optim.Optimizer]:
        """Everything before the first step: parameters, hooks, loaded models, banks, data, optimizer."""
        self.install()
        self.load_models()
        self.parameters.add_banks(self.model, self.clip, self.caption, self.settings)
        target_pool, prior_pool = self.pools()
        return target_pool, prior_pool, self.parameters.trainable(), self.parameters.optimizer(self.settings)

    # ----- run ------------------------------------------------------------------------------
    def run(self, progress: Progress | None = None,
            on_checkpoint: Callable[[ConceptSet], None] | None = None) -> TrainResult:
        """Train; ``progress`` may raise to interrupt: ``on_checkpoint`` then gets the partial
        result and the exception propagates."""
        target_pool, prior_pool, params, optimizer = self.prepare()
        snapshot = [p.detach().clone() for p in params]
        stopped = "complete"
        try:
            with clip_layers_out_of_place(self.clip.cond_stage_model), self._checkpointing():
                for step in range(self.settings.steps):
                    totals = self.step(optimizer, params, target_pool, prior_pool)
                    if totals is None:
                        stopped = "non-finite loss"
                        log.warning("training stopped at step %d: the loss or its gradient is not "
                                    "finite; keeping the last good state", step)
                        with torch.no_grad():
                            for p, good in zip(params, snapshot):
                                p.copy_(good)
                        break
                    snapshot = [p.detach().clone() for p in params]
                    self.last_maps = self.objective.maps
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

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], target_pool: Pool,
             prior_pool: Pool) -> dict[str, float] | None:
        """One optimizer step over ``grad_accumulation`` micro-batches; None (and no update) if a
        loss or a gradient is not finite.

        The losses and the finiteness of every loss and gradient stay on the device until one
        read after the last micro-batch: on a GPU the host never waits inside the step.
        """
        accumulation = self.settings.grad_accumulation
        optimizer.zero_grad(set_to_none=True)
        names: list[str] = []
        values: list[torch.Tensor] = []
        finite: list[torch.Tensor] = []
        for _ in range(accumulation):
            batch, from_prior = draw_micro_batch(target_pool, prior_pool, self.settings.micro_batch, self.rng)
            losses = self.objective.losses(batch, with_maps=self.objective.uses_maps and not from_prior)
            loss = losses["reconstruction"] + losses.get("calibration", 0) + losses.get("mask", 0)
            finite.append(torch.isfinite(loss))
            (loss / accumulation).backward()
            for name, value in {**losses, "loss": loss}.items():
                names.append(name)
                values.append(value.detach().double())
        finite += [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
        read = torch.cat([torch.stack(values), torch.stack(finite).double()]).tolist()  # the one sync
        if not all(read[len(values):]):
            return None
        totals: dict[str, float] = {}
        for name, value in zip(names, read):
            totals[name] = totals.get(name, 0.0) + value / accumulation
        optimizer.step()
        return totals

    def _checkpointing(self) -> contextlib.AbstractContextManager:
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
        maps = None if self.last_maps is None else self.last_maps.cpu()
        return TrainResult(concepts, list(self.history), maps, stopped)


@contextlib.contextmanager
def _checkpointed(diffusion_model: torch.nn.Module) -> Iterator[None]:
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
                   progress: Progress | None = None,
                   on_checkpoint: Callable[[ConceptSet], None] | None = None) -> TrainResult:
    """Learn ``specs`` from one picture; safe to call from a node running under inference_mode."""
    with torch.inference_mode(False), torch.enable_grad():
        image = image.clone()
        masks = None if masks is None else masks.clone()
        prior = None if prior is None else [(p.clone(), c) for p, c in prior]
        trainer = ConceptTrainer(model, clip, vae, image, specs, settings or TrainSettings(), masks, prior)
        return trainer.run(progress, on_checkpoint)
