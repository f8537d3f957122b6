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
import re
import types
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from ..attention.calibration import CalibrationSettings, calibration_loss, prepare_maps, soft_iou
from ..attention.chain import AttentionHook
from ..attention.maps import average_token_maps
from ..attention.nested_hook import NestedSource
from ..attention.patching import install_hook, install_nested, model_layers
from ..attention.recorder import AttentionRecorder, MapStore
from ..attention.tokens import phrase_ids
from .concepts import ENCODER_KEYS, Concept, ConceptSet, FORMAT_VERSION, architecture_fingerprint
from .data import (AugmentSettings, ConceptSpec, TrainingSample, augment, check_specs, default_caption,
                   prepare_image, prepare_masks)
from .triggers import TriggerTokenizer, concept_token_groups, trigger_positions

log = logging.getLogger(__name__)

# A token bank starts at the trigger's text features plus this much seeded noise (relative to
# the features' standard deviation), so its tokens differ but nested attention starts near stock.
BANK_INIT_NOISE = 0.01
# How the per-sample reconstruction error is weighted over noise levels. "eps": the plain noise error
# (official). "eps+x0": plus the error of the predicted clean latent (the noise error times sigma^2)
# divided by sigma^2's mean over the schedule. At high noise, where a colour is decided, the noise
# error is the clean-latent error / sigma: too small to teach a small model's new token the colour
# a single picture shows; at low noise, where fine patterns are learned, it stays as it was.
LOSS_WEIGHTINGS = ("eps", "eps+x0")
# Rare CLIP vocabulary rows DisenDiff (after Custom Diffusion) copies new tokens from: ktn, pll, ucd.
RARE_TOKEN_ROWS = (42170, 47629, 43514)


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
    init: str = "rare"  # "rare" vocabulary rows, or "class" word embedding
    caption: str = ""  # empty: "photo of a V1 cat and V2 dog"
    autocast: str = "none"  # "none", "fp16", "bf16"
    gradient_checkpointing: bool = False
    pool_size: int = 32  # augmented views encoded up front
    token_bank: int = 0  # nested-attention tokens per concept (0: none, nothing changes)
    bank_learning_rate: float = 5e-3  # AdamW learning rate of the token banks (nested_attention.md §6A)

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
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if self.autocast not in ("none", "fp16", "bf16"):
            raise ValueError(f"precision/autocast must be 'none' (fp32), 'fp16' or 'bf16', got {self.autocast!r}")


@dataclass
class TrainResult:
    """What a run produced (also when it stopped early)."""

    concepts: ConceptSet
    history: list[dict[str, float]]
    maps: torch.Tensor | None  # last calibrated maps [2C, h, w]: trigger and class per concept
    stopped: str  # "complete", "interrupted" or "non-finite loss"


@dataclass(frozen=True, eq=False)
class DetachStartToken(AttentionHook):
    """Custom Diffusion's trick: no gradient through the start token's key and value."""

    chunk: int = 77

    def apply(self, q, k, v, ctx, proceed):
        keep = torch.ones(k.shape[1], 1, dtype=k.dtype, device=k.device)
        keep[:: self.chunk] = 0
        return proceed(q, k * keep + (k * (1 - keep)).detach(), v * keep + (v * (1 - keep)).detach())


class _KVDelta:
    """Weight wrapper adding a trainable delta to a frozen weight."""

    def __init__(self, delta: torch.Tensor):
        self.delta = delta

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta.to(weight)


def _identity(weight: torch.Tensor) -> torch.Tensor:
    return weight


def _out_of_place_clip_layer(self, x, mask=None, optimized_attention=None):
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


@contextlib.contextmanager
def clip_layers_out_of_place(clip_model: torch.nn.Module):
    """ComfyUI's CLIPLayer adds in place, which breaks gradients to input embeddings."""
    layers = [m for m in clip_model.modules() if type(m).__name__ == "CLIPLayer"]
    for layer in layers:
        layer.forward = types.MethodType(_out_of_place_clip_layer, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _autograd_safe(patcher: Any, module: torch.nn.Module, prefix: str, skip: set[str]) -> None:
    """Weights made under inference_mode cannot be saved for backward; have them copied per use."""
    for name, param in module.named_parameters():
        key = prefix + name
        if param.is_inference() and key not in skip:
            patcher.add_weight_wrapper(key, _identity)


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
        self.prior = prior or []
        self.rng = random.Random(settings.seed)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.kv_deltas: dict[str, torch.Tensor] = {}
        self.embeddings: list[dict[str, torch.Tensor]] = []
        self.banks: list[torch.Tensor] = []  # nested-attention token bank per concept (token_bank > 0)
        self.bank_index = torch.full((len(specs), settings.micro_batch), -1, dtype=torch.long)
        self.store = MapStore()
        self.history: list[dict[str, float]] = []
        self.last_maps: torch.Tensor | None = None  # maps of the last step with a finite loss
        self._step_maps: torch.Tensor | None = None
        self._check_caption()

    @property
    def uses_maps(self) -> bool:
        """Whether any loss needs attention maps (if not, nothing is recorded: Custom Diffusion)."""
        calibration = self.settings.calibration
        calibrated = calibration.use_bind or calibration.use_separation
        supervised = self.masks is not None and self.settings.mask_map_weight > 0
        return calibrated or supervised

    # ----- set-up -------------------------------------------------------------------------
    def _check_caption(self) -> None:
        special = self._special_token_ids()
        for spec in self.specs:
            # Whole words only: "V1 cats" contains the text "V1 cat" but not the token "cat".
            pair = re.escape(f"{spec.trigger} {spec.class_phrase}")
            if not re.search(rf"(?<!\w){pair}(?!\w)", self.caption):
                raise ValueError(f"the caption {self.caption!r} must contain "
                                 f"'{spec.trigger} {spec.class_phrase}' (trigger right before its class)")
            uses = len(re.findall(rf"(?<![\w:]){re.escape(spec.trigger)}(?!\w)", self.caption))
            if uses > 1:
                raise ValueError(f"the caption {self.caption!r} uses the trigger {spec.trigger!r} "
                                 f"{uses} times: write it once, right before its class word")
            ids = phrase_ids(self.clip, spec.class_phrase)
            if not ids or special & set(ids):
                raise ValueError(f"the class phrase {spec.class_phrase!r} of {spec.trigger!r} gives "
                                 "no ordinary tokens for this CLIP: use a plain word such as 'cat'")
        windows = max(len(chunks) for chunks in self.clip.tokenize(self.caption).values())
        if windows > 1:
            raise ValueError(f"the caption {self.caption!r} is longer than CLIP's 75-token window "
                             f"({len(self.specs)} concepts): a trigger and its class in different "
                             "windows cannot be bound. Train fewer concepts per run (or use shorter "
                             "class phrases / caption) and combine the sets with Merge Concepts")

    def _special_token_ids(self) -> set[int]:
        """Start, end and padding token ids of the CLIP's tokenizers (never a class word)."""
        ids: set[int] = set()
        for name in ("clip_l", "clip_g"):
            sub = getattr(self.clip.tokenizer, name, None)
            for attr in ("start_token", "end_token"):
                value = getattr(sub, attr, None)
                if isinstance(value, int):
                    ids.add(value)
        return ids

    def _init_parameters(self) -> None:
        encoders = {key: getattr(self.clip.cond_stage_model, key) for key in ENCODER_KEYS
                    if getattr(self.clip.cond_stage_model, key, None) is not None}
        for i, spec in enumerate(self.specs):
            vectors = {}
            for key, encoder in encoders.items():
                table = encoder.transformer.get_input_embeddings().weight
                from_last = len(self.specs) - 1 - i  # the last concept gets the first rare row
                if self.settings.init == "rare" and from_last < len(RARE_TOKEN_ROWS):
                    rows = [RARE_TOKEN_ROWS[from_last]]
                else:
                    rows = phrase_ids(self.clip, spec.class_phrase)[:1]
                vector = table[rows].detach().clone().float()
                vectors[key] = torch.nn.Parameter(vector, requires_grad=self.settings.train_embeddings)
            self.embeddings.append(vectors)
        for layer in model_layers(self.model):
            for key in layer.weight_keys:
                shape = self.model.model.state_dict()[key].shape
                self.kv_deltas[key] = torch.nn.Parameter(torch.zeros(shape),
                                                         requires_grad=self.settings.train_kv)

    def _install(self) -> None:
        for key, delta in self.kv_deltas.items():
            self.model.add_weight_wrapper(key, _KVDelta(delta))
        _autograd_safe(self.model, self.model.model.diffusion_model, "diffusion_model.",
                       set(self.kv_deltas))
        _autograd_safe(self.clip.patcher, self.clip.cond_stage_model, "", set())
        self.clip.tokenizer = TriggerTokenizer(self.clip.tokenizer, {
            spec.trigger: vectors for spec, vectors in zip(self.specs, self.embeddings)})
        if self.settings.detach_start_token:
            install_hook(self.model, DetachStartToken(), "all")
        if self.uses_maps:
            install_hook(self.model, AttentionRecorder(store=self.store, keep_grad=True, rows="all"),
                         self.settings.map_layers)

    def _init_banks(self) -> None:
        """Token banks from the trigger's text features in the caption, plus seeded noise."""
        if self.settings.token_bank <= 0:
            return
        with torch.no_grad():
            cond, _, token_lists = self._encode_prompts([self.caption])
            features = cond[0].detach().float().cpu()
            rows = self._trigger_rows(token_lists[0])
        generator = torch.Generator().manual_seed(self.settings.seed + 7919)
        for spec, row in zip(self.specs, rows):
            start = features[row]
            noise = torch.randn(self.settings.token_bank, start.shape[-1], generator=generator)
            bank = start[None] + BANK_INIT_NOISE * float(features.std()) * noise
            self.banks.append(torch.nn.Parameter(bank))
        log.info("token banks of %d tokens x %d for %s", self.settings.token_bank, features.shape[-1],
                 ", ".join(s.trigger for s in self.specs))

    def _install_banks(self) -> None:
        """Nested attention on every layer, each trigger's token reading its bank."""
        if not self.banks:
            return
        sources = [NestedSource(name=spec.trigger, bank=bank, index=index)
                   for spec, bank, index in zip(self.specs, self.banks, self.bank_index)]
        install_nested(self.model, sources, "all")

    def _trigger_rows(self, tokens: dict) -> list[int]:
        """Position of each concept's trigger (its last token) in one prompt, -1 if absent."""
        rows = []
        for vectors in self.embeddings:
            found = trigger_positions(tokens, vectors[next(iter(vectors))])
            rows.append(found[-1] if found else -1)
        return rows

    def _parameters(self) -> list[torch.Tensor]:
        params = [d for d in self.kv_deltas.values() if d.requires_grad]
        params += [v for vectors in self.embeddings for v in vectors.values() if v.requires_grad]
        params += self.banks
        if not params:
            raise ValueError("nothing to train: both K/V deltas and embeddings are switched off")
        return params

    def _optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """AdamW; the token banks (if any) in a group of their own with their learning rate."""
        banks = {id(b) for b in self.banks}
        rest = [p for p in params if id(p) not in banks]
        if not banks:
            return torch.optim.AdamW(rest, lr=self.settings.learning_rate)
        return torch.optim.AdamW([{"params": rest},
                                  {"params": list(self.banks), "lr": self.settings.bank_learning_rate}],
                                 lr=self.settings.learning_rate)

    # ----- data -----------------------------------------------------------------------------
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            latent = self.vae.encode(pixels[None])
        if not torch.isfinite(latent).all():
            raise ValueError("the VAE turned the training picture into non-finite latents: check "
                             "that the VAE matches the model and try fp32")
        return self.model.model.process_latent_in(latent.float()).detach().clone()

    def _build_pool(self) -> list[tuple[TrainingSample, torch.Tensor]]:
        size = self.settings.resolution
        count = max(1, min(self.settings.pool_size,
                           self.settings.steps * self.settings.grad_accumulation * self.settings.micro_batch))
        pool = []
        for _ in range(count):
            sample = augment(self.picture, self.masks, self.caption, size, self.rng,
                             enabled=self.settings.augment, flip=self.settings.flip,
                             settings=self.settings.augmentation)
            if sample.concept_masks is not None and self.settings.mask_reconstruction:
                union = sample.concept_masks.amax(0)[None, None]
                region = torch.nn.functional.adaptive_max_pool2d(union, size // 8)[0, 0]
                sample.loss_mask = sample.loss_mask * (region > 0.5).float()
            pool.append((sample, self._encode_pixels(sample.pixels)))
        return pool

    def _prior_pool(self) -> list[tuple[TrainingSample, torch.Tensor]]:
        size, pool = self.settings.resolution, []
        for pixels, caption in self.prior:
            sample = augment(prepare_image(pixels[None]), None, caption, size, self.rng, enabled=False,
                             flip=self.settings.flip)
            pool.append((sample, self._encode_pixels(sample.pixels)))
        return pool

    # ----- one forward ----------------------------------------------------------------------
    def _encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, list]:
        conds, pooled, token_lists = [], [], []
        for prompt in prompts:
            tokens = self.clip.tokenize(prompt)
            cond, pool = self.clip.cond_stage_model.encode_token_weights(tokens)[:2]
            conds.append(cond)
            pooled.append(pool)
            token_lists.append(tokens)
        pooled_out = torch.cat(pooled) if all(p is not None for p in pooled) else None
        return torch.cat(conds), pooled_out, token_lists

    def _token_groups(self, tokens: dict) -> list[list[int]]:
        """Positions of each concept's trigger, then its class phrase, in one prompt."""
        pairs = [(spec.trigger, spec.class_phrase, vectors[next(iter(vectors))])
                 for spec, vectors in zip(self.specs, self.embeddings)]
        return concept_token_groups(self.clip, tokens, pairs)

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
        cond, pooled, token_lists = self._encode_prompts([sample.prompt for sample, _ in batch])
        sigmas_table = base.model_sampling.sigmas
        t = torch.randint(0, len(sigmas_table), (x0.shape[0],), generator=self.generator)
        sigma = sigmas_table[t].to(device)
        noise = torch.randn(x0.shape, generator=self.generator).to(device)
        xt = base.model_sampling.noise_scaling(sigma, noise, x0)
        if self.banks:
            rows = torch.tensor([self._trigger_rows(tokens) for tokens in token_lists]).T  # [C, B]
            if rows.shape != self.bank_index.shape:
                raise RuntimeError(f"token banks expect batches of {self.bank_index.shape[1]}, "
                                   f"got {rows.shape[1]}")
            self.bank_index.copy_(rows)  # the nested sources hold views of it
        if with_maps:
            groups = [self._token_groups(tokens) for tokens in token_lists]
            self.store.set_tokens(torch.tensor([[p for g in row for p in g] for row in groups]))
        self.store.clear()
        options = dict(self.model.model_options["transformer_options"])
        with self._autocast(device):
            denoised = base.apply_model(xt, sigma, c_crossattn=cond.to(device), transformer_options=options,
                                        **self._extra_conds(pooled, x0.shape[0]))
        eps = (xt - denoised.float()) / sigma.view(-1, 1, 1, 1)
        mask = torch.stack([sample.loss_mask for sample, _ in batch])[:, None].to(device)
        err = ((eps - noise) ** 2 * mask).sum((1, 2, 3)) / (mask.sum((1, 2, 3)) * x0.shape[1]).clamp(min=1)
        if self.settings.loss_weighting == "eps+x0":
            err = err * (1 + sigma.float() ** 2 / (sigmas_table.float() ** 2).mean().to(device))
        losses = {"reconstruction": err.mean()}
        if with_maps:
            losses.update(self._map_losses(batch, groups[0]))
        else:
            zero = err.new_zeros(())
            losses.update(bind=zero, separation=zero, calibration=zero)
        return losses

    def _map_losses(self, batch, groups: list[list[int]]) -> dict[str, torch.Tensor]:
        settings = self.settings.calibration
        raw = self.store.aggregate()  # [b, T, h, w]
        lengths = [len(g) for g in groups]
        offsets = [sum(lengths[:i]) for i in range(len(lengths))]
        maps = average_token_maps(raw, [list(range(o, o + n)) for o, n in zip(offsets, lengths)])
        modifier, klass = maps[:, 0::2], maps[:, 1::2]
        out = calibration_loss(modifier, klass, settings)
        self._step_maps = torch.cat([prepare_maps(modifier, settings, is_class=False)[0],
                                    prepare_maps(klass, settings, is_class=True)[0]]).detach()
        masks = [sample.concept_masks for sample, _ in batch]
        if all(m is not None for m in masks) and self.settings.mask_map_weight > 0:
            target = torch.nn.functional.adaptive_avg_pool2d(torch.stack(masks), raw.shape[-2:])
            target = target.to(raw.device)
            mod = prepare_maps(modifier, settings, is_class=False)
            cls = prepare_maps(klass, settings, is_class=True)
            supervised = (2 - soft_iou(target, mod, settings.iou_smooth)
                          - soft_iou(target, cls, settings.iou_smooth)).sum(1).mean()
            out["mask"] = self.settings.mask_map_weight * supervised
        return {"bind": out["bind"], "separation": out["separation"],
                "calibration": out["total"], **({"mask": out["mask"]} if "mask" in out else {})}

    def _autocast(self, device: torch.device):
        kind = self.settings.autocast
        if kind == "none":
            return contextlib.nullcontext()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[kind]
        return torch.autocast(device_type=device.type, dtype=dtype)

    # ----- run ------------------------------------------------------------------------------
    def prepare(self) -> tuple[list, list, list[torch.Tensor], torch.optim.Optimizer]:
        """Everything before the first step: parameters, hooks, loaded models, data, optimizer."""
        import comfy.model_management as mm

        self._init_parameters()
        self._install()
        mm.load_models_gpu([self.model], force_full_load=True)
        self.clip.load_model()
        self._init_banks()
        self._install_banks()
        target_pool, prior_pool = self._build_pool(), self._prior_pool()
        params = self._parameters()
        return target_pool, prior_pool, params, self._optimizer(params)

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
            use_prior = bool(prior_pool) and self.rng.random() < 0.5
            pool = prior_pool if use_prior else target_pool
            batch = [pool[self.rng.randrange(len(pool))] for _ in range(self.settings.micro_batch)]
            losses = self._loss(batch, with_maps=self.uses_maps and not use_prior)
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
        banks = [b.detach().clone() for b in self.banks] or [None] * len(self.specs)
        concepts = [Concept(spec.trigger, spec.class_phrase,
                            {k: v.detach().clone() for k, v in vectors.items()}, bank)
                    for spec, vectors, bank in zip(self.specs, self.embeddings, banks)]
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
        concept_set = ConceptSet(concepts, {k: d.detach().clone() for k, d in self.kv_deltas.items()},
                                 architecture_fingerprint(self.model, self.clip), metadata)
        return TrainResult(concept_set, list(self.history), self.last_maps, stopped)


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
