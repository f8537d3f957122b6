"""Time and peak memory of one DisenDiff training step against the Custom Diffusion step.

Both variants run the pack's own training loop (``training/loop.py``) on clones of one model in
one process: "custom-diffusion" trains the same K/V deltas and embeddings with every attention
loss switched off (nothing is recorded), "disendiff" adds the recorder on the latent/4 layers and
the calibration losses (L_bind, L_s&s, Gaussian, suppression). Steps are interleaved; the table
gives medians and ratios to Custom Diffusion. Run from the repository root:

  .venv/bin/python benchmarks/train_step.py                # tiny SD1.5 at 512 px
  .venv/bin/python benchmarks/train_step.py --arch sdxl    # tiny SDXL
  .venv/bin/python benchmarks/train_step.py --full-size    # random-weight SD1.5 UNet + CLIP-L, 512 px
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dev"))

import torch  # noqa: E402

from devkit import bench  # noqa: E402

TARGETS = {"disendiff": 1.15}  # issue target for time at full size; memory target 1.10x


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-size", action="store_true",
                        help="random-weight full SD1.5 UNet and CLIP-L instead of the tiny model")
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15", help="tiny architecture")
    parser.add_argument("--resolution", type=int, default=512, help="training resolution in px")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per variant")
    bench.add_machine_arguments(parser)
    return parser.parse_args(argv)


def build_models(full_size: bool, arch: str) -> tuple[Any, Any, Any]:
    """MODEL, CLIP and a TAESD VAE (the VAE only encodes the pool, outside the timed steps)."""
    from devkit import tiny_models

    if full_size:
        import comfy.sd
        import comfy.supported_models

        model = bench.build_full_sd15()
        config = comfy.supported_models.SD15(dict(bench.SD15_FULL_UNET))
        clip = comfy.sd.CLIP(config.clip_target(), model_options={"dtype": torch.float32})
        tiny_models.seeded_init_(clip.cond_stage_model, torch.Generator().manual_seed(1))
    else:
        model, clip = bench.build_tiny(arch)
    return model, clip, tiny_models.build_vae()


def prepared_trainer(model: Any, clip: Any, vae: Any, calibrated: bool, resolution: int):
    """A ConceptTrainer set up up to its first step (parameters, hooks, loaded models, pool)."""
    from concept_attention.attention.calibration import CalibrationSettings
    from concept_attention.concepts.specs import ConceptSpec
    from concept_attention.training.loop import ConceptTrainer
    from concept_attention.training.settings import TrainSettings

    settings = TrainSettings(steps=1, micro_batch=1, grad_accumulation=1, resolution=resolution,
                             pool_size=2, calibration=CalibrationSettings(
                                 use_bind=calibrated, use_separation=calibrated))
    picture = torch.rand(1, resolution, resolution, 3, generator=torch.Generator().manual_seed(0))
    trainer = ConceptTrainer(model, clip, vae, picture,
                             [ConceptSpec("V1", "cat"), ConceptSpec("V2", "dog")], settings)
    pool, _, params, optimizer = trainer.prepare()
    return trainer, pool, params, optimizer


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = bench.start_benchmark(args)
    import comfy.model_management as mm

    from concept_attention.training.text_encoder import clip_layers_out_of_place

    rounds = args.rounds or (3 if args.full_size else 8)
    model, clip, vae = build_models(args.full_size, args.arch)
    what = "full-size SD1.5 (random weights)" if args.full_size else f"tiny {args.arch}"
    print(f"# DisenDiff vs Custom Diffusion training step: {what}, {args.resolution} px, batch 1")
    print(f"# {bench.machine_info(device)}")

    variants = []
    for name, calibrated in (("custom-diffusion", False), ("disendiff", True)):
        trainer, pool, params, optimizer = prepared_trainer(model, clip, vae, calibrated,
                                                            args.resolution)

        def step(trainer=trainer, pool=pool, params=params, optimizer=optimizer):
            # Each variant owns its clone: make sure its weight wrappers are the loaded ones.
            mm.load_models_gpu([trainer.model], force_full_load=True)
            with clip_layers_out_of_place(trainer.clip.cond_stage_model):
                return trainer.step(optimizer, params, pool, [])

        variants.append(bench.Variant(name, step))

    for variant in variants:  # warm-up, then peak memory of one step
        variant.run()
        _, variant.peak_mib = bench.run_measuring_peak(variant, device)
    loads = bench.run_interleaved(variants, rounds, device)
    print()
    print(bench.format_table(variants, "custom-diffusion", TARGETS))
    base, calibrated = variants
    if base.peak_mib and calibrated.peak_mib:
        print(f"\npeak memory ratio (step increase): {calibrated.peak_mib / base.peak_mib:.3f}x "
              "(target <= 1.10x at full size)")
    warning = bench.contention_warning(loads, device)
    if warning:
        print(f"\n{warning}")


if __name__ == "__main__":
    main()
