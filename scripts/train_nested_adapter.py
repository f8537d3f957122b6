"""Train a nested-attention image adapter; one process, or unchanged under torchrun with DDP.

    python scripts/train_nested_adapter.py --data pairs/ --out runs/a \\
        --checkpoint sd15.safetensors --clip-vision clip_vision_h.safetensors
    torchrun --nproc_per_node 4 scripts/train_nested_adapter.py ...   # same flags
    python scripts/train_nested_adapter.py --tiny --toy-data 16 --data /tmp/pairs --out /tmp/run

``--tiny`` uses the tiny random test models (tests/support/tiny_models.py) for demos and smoke
runs; ``--toy-data N`` first writes N toy-world crop->scene pairs into ``--data``. A run resumes
from ``--out``'s checkpoint when one exists (``--no-resume`` starts over). The adapter file
(``OUT/adapter.safetensors``) goes into ComfyUI's ``models/nested_adapters``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("train_nested_adapter")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder with captions.jsonl")
    p.add_argument("--out", required=True, help="output folder (checkpoints, adapter.safetensors)")
    p.add_argument("--checkpoint", help="ComfyUI checkpoint file (MODEL, CLIP, VAE)")
    p.add_argument("--clip-vision", help="ComfyUI CLIP vision file (ViT-H for IP-Adapter-Plus-like adapters)")
    p.add_argument("--tiny", action="store_true", help="tiny random models built in code (demos, tests)")
    p.add_argument("--toy-data", type=int, default=0, help="first write this many toy-world pairs to --data")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--micro-batch", type=int, default=4, help="rows per process")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drop-text", type=float, default=0.05)
    p.add_argument("--drop-image", type=float, default=0.05)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--adapter", default="{}", help='adapter sizes as JSON, e.g. \'{"num_queries": 64}\'')
    p.add_argument("--no-resume", action="store_true")
    return p.parse_args(argv)


def _import_pack() -> None:
    """Make the repository importable as ``concept_attention`` and ComfyUI importable."""
    sys.path.insert(0, str(REPO / "dev"))
    from devkit.comfy_env import start
    from devkit.pack import install_alias

    install_alias()
    if os.environ.get("COMFYUI_PATH") or not _has_comfy():
        start("cpu")


def _has_comfy() -> bool:
    try:
        import comfy  # noqa: F401
    except ImportError:
        return False
    return True


def _init_distributed() -> bool:
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def load_frozen(args: argparse.Namespace):
    """FrozenModels from ComfyUI files, or the tiny test models."""
    from concept_attention.training.adapter_train import FrozenModels

    if args.tiny:
        from devkit import tiny_models

        bundle = tiny_models.build_bundle("sd15", seed=args.seed)
        return FrozenModels(bundle.model, bundle.clip, bundle.vae, tiny_models.build_clip_vision(args.seed))
    if not args.checkpoint or not args.clip_vision:
        raise SystemExit("give --checkpoint and --clip-vision (or --tiny)")
    import comfy.clip_vision
    import comfy.sd

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True)[:3]
    return FrozenModels(model, clip, vae, comfy.clip_vision.load(args.clip_vision))


def main(argv: list[str] | None = None) -> int:
    """Train (or resume) and write ``OUT/adapter.safetensors``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _import_pack()
    distributed = _init_distributed()
    from smallworld_lab.adapter_dataset import write_smallworld_dataset
    from concept_attention.training.adapter_data import read_dataset
    from concept_attention.training.adapter_train import CHECKPOINT, AdapterTrainer, AdapterTrainSettings

    try:
        import torch.distributed as dist

        if args.toy_data:
            if not distributed or dist.get_rank() == 0:
                write_smallworld_dataset(args.data, args.toy_data, seed=args.seed, size=args.resolution)
            if distributed:
                dist.barrier()
        settings = AdapterTrainSettings(
            steps=args.steps, micro_batch=args.micro_batch, learning_rate=args.lr,
            resolution=args.resolution, seed=args.seed, drop_text=args.drop_text,
            drop_image=args.drop_image, checkpoint_every=args.checkpoint_every,
            adapter={**AdapterTrainSettings().adapter, **json.loads(args.adapter)})
        trainer = AdapterTrainer(load_frozen(args), read_dataset(args.data), settings, args.out)
        if not args.no_resume and (Path(args.out) / CHECKPOINT).is_file():
            trainer.resume(args.out)
        trainer.train()
        if trainer.rank == 0:
            log.info("adapter written to %s", Path(args.out) / "adapter.safetensors")
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
