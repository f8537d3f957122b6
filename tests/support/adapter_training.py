"""Adapter-training helpers for tests: tiny frozen models and a DDP worker for torch.multiprocessing."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parents[1]
DEV_DIR = TESTS_DIR.parent / "dev"

# tiny adapter for the tiny SD1.5 model: out_dim = the text width, so projections start as to_k/to_v
TINY_ADAPTER = dict(dim=16, depth=1, heads=1, num_queries=4, out_dim=32)


def _setup() -> None:
    for folder in (TESTS_DIR, DEV_DIR):  # a spawned DDP worker starts with neither on sys.path
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    from devkit.comfy_env import start

    start("cpu")


def tiny_frozen(seed: int = 0) -> Any:
    """FrozenModels of the tiny SD1.5 bundle and the tiny CLIP vision."""
    _setup()
    from concept_attention.training.adapter_train import FrozenModels
    from devkit import tiny_models

    bundle = tiny_models.build_bundle("sd15", seed)
    return FrozenModels(bundle.model, bundle.clip, bundle.vae, tiny_models.build_clip_vision(seed))


def tiny_settings(**over: Any) -> Any:
    """Small, fast settings for the tiny models at 64 px."""
    _setup()
    from concept_attention.training.adapter_train import AdapterTrainSettings

    base = dict(steps=2, micro_batch=2, learning_rate=1e-3, resolution=64, seed=0, drop_text=0.2,
                drop_image=0.2, checkpoint_every=1, adapter=dict(TINY_ADAPTER))
    return AdapterTrainSettings(**{**base, **over})


DDP_SETTINGS = dict(optimizer="sgd", learning_rate=0.1)


def ddp_worker(rank: int, world: int, dataset: str, rendezvous: str, result: str) -> None:
    """One rank of a gloo DDP run: one SGD step with micro-batch 1; rank 0 saves weights and grads."""
    _setup()
    import safetensors.torch
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        from concept_attention.training.adapter_data import read_dataset
        from concept_attention.training.adapter_train import AdapterTrainer

        trainer = AdapterTrainer(tiny_frozen(), read_dataset(dataset), tiny_settings(micro_batch=1, **DDP_SETTINGS))
        trainer.train(1)
        if rank == 0:
            safetensors.torch.save_file(weights_and_grads(trainer), result)
    finally:
        dist.destroy_process_group()


def weights_and_grads(trainer: Any) -> dict:
    """Adapter weights (``w.``) and their last gradients (``g.``), detached copies."""
    out = {}
    for name, param in trainer.adapter.named_parameters():
        out[f"w.{name}"] = param.detach().clone()
        out[f"g.{name}"] = param.grad.detach().clone()
    return out
