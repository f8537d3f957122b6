"""Resumable, seeded pretraining of the toy world's base model on 2 CPU cores (or a GPU).

Four stages, each checkpointed atomically into a work directory so a run can stop at any time
(``--max-minutes`` or Ctrl-C) and resume where it left off, also on another machine
(``slim_checkpoint``):

1. ``vae``: TAESD encoder+decoder on 32 px crops of scenes (crop offsets on the 8 px pattern grid),
   then whole scenes, L1 + MSE. Then the latent channels are standardised (folded into the encoder).
2. ``latents``: a fixed set of scenes is encoded once (objects kept, captions redrawn every step).
3. ``decoder``: the decoder alone on those latents, object pixels weighted up.
4. ``unet``: UNet and CLIP text model jointly, ε-objective with Min-SNR weighting, AdamW with
   warm-up and cosine decay, 10 % empty captions (for classifier-free guidance), EMA weights;
   optionally plus the attention-supervision term (``supervision``) on words' maps.

``seed_from_weights`` starts a work directory from shipped weights instead: VAE and decoder done,
the UNet widened (``widen``, same outputs) and the text model kept, so only the UNet stage runs.

``export`` writes fp16 EMA weights to ``smallworld/weights``. Needs ComfyUI importable (library mode).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from concept_attention.attention.tokens import phrase_ids
from concept_attention.training.text_encoder import clip_layers_out_of_place
from concept_attention.smallworld import model as toy
from concept_attention.smallworld import scenes as sw
from . import fresh
from . import supervision as sup
from . import widen

log = logging.getLogger(__name__)
SD15_LATENT_SCALE = 0.18215  # comfy.latent_formats.SD15.scale_factor


@dataclass
class PretrainConfig:
    """Everything that determines the result (seeded), plus the work directory."""

    work_dir: Path
    seed: int = 0
    vae_steps: int = 3000
    vae_batch: int = 24
    vae_crop: int = 32
    vae_full_steps: int = 400  # then whole scenes: crop-only training does not carry over to 128 px
    vae_full_batch: int = 4
    vae_full_lr: float = 2e-4
    vae_lr: float = 1e-3
    scale_scenes: int = 64
    scenes: int = 5000
    object_counts: tuple[float, float, float] = sw.PRETRAIN_COUNTS  # chances of 1, 2, 3 objects
    hidden_rate: float = sw.PRETRAIN_HIDDEN_RATE  # objects forced into a hidden combo
    twin_rate: float = 0.0  # multi-object scenes whose objects share one colour and pattern (sw.random_scene)
    hidden_hint_rate: float = 0.0  # hidden objects' mentions naming one of their words, before drops (sw.hidden_hints)
    decoder_steps: int = 3000  # decoder alone on the encoded scenes: the latent space stays fixed
    decoder_batch: int = 4
    decoder_lr: float = 2e-4
    decoder_object_weight: float = 8.0  # object pixels count this much more: the background dominates
    steps: int = 21000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 300
    empty_caption_rate: float = 0.1
    ema_decay: float = 0.999
    snr_gamma: float = 5.0  # Min-SNR-gamma loss weight (Hang et al. 2023); 0 turns it off
    text_lr_scale: float = 1.0  # the text model's learning rate relative to ``lr``
    supervision_weight: float = 0.0  # attention supervision (``supervision``); 0: off
    supervision_layers: str = toy.CALIBRATION_LAYERS
    supervision_max_t: float = 1.0
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        for name in ("twin_rate", "hidden_hint_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")

    def supervision(self) -> sup.SupervisionSettings:
        """The attention-supervision settings of this run."""
        return sup.SupervisionSettings(self.supervision_weight, self.supervision_layers, self.supervision_max_t)


def pretrain_scene(cfg: PretrainConfig, index: int) -> sw.Scene:
    """Scene ``index`` of the fixed pretraining set (objects kept; captions are redrawn per step)."""
    scene = sw.random_scene(np.random.default_rng([cfg.seed, 2, index]), hidden_rate=cfg.hidden_rate,
                            counts=cfg.object_counts)
    if cfg.twin_rate > 0 and len(scene.objects) > 1:
        # a generator of its own: the scenes that stay are those of the default set at any rate
        twin_rng = np.random.default_rng([cfg.seed, 5, index])
        if twin_rng.random() < cfg.twin_rate:
            scene = sw.random_scene(twin_rng, n_objects=len(scene.objects), hidden_rate=cfg.hidden_rate, twin=True)
    return scene


def _atomic_save(obj: dict, path: Path) -> None:
    """torch.save to a temp file then rename (checkpoints are private to the work dir)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _load(path: Path) -> Optional[dict]:
    """A private checkpoint (tensors only), on the CPU whatever device wrote it."""
    return torch.load(path, weights_only=True, map_location="cpu") if path.is_file() else None


def _vae_batch(rng: np.random.Generator, batch: int, crop: int = 64) -> torch.Tensor:
    """Random crops, on the 8 px grid, of fresh random scenes; [B,3,crop,crop] in 0..1."""
    out = []
    for _ in range(batch):
        scene = sw.random_scene(rng)
        y, x = (rng.integers(0, (scene.size - crop) // 8 + 1, size=2) * 8)
        out.append(scene.image[y:y + crop, x:x + crop])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0


def train_vae(cfg: PretrainConfig, should_stop: Callable[[], bool]) -> torch.nn.Module:
    """Stage 1: TAESD autoencoder; returns the trained module with its latent scale set."""
    path = cfg.work_dir / "vae.pt"
    taesd = fresh.new_taesd(cfg.seed)
    opt = torch.optim.AdamW([p for n, p in taesd.named_parameters() if not n.startswith("vae_")], cfg.vae_lr)
    state = _load(path) or {"step": 0}
    if "model" in state:
        taesd.load_state_dict(state["model"])
    if "opt" in state:
        opt.load_state_dict(state["opt"])
    step = state["step"]
    total = cfg.vae_steps + cfg.vae_full_steps
    while step < total and not should_stop():
        rng = np.random.default_rng([cfg.seed, 1, step])
        if step < cfg.vae_steps:
            x = _vae_batch(rng, cfg.vae_batch, cfg.vae_crop)
            lr = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        else:
            x = _vae_batch(rng, cfg.vae_full_batch, toy.IMAGE_SIZE)
            lr = cfg.vae_full_lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.vae_steps) / max(1, cfg.vae_full_steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        recon = taesd.taesd_decoder(taesd.taesd_encoder(x))
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            log.info("vae step %d/%d loss %.4f (mae %.2f/255)", step, total, loss.item(),
                     255 * (recon - x).abs().mean().item())
        if step % cfg.checkpoint_every == 0:
            _atomic_save({"model": taesd.state_dict(), "opt": opt.state_dict(), "step": step}, path)
    if step != state["step"]:  # finished or stopped: keep every step done
        _atomic_save({"model": taesd.state_dict(), "opt": opt.state_dict(), "step": step}, path)
    if step >= total and state.get("scaled_at") != total:
        _set_latent_scale(taesd, cfg.seed, cfg.scale_scenes)
        _atomic_save({"model": taesd.state_dict(), "opt": opt.state_dict(), "step": step, "scaled_at": total}, path)
    return taesd


@torch.no_grad()
def _set_latent_scale(taesd: torch.nn.Module, seed: int, count: int) -> None:
    """Make ComfyUI's SD1.5 latent format yield zero-mean, unit-spread latents PER CHANNEL.

    The scene latents have large per-channel offsets and small spreads (mostly flat background);
    with a single scalar scale the UNet must predict those offsets from pure noise at the highest
    noise levels, which it does badly. The per-channel affine is folded into the encoder's last
    convolution, and vae_scale/shift are set so that model-space latents equal its output.
    """
    images = _scene_images(range(count), seed + 99)
    raw = taesd.taesd_encoder(images)
    mean, std = raw.mean((0, 2, 3)), raw.std((0, 2, 3)).clamp(min=1e-6)
    fold_channel_affine(_last_conv(taesd.taesd_encoder), mean, std)
    taesd.vae_scale.fill_(SD15_LATENT_SCALE)
    taesd.vae_shift.fill_(0.0)
    log.info("latent channel means %s spreads %s folded into the encoder", mean.tolist(), std.tolist())


def _last_conv(encoder: torch.nn.Module) -> torch.nn.Conv2d:
    return [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]


@torch.no_grad()
def fold_channel_affine(conv: torch.nn.Conv2d, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make ``conv`` output (out - mean) / std per output channel."""
    conv.weight.div_(std.view(-1, 1, 1, 1))
    if conv.bias is None:
        raise ValueError("the encoder's last convolution needs a bias to fold the channel means")
    conv.bias.sub_(mean).div_(std)


def _scene_images(indices, seed: int) -> torch.Tensor:
    imgs = [sw.random_scene(np.random.default_rng([seed, i]), random_words=True).image for i in indices]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0


def encode_latents(cfg: PretrainConfig, taesd: torch.nn.Module, should_stop: Callable[[], bool],
                   device: str = "cpu") -> Optional[dict]:
    """Stage 2: model-space latents [N,4,16,16], pooled masks and object specs of ``cfg.scenes`` fixed scenes."""
    path = cfg.work_dir / "latents.pt"
    digest = encoder_digest(taesd)
    state = _load(path)
    if state is None or state.get("encoder") != digest or "masks" not in state:  # none, stale or old format
        state = {"latents": [], "masks": [], "objects": [], "backgrounds": [], "encoder": digest}
    done = sum(len(chunk) for chunk in state["latents"])
    if cfg.twin_rate > 0 and done >= cfg.scenes:
        log.warning("twin_rate %.2f changes nothing: the latent cache already holds %d scenes (raise --scenes "
                    "to append scenes drawn with it)", cfg.twin_rate, done)
    with torch.no_grad():
        while done < cfg.scenes and not should_stop():
            idx = range(done, min(done + 256, cfg.scenes))
            scenes = [pretrain_scene(cfg, i) for i in idx]
            x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255.0
            taesd.to(device)
            latent = (taesd.taesd_encoder(x.to(device)) / taesd.vae_scale + taesd.vae_shift) * SD15_LATENT_SCALE
            taesd.to("cpu")
            state["latents"].append(latent.half().cpu())
            state["masks"].append(pooled_masks(scenes, latent.shape[-1]).half())
            state["objects"] += [json.dumps([asdict(o) for o in s.objects]) for s in scenes]
            state["backgrounds"] += [s.background for s in scenes]
            done += len(scenes)
            _atomic_save(state, path)
            log.info("encoded %d/%d scenes", done, cfg.scenes)
    if done < cfg.scenes:
        return None
    return {"latents": torch.cat(state["latents"]).float(), "masks": torch.cat(state["masks"]).float(),
            "objects": state["objects"], "backgrounds": state["backgrounds"]}


def cached_objects(data: dict, index: int) -> list[sw.ObjectSpec]:
    """The objects of scene ``index`` of the latent cache (``encode_latents``' data)."""
    return [sw.ObjectSpec(**o) for o in json.loads(data["objects"][index])]


def pooled_masks(scenes: list, side: int, slots: int = 3) -> torch.Tensor:
    """Object masks area-pooled to the latent size: [N, slots, side, side] (missing objects zero)."""
    out = torch.zeros(len(scenes), slots, side, side)
    for n, scene in enumerate(scenes):
        masks = torch.from_numpy(scene.masks.astype(np.float32))[None]
        out[n, :masks.shape[1]] = F.adaptive_avg_pool2d(masks, side)[0]
    return out


def train_decoder(cfg: PretrainConfig, taesd: torch.nn.Module, data: dict,
                  should_stop: Callable[[], bool], device: str = "cpu") -> int:
    """Stage 2b: fine-tune the TAESD decoder on the encoded scenes (encoder and latents unchanged).

    Object pixels weigh ``decoder_object_weight`` times more than background: with a plain mean,
    colours that are rare per pixel (cyan, purple, pink) decoded as their neighbours.
    """
    path = cfg.work_dir / "decoder.pt"
    decoder = taesd.taesd_decoder
    opt = torch.optim.AdamW(decoder.parameters(), cfg.decoder_lr)
    state = _load(path) or {"step": 0}
    if "decoder" in state:
        decoder.load_state_dict(state["decoder"])
    if "opt" in state:
        opt.load_state_dict(state["opt"])
    step, latents = state["step"], data["latents"]
    taesd.to(device)
    rendered: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # fixed scenes recur: draw each once

    def scene(i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image [H,W,3] and the union of its object masks [H,W], drawn from the cached objects."""
        if i not in rendered:
            drawn = sw.draw_scene(cached_objects(data, i), data["backgrounds"][i], caption="")
            rendered[i] = (drawn.image, drawn.masks.any(0))
        return rendered[i]

    while step < cfg.decoder_steps and not should_stop():
        rng = np.random.default_rng([cfg.seed, 4, step])
        idx = rng.integers(0, len(latents), cfg.decoder_batch)
        images, masks = zip(*(scene(int(i)) for i in idx))
        target = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
        objects = torch.from_numpy(np.stack(masks)).to(device).float()[:, None]
        weight = 1 + (cfg.decoder_object_weight - 1) * objects
        with torch.no_grad():
            raw = (latents[torch.from_numpy(idx)].to(device) / SD15_LATENT_SCALE - taesd.vae_shift) * taesd.vae_scale
        for group in opt.param_groups:
            group["lr"] = cfg.decoder_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.decoder_steps))
        recon = decoder(raw)
        error = (recon - target).abs() + (recon - target) ** 2
        loss = (weight * error).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            log.info("decoder step %d/%d loss %.4f (mae %.2f/255)", step, cfg.decoder_steps, loss.item(),
                     255 * (recon - target).abs().mean().item())
        if step % cfg.checkpoint_every == 0:
            _atomic_save({"decoder": decoder.state_dict(), "opt": opt.state_dict(), "step": step}, path)
    if step != state["step"]:
        _atomic_save({"decoder": decoder.state_dict(), "opt": opt.state_dict(), "step": step}, path)
    taesd.to("cpu")
    return step


def encoder_digest(taesd: torch.nn.Module) -> str:
    """Short hash of the encoder weights and latent scale (cached latents must match it)."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(taesd.state_dict().items()):
        if not name.startswith("taesd_decoder"):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class CaptionTokens:
    """Caches tokenizer output: caption -> list of token ids (77 per chunk, first chunk only)."""

    def __init__(self, clip: Any):
        self.clip = clip
        self.cache: dict[str, list[int]] = {}

    def __call__(self, caption: str) -> list[int]:
        if caption not in self.cache:
            self.cache[caption] = [tok for tok, _ in self.clip.tokenize(caption)["l"][0]]
        return self.cache[caption]


def _captions(data: dict, indices: np.ndarray, rng: np.random.Generator, empty_rate: float,
              hint_rate: float = 0.0, hint_rng: Optional[np.random.Generator] = None) -> list[str]:
    """One step's captions; hints are drawn from ``hint_rng`` so that ``rng``'s stream is the same at any rate."""
    if hint_rate > 0 and hint_rng is None:
        raise ValueError("a hint rate above 0 needs a hint generator of its own")
    out = []
    for i in indices:
        if rng.random() < empty_rate:
            out.append("")
            continue
        objects = cached_objects(data, i)
        hints = sw.hidden_hints(objects, hint_rng, hint_rate)  # at rate 0 all empty, without a draw
        out.append(sw.random_caption(objects, data["backgrounds"][i], toy.IMAGE_SIZE, rng, hints=hints))
    return out


def lr_at(cfg: PretrainConfig, step: int, rewarm_from: Optional[int] = None) -> float:
    """Linear warm-up, cosine decay to 10 %; ``rewarm_from``: a second warm-up from that step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    lr = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    if rewarm_from is not None:
        lr *= min(1.0, (step - rewarm_from + 1) / cfg.warmup)
    return lr


def _snr_weight(sigma: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weight for an epsilon loss: min(SNR, gamma) / SNR, with SNR = 1 / sigma^2."""
    if gamma <= 0:
        return torch.ones_like(sigma)
    snr = sigma.pow(-2)
    return snr.clamp(max=gamma) / snr


def train_unet(cfg: PretrainConfig, data: dict, should_stop: Callable[[], bool],
               device: str = "cpu") -> tuple[Any, Any, int]:
    """Stage 3: UNet + text model; returns (model patcher, clip) holding EMA weights, and the step.

    A checkpoint without optimizer state (a slim copy moved between machines) resumes with fresh
    AdamW moments and a new linear warm-up of ``cfg.warmup`` steps.
    """
    path = cfg.work_dir / "unet.pt"
    state = _load(path) or {"step": 0}
    width = toy.width_of({k[len("unet."):]: v for k, v in state["model"].items()}) if "model" in state else None
    patcher, clip = fresh.random_model(cfg.seed, width), fresh.random_clip(cfg.seed)
    base, text = patcher.model, clip.cond_stage_model.clip_l
    text.requires_grad_(True)  # ComfyUI freezes text models on load
    modules = torch.nn.ModuleDict({"unet": base.diffusion_model, "text": text})
    if "model" in state:
        modules.load_state_dict(state["model"])
    ema = copy.deepcopy(modules).requires_grad_(False)
    if "ema" in state:
        ema.load_state_dict(state["ema"])
    base.to(device)
    text.to(device)
    ema.to(device)
    opt = torch.optim.AdamW([{"params": list(base.diffusion_model.parameters()), "lr_scale": 1.0},
                             {"params": list(text.parameters()), "lr_scale": cfg.text_lr_scale}],
                            cfg.lr, weight_decay=0.01)
    rewarm_from = state.get("rewarm_from")
    if "opt" in state:
        opt.load_state_dict(state["opt"])
        for group, scale in zip(opt.param_groups, (1.0, cfg.text_lr_scale)):
            group["lr_scale"] = scale  # a resumed run may change it
    elif state["step"] > 0:
        rewarm_from = state["step"]
    loop = _UnetLoop(cfg, data, base, text, CaptionTokens(clip), modules, ema, opt, path, rewarm_from,
                     patcher if cfg.supervision_weight > 0 else None)
    with clip_layers_out_of_place(text):
        step = loop.run(state["step"], should_stop)
    modules.load_state_dict(ema.state_dict())
    base.to("cpu")
    text.to("cpu")
    return patcher, clip, step


class _UnetLoop:
    """The UNet stage's steps: denoising loss (Min-SNR), optional attention supervision, EMA."""

    def __init__(self, cfg, data, base, text, tokens, modules, ema, opt, path, rewarm_from, patcher):
        self.cfg, self.data, self.base, self.text, self.tokens = cfg, data, base, text, tokens
        self.modules, self.ema, self.opt, self.path, self.rewarm_from = modules, ema, opt, path, rewarm_from
        self.device = next(modules.parameters()).device
        self.options: dict = {}
        self.store = None
        if patcher is not None:
            self.options, self.store = sup.recording_options(patcher, cfg.supervision())
            self.positions = sup.WordPositions(lambda word: phrase_ids(tokens.clip, word))
            self.objects: dict[int, list] = {}

    def run(self, step: int, should_stop: Callable[[], bool]) -> int:
        """Train until ``cfg.steps`` or ``should_stop``; checkpoints on the way and at the end."""
        cfg = self.cfg
        started, losses, first_step = time.monotonic(), [], step
        while step < cfg.steps and not should_stop():
            denoise, attention = self.losses(step)
            loss = denoise + cfg.supervision_weight * attention
            for group in self.opt.param_groups:
                group["lr"] = lr_at(cfg, step, self.rewarm_from) * group.get("lr_scale", 1.0)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.modules.parameters(), 1.0)
            self.opt.step()
            with torch.no_grad():
                decay = min(cfg.ema_decay, (1 + step) / (10 + step))
                for e, p in zip(self.ema.parameters(), self.modules.parameters()):
                    e.lerp_(p, 1 - decay)
            step += 1
            losses.append(torch.stack([denoise.detach(), attention.detach()]))  # no .item(): it would wait for a GPU
            if step % 50 == 0:
                rate = len(losses) / (time.monotonic() - started)
                mean = torch.stack(losses[-50:]).mean(0).tolist()
                log.info("unet step %d/%d loss %.4f attention %.4f (%.2f steps/s)", step, cfg.steps, mean[0],
                         mean[1], rate)
            if step % cfg.checkpoint_every == 0:
                _save_unet(self.path, self.modules, self.ema, self.opt, step, self.rewarm_from)
        if step != first_step:  # finished or stopped: keep every step done
            _save_unet(self.path, self.modules, self.ema, self.opt, step, self.rewarm_from)
        return step

    def losses(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Denoising loss and (unweighted) attention-supervision term of one seeded batch."""
        cfg, base, device = self.cfg, self.base, self.device
        latents = self.data["latents"]
        rng = np.random.default_rng([cfg.seed, 3, step])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        idx = rng.integers(0, len(latents), cfg.batch)
        x0 = latents[torch.from_numpy(idx)].to(device)
        captions = _captions(self.data, idx, rng, cfg.empty_caption_rate, cfg.hidden_hint_rate,
                             np.random.default_rng([cfg.seed, 6, step]))
        streams = [self.tokens(c) for c in captions]
        cond, _ = self.text(streams)
        sigmas = base.model_sampling.sigmas
        index = torch.randint(0, len(sigmas), (cfg.batch,), generator=gen)
        sigma = sigmas[index].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        xt = base.model_sampling.noise_scaling(sigma, noise, x0)
        if self.store is not None:
            active = (index <= cfg.supervision_max_t * (len(sigmas) - 1)) & torch.tensor([bool(c) for c in captions])
            objects = [self._objects(int(i)) for i in idx]
            targets = sup.word_targets(streams, objects, self.data["masks"][torch.from_numpy(idx)], active,
                                       self.positions, cfg.supervision().roles)
            self.store.set_tokens(targets.token_index.to(device))
            self.store.clear()
        out = base.apply_model(xt, sigma, c_crossattn=cond, transformer_options=dict(self.options))
        eps = (xt - out) / sigma.view(-1, 1, 1, 1)
        denoise = (_snr_weight(sigma, cfg.snr_gamma) * ((eps - noise) ** 2).mean((1, 2, 3))).mean()
        if self.store is None:
            return denoise, torch.zeros((), device=device)
        return denoise, sup.supervision_loss(self.store, targets).to(device)

    def _objects(self, i: int) -> list:
        if i not in self.objects:
            self.objects[i] = sup.objects_of(self.data["objects"][i])
        return self.objects[i]


def _save_unet(path: Path, modules, ema, opt, step: int, rewarm_from: Optional[int]) -> None:
    state = {"model": modules.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step}
    if rewarm_from is not None:
        state["rewarm_from"] = rewarm_from
    _atomic_save(state, path)


def seed_from_weights(cfg: PretrainConfig, weights_dir: Path) -> bool:
    """Start an empty work directory from exported weights; False when it already holds a UNet stage.

    VAE and decoder stages count as done with the weights' TAESD. A narrower UNet (the first base
    model's) is widened to ``toy.MODEL_CHANNELS`` (``widen``: the same predictions) and starts at step
    0; weights of this width (a slim copy: ``export_weights`` of a run) go on from the step their card
    names. Either way with the weights' text model and a fresh, re-warmed optimizer.
    """
    from safetensors.torch import load_file

    if (cfg.work_dir / "unet.pt").is_file():
        return False
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    vae = {k: v.float() for k, v in load_file(str(weights_dir / toy.VAE_FILE)).items()}
    total = cfg.vae_steps + cfg.vae_full_steps
    _atomic_save({"model": vae, "step": total, "scaled_at": total}, cfg.work_dir / "vae.pt")
    decoder = {k[len("taesd_decoder."):]: v for k, v in vae.items() if k.startswith("taesd_decoder.")}
    _atomic_save({"decoder": decoder, "step": cfg.decoder_steps}, cfg.work_dir / "decoder.pt")
    unet = {k: v.float() for k, v in load_file(str(weights_dir / toy.UNET_FILE)).items()}
    step = 0
    if toy.width_of(unet) != toy.MODEL_CHANNELS:
        shapes = {k: v.shape for k, v in fresh.random_model(cfg.seed).model.diffusion_model.state_dict().items()}
        unet = widen.widen_state_dict(unet, shapes)
    else:  # weights of this very pretraining (a slim copy): go on from their step with a re-warmed optimizer
        step = int(weights_card(weights_dir / toy.UNET_FILE).get("unet_steps_done", 0))
    text = toy.build_clip(load_file(str(weights_dir / toy.CLIP_FILE))).cond_stage_model.clip_l.state_dict()
    model = {**{f"unet.{k}": v for k, v in unet.items()}, **{f"text.{k}": v.float() for k, v in text.items()}}
    _atomic_save({"model": model, "step": step}, cfg.work_dir / "unet.pt")
    log.info("work directory %s starts from %s at UNet step %d (width %d)", cfg.work_dir, weights_dir, step,
             toy.MODEL_CHANNELS)
    return True


def unet_steps_done(work_dir: Path) -> int:
    """Steps the work directory's UNet stage has done (0 before it starts)."""
    state = _load(work_dir / "unet.pt")
    return int(state["step"]) if state else 0


def weights_card(path: Path) -> dict:
    """The JSON card ``export_weights`` writes into a weight file's metadata ({} if none)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("toy_world", "{}"))


def slim_checkpoint(work_dir: Path, out_dir: Path) -> None:
    """Copy ``work_dir`` without optimizer states or cached latents (to move it between machines).

    The UNet restarts from its EMA weights; ``train_unet`` then re-warms a fresh optimizer.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    vae, decoder, unet = (_load(work_dir / name) for name in ("vae.pt", "decoder.pt", "unet.pt"))
    if vae is None or decoder is None or unet is None:
        raise FileNotFoundError(f"{work_dir} lacks a finished VAE, decoder or UNet checkpoint")
    _atomic_save({k: v for k, v in vae.items() if k != "opt"}, out_dir / "vae.pt")
    _atomic_save({k: v for k, v in decoder.items() if k != "opt"}, out_dir / "decoder.pt")
    _atomic_save({"model": unet["ema"], "step": unet["step"]}, out_dir / "unet.pt")


def export_weights(patcher: Any, clip: Any, taesd: torch.nn.Module, out_dir: Path, info: dict) -> None:
    """Write fp16 safetensors of UNet, CLIP text model and TAESD (atomically) plus a JSON card."""
    from concept_attention.concepts.safe_files import atomic_write_safetensors

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"toy_world": json.dumps(info)}
    parts = {toy.UNET_FILE: patcher.model.diffusion_model.state_dict(),
             toy.CLIP_FILE: clip.cond_stage_model.clip_l.state_dict(),
             toy.VAE_FILE: taesd.state_dict()}
    for name, sd in parts.items():
        tensors = {k: v.detach().to(torch.float16 if v.is_floating_point() and v.ndim else v.dtype).contiguous()
                   for k, v in sd.items()}
        atomic_write_safetensors(out_dir / name, tensors, meta)
