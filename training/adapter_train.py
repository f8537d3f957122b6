"""Train a nested-attention image adapter (resampler + per-layer K/V projections) on a dataset.

Frozen: the UNet, the text encoder, the VAE and CLIP vision. Trained: the adapter only, with the
standard eps-MSE through the nested-attention hook (the subject word's value becomes the nested
read-out of the adapter's keys/values for the picture's crop), AdamW, random condition dropout.

Runs on one process or under ``torch.distributed`` (DistributedDataParallel). Every random draw of
a step (which pairs, timesteps, noise, dropout) is made for the whole *global* batch from
``(seed, step)`` and each rank takes its slice, so N ranks with micro-batch b train exactly like one
process with micro-batch N*b, and a run resumed from a checkpoint continues exactly as an
uninterrupted one. Checkpoints are one safetensors file (adapter, optimizer tensors, and the
JSON state in its metadata) plus a readable JSON copy of that state, both written atomically.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ..attention.nested_hook import NestedSource
from ..attention.patching import install_nested, model_layers
from .adapter_data import AdapterRecord, load_picture
from ..concepts.safe_files import atomic_write_safetensors, atomic_write_text
from ..sampling.nested_adapter import AdapterConfig, NestedAdapter, config_for_layers, save_adapter
from ..sampling.nested_subjects import subject_position

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "concept_attention.adapter_checkpoint"


@dataclass
class AdapterTrainSettings:
    """Knobs of an adapter training run (IP-Adapter's recipe scaled to the data)."""

    steps: int = 1000
    micro_batch: int = 4  # rows per process; the global batch is micro_batch * world size
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    optimizer: str = "adamw"  # or "sgd"
    resolution: int = 512
    seed: int = 0
    drop_text: float = 0.05  # caption -> "" (then the subject slot is gone as well)
    drop_image: float = 0.05  # caption kept, nested update off for the row
    init_from_model: bool = True  # per-layer projections start as the layer's to_k/to_v
    checkpoint_every: int = 100
    adapter: dict[str, int] = field(default_factory=lambda: dict(dim=768, depth=4, heads=12,
                                                                 num_queries=16, out_dim=768))


@dataclass(frozen=True)
class FrozenModels:
    """The frozen ComfyUI objects: MODEL (ModelPatcher), CLIP, VAE and CLIP_VISION."""

    model: Any
    clip: Any
    vae: Any
    clip_vision: Any


@dataclass(frozen=True, eq=False)
class _LiveSource(NestedSource):
    """A nested source whose rows and per-row keys/values are set anew for every training batch."""

    live: dict = field(default_factory=dict)

    def rows_index(self, context: torch.Tensor, sigma: float | None = None,
                   memo: dict | None = None) -> torch.Tensor:
        return self.live["index"].to(context.device)


class _LiveKV(Mapping):
    def __init__(self, live: dict):
        self.live = live

    def __getitem__(self, key):
        return self.live["kv"][key]

    def __iter__(self) -> Iterator:
        return iter(self.live["kv"])

    def __len__(self) -> int:
        return len(self.live["kv"])


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class AdapterTrainer:
    """One training run: build it, optionally :meth:`resume`, then :meth:`train`."""

    def __init__(self, frozen: FrozenModels, records: list[AdapterRecord], settings: AdapterTrainSettings,
                 output_dir: str | os.PathLike[str] | None = None):
        if not records:
            raise ValueError("no training pairs")
        self.frozen, self.records, self.settings = frozen, records, settings
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.rank, self.world = _world()
        self.step = 0
        self.history: list[float] = []
        self.model = frozen.model.clone()
        base = self.model.model
        base.diffusion_model.requires_grad_(False)
        self.device = next(base.diffusion_model.parameters()).device
        self.layers = model_layers(self.model)
        self._latents: dict[Path, torch.Tensor] = {}
        self._tokens: dict[Path, torch.Tensor] = {}
        self._text: dict[str, tuple[torch.Tensor, torch.Tensor | None, int]] = {}
        embed_dim = self._encode_reference(records[0]).shape[-1]
        torch.manual_seed(settings.seed)  # identical initial weights on every rank
        self.config: AdapterConfig = config_for_layers(self.layers, embed_dim, **settings.adapter)
        self.adapter = NestedAdapter(self.config).to(self.device)
        if settings.init_from_model:
            copied = self.adapter.init_from_model(base.diffusion_model, self.layers)
            log.info("initialised %d of %d projections from the layers' to_k/to_v", copied, 2 * len(self.layers))
        self.ordered = self.adapter.match(self.layers)
        self.module: torch.nn.Module = self.adapter
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.module = DistributedDataParallel(
                self.adapter, device_ids=[self.device] if self.device.type == "cuda" else None)
        if settings.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {settings.optimizer!r}")
        if settings.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                self.adapter.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=settings.learning_rate,
                                               weight_decay=settings.weight_decay)
        self.live: dict = {"index": torch.full((settings.micro_batch,), -1), "kv": {}}
        source = _LiveSource(name="adapter-subject", layer_kv=_LiveKV(self.live), live=self.live)
        install_nested(self.model, [source], "all")
        import comfy.model_management as mm

        mm.load_models_gpu([self.model], force_full_load=True)
        frozen.clip.load_model()

    # ----- frozen encoders (cached) ---------------------------------------------------------
    def _encode_reference(self, record: AdapterRecord) -> torch.Tensor:
        if record.reference not in self._tokens:
            with torch.no_grad():
                out = self.frozen.clip_vision.encode_image(load_picture(record.reference)[None], crop=True)
            self._tokens[record.reference] = out.penultimate_hidden_states.float().cpu()
        return self._tokens[record.reference]

    def _latent(self, record: AdapterRecord) -> torch.Tensor:
        if record.image not in self._latents:
            pixels = load_picture(record.image, self.settings.resolution)[None]
            with torch.no_grad():
                latent = self.frozen.vae.encode(pixels)
            self._latents[record.image] = self.model.model.process_latent_in(latent.float()).cpu()
        return self._latents[record.image]

    def _text_features(self, caption: str, subject: str) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        key = f"{subject}\x00{caption}"
        if key not in self._text:
            clip = self.frozen.clip
            with torch.no_grad():
                cond, pooled = clip.cond_stage_model.encode_token_weights(clip.tokenize(caption))[:2]
            position = subject_position(clip, caption, subject) if caption else -1
            self._text[key] = (cond.float().cpu(), None if pooled is None else pooled.float().cpu(), position)
        return self._text[key]

    # ----- one step -------------------------------------------------------------------------
    def _draws(self, step: int) -> dict[str, Any]:
        """Every random choice of ``step`` for the global batch (identical on all ranks)."""
        s, n = self.settings, self.settings.micro_batch * self.world
        g = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
        first = step * n
        rows = []
        for i in range(first, first + n):
            epoch, offset = divmod(i, len(self.records))
            order = torch.randperm(len(self.records), generator=torch.Generator().manual_seed(s.seed + 7919 * epoch))
            rows.append(int(order[offset]))
        sigmas = self.model.model.model_sampling.sigmas
        latent_shape = self._latent(self.records[0]).shape[1:]
        return {"rows": rows, "t": torch.randint(0, len(sigmas), (n,), generator=g),
                "noise": torch.randn((n, *latent_shape), generator=g),
                "drop": torch.rand(n, 2, generator=g)}

    def _extra_conds(self, pooled: list[torch.Tensor | None]) -> dict[str, torch.Tensor]:
        base = self.model.model
        if getattr(base, "adm_channels", 0) == 0:
            return {}
        size = self.settings.resolution
        return {"y": torch.cat([base.encode_adm(pooled_output=p, width=size, height=size, target_width=size,
                                                target_height=size, device=self.device) for p in pooled])}

    def loss(self, step: int) -> torch.Tensor:
        """This rank's eps-MSE of ``step`` (mean over its rows)."""
        s, draws = self.settings, self._draws(step)
        mine = slice(self.rank * s.micro_batch, (self.rank + 1) * s.micro_batch)
        records = [self.records[i] for i in draws["rows"][mine]]
        drop = draws["drop"][mine]
        conds, pooled, index = [], [], []
        for record, (text_p, image_p) in zip(records, drop.tolist()):
            caption = "" if text_p < s.drop_text else record.caption
            cond, pool, position = self._text_features(caption, record.subject)
            conds.append(cond)
            pooled.append(pool)
            index.append(-1 if image_p < s.drop_image else position)
        x0 = torch.cat([self._latent(r) for r in records]).to(self.device)
        sigma = self.model.model.model_sampling.sigmas[draws["t"][mine]].to(self.device)
        noise = draws["noise"][mine].to(self.device)
        xt = self.model.model.model_sampling.noise_scaling(sigma, noise, x0)
        tokens = torch.cat([self._encode_reference(r) for r in records]).to(self.device)
        kv = self.module(tokens)
        self.live["kv"] = {layer.key: pair for layer, pair in zip(self.ordered, kv)}
        self.live["index"] = torch.tensor(index, dtype=torch.long)
        options = dict(self.model.model_options["transformer_options"])
        denoised = self.model.model.apply_model(xt, sigma, c_crossattn=torch.cat(conds).to(self.device),
                                                transformer_options=options, **self._extra_conds(pooled))
        eps = (xt - denoised.float()) / sigma.view(-1, 1, 1, 1)
        self.live["kv"] = {}
        # Zero-weighted: keeps every adapter weight in the graph when all rows of this rank were
        # dropped, so backward works and DDP's gradient all-reduce sees every parameter.
        anchor = sum(t.sum() for pair in kv for t in pair)
        return ((eps - noise) ** 2).mean() + 0.0 * anchor

    def train_step(self) -> float:
        """One optimizer step over the global batch; returns this rank's loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.step)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        self.history.append(float(loss.detach()))
        return self.history[-1]

    def train(self, steps: int | None = None) -> list[float]:
        """Train up to ``steps`` (default: the settings' total), checkpointing on the way."""
        until = self.settings.steps if steps is None else steps
        with torch.inference_mode(False), torch.enable_grad():
            while self.step < until:
                loss = self.train_step()
                if self.step % 10 == 0 or self.step == until:
                    log.info("step %d/%d  loss %.5f", self.step, until, loss)
                if self.output_dir is not None and (self.step % self.settings.checkpoint_every == 0
                                                    or self.step == until):
                    self.save_checkpoint()
        return self.history

    # ----- checkpoints ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The JSON part of a checkpoint."""
        optimizer = self.optimizer.state_dict()
        return {"format": CHECKPOINT_FORMAT, "step": self.step, "world_size": self.world,
                "settings": asdict(self.settings), "config": json.loads(self.config.to_json()),
                "param_groups": optimizer["param_groups"], "history": self.history}

    def save_checkpoint(self) -> None:
        """Write the checkpoint and the adapter file (rank 0 only), atomically."""
        if self.rank != 0 or self.output_dir is None:
            return
        tensors = {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}
        for index, entries in self.optimizer.state_dict()["state"].items():
            tensors.update({f"optimizer.{index}.{name}": value for name, value in entries.items()})
        state = json.dumps(self.state())
        atomic_write_safetensors(self.output_dir / CHECKPOINT, tensors, {"state": state})
        atomic_write_json(self.output_dir / "checkpoint.json", state)
        save_adapter(self.adapter, self.output_dir / "adapter.safetensors", {"step": str(self.step)})

    def resume(self, path: str | os.PathLike[str]) -> None:
        """Continue from a checkpoint file (or a folder holding one)."""
        from safetensors import safe_open

        path = Path(path)
        path = path / CHECKPOINT if path.is_dir() else path
        with safe_open(str(path), framework="pt") as handle:
            state = json.loads((handle.metadata() or {}).get("state", "{}"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not an adapter training checkpoint")
        if AdapterConfig.from_json(json.dumps(state["config"])) != self.config:
            raise ValueError(f"{path} was written for another adapter configuration or model")
        self.adapter.load_state_dict({k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")})
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                per_param.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
        self.step, self.history = int(state["step"]), list(state.get("history", []))
        log.info("resumed from %s at step %d", path, self.step)


def atomic_write_json(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, ``os.replace``; no temp left on failure)."""
    atomic_write_text(path, text)
