"""Train the tiny models a few steps in several configurations and keep every result tensor.

Also samples the tiny SD1.5 model with every hook kind (map recorder, regional with and without
region texts and a sigma window, nested attention with two subjects and a region, automatic
regions with restart) and keeps the latents and recorded maps. A change that must not alter CPU
results (a speed-up, a refactor) is checked by running this before and after it and comparing
the two files bit for bit:

  git stash; .venv/bin/python scripts/training_fingerprint.py /tmp/before.safetensors; git stash pop
  .venv/bin/python scripts/training_fingerprint.py /tmp/after.safetensors
  .venv/bin/python scripts/training_fingerprint.py --compare /tmp/before.safetensors /tmp/after.safetensors

Each configuration trains with one CPU thread (deterministic) and stores its K/V deltas, token
vectors, token banks, last calibrated maps and loss history. About a minute on one free core.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dev"))

import torch  # noqa: E402

SIZE = 64
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (architecture, TrainSettings overrides)
    "sd15_recipe": ("sd15", dict(steps=3, micro_batch=2, grad_accumulation=2)),
    "sd15_masks_frozen_text": ("sd15", dict(steps=2, micro_batch=2, grad_accumulation=2,
                                            train_embeddings=False, masks=True)),
    "sd15_token_bank": ("sd15", dict(steps=2, micro_batch=2, grad_accumulation=1, token_bank=2)),
    "sd15_custom_diffusion": ("sd15", dict(steps=2, micro_batch=1, grad_accumulation=2,
                                           calibration=False)),
    "sdxl_recipe": ("sdxl", dict(steps=2, micro_batch=1, grad_accumulation=2)),
}


def picture_and_masks() -> tuple[torch.Tensor, torch.Tensor]:
    """Two coloured squares on grey, and a mask for each."""
    image = torch.full((1, SIZE, SIZE, 3), 0.5)
    image[0, 8:30, 6:28] = torch.tensor([0.9, 0.1, 0.1])
    image[0, 36:58, 34:58] = torch.tensor([0.1, 0.2, 0.9])
    masks = torch.zeros(2, SIZE, SIZE)
    masks[0, 8:30, 6:28] = 1
    masks[1, 36:58, 34:58] = 1
    return image, masks


def run_all() -> dict[str, torch.Tensor]:
    """Every configuration's result tensors, flat, under ``name/...`` keys."""
    from devkit.comfy_env import start

    start("cpu")
    torch.set_num_threads(1)
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)
    from concept_attention.attention.calibration import CalibrationSettings
    from concept_attention.concepts.specs import ConceptSpec
    from concept_attention.training.loop import train_concepts
    from concept_attention.training.settings import TrainSettings
    from devkit import tiny_models

    image, masks = picture_and_masks()
    specs = [ConceptSpec("V1", "cat"), ConceptSpec("V2", "dog")]
    out: dict[str, torch.Tensor] = {}
    bundles: dict[str, Any] = {}
    for name, (arch, overrides) in CONFIGS.items():
        overrides = dict(overrides)
        use_masks = overrides.pop("masks", False)
        calibrated = overrides.pop("calibration", True)
        settings = TrainSettings(resolution=SIZE, learning_rate=1e-2, pool_size=4, seed=3,
                                 calibration=CalibrationSettings(use_bind=calibrated,
                                                                 use_separation=calibrated),
                                 **overrides)
        bundle = bundles.setdefault(arch, tiny_models.build_bundle(arch, seed=0))
        result = train_concepts(bundle.model, bundle.clip, bundle.vae, image, specs, settings,
                                masks=masks if use_masks else None)
        for key, delta in result.concepts.kv_deltas.items():
            out[f"{name}/kv/{key}"] = delta
        for concept in result.concepts.concepts:
            for key, vector in concept.embeddings.items():
                out[f"{name}/emb/{concept.trigger}/{key}"] = vector
            if concept.bank is not None:
                out[f"{name}/bank/{concept.trigger}"] = concept.bank
        if result.maps is not None:
            out[f"{name}/maps"] = result.maps
        terms = sorted({k for row in result.history for k in row})
        out[f"{name}/history"] = torch.tensor([[row.get(k, float("nan")) for k in terms]
                                               for row in result.history], dtype=torch.float64)
        print(f"{name}: {result.stopped}, {len(result.history)} steps, last loss "
              f"{result.history[-1]['loss']:.6f}")
    out.update(sample_all(bundles["sd15"]))
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def sample_all(bundle: Any) -> dict[str, torch.Tensor]:
    """Latents (and maps) of sampling with each hook kind installed, under ``sampling/...`` keys."""
    from concept_attention.attention.nested_hook import NestedSource
    from concept_attention.attention.patching import install_hook, install_nested, install_regional
    from concept_attention.attention.recorder import AttentionRecorder, MapStore
    from concept_attention.concepts.concept_set import (Concept, ConceptSet, architecture_fingerprint,
                                                        kv_weight_shapes)
    from concept_attention.sampling.auto_regions import sample_auto_regional
    from concept_attention.sampling.ksampler import run_ksampler
    from concept_attention.sampling.nested_subjects import encode_prompt

    prompt, latent_size, steps = "a photo of a cat and a dog", SIZE // 8, 3
    positive, features = encode_prompt(bundle.clip, prompt)
    negative, _ = encode_prompt(bundle.clip, "")
    texts = [encode_prompt(bundle.clip, t)[1][None] for t in ("a photo of a cat", "a photo of a dog")]

    def sample(model: Any) -> torch.Tensor:
        latent = {"samples": torch.zeros(1, 4, latent_size, latent_size)}
        return run_ksampler(model, 0, steps, 5.0, "euler", "normal", positive, negative, latent)["samples"]

    generator = torch.Generator().manual_seed(11)
    sets = [{k: 0.05 * torch.randn(shape, generator=generator)
             for k, shape in kv_weight_shapes(bundle.model).items()} for _ in range(2)]
    masks = torch.zeros(2, latent_size, latent_size)
    masks[0, :, : latent_size // 2], masks[1, :, latent_size // 2:] = 1, 1
    out: dict[str, torch.Tensor] = {"sampling/stock": sample(bundle.model.clone())}

    recorded = bundle.model.clone()
    store = MapStore()
    store.set_words([[5], [8]])
    install_hook(recorded, AttentionRecorder(store=store, rows="all"), "all")
    out["sampling/recorder"] = sample(recorded)
    out["sampling/recorder_maps"] = store.word_maps()
    out["sampling/recorder_sigmas"] = torch.tensor(store.sigmas, dtype=torch.float64)

    for name, region_texts in (("regional", None), ("regional_texts", texts)):
        regional = bundle.model.clone()
        install_regional(regional, sets, masks, region_texts)
        out[f"sampling/{name}"] = sample(regional)
    soft = masks.clone()
    soft[:, :, latent_size // 2 - 1: latent_size // 2 + 1] = 0.5
    regional = bundle.model.clone()
    install_regional(regional, sets, soft, texts)
    out["sampling/regional_soft"] = sample(regional)

    region = torch.zeros(latent_size, latent_size)
    region[:, : latent_size // 2] = 1
    subjects = [NestedSource(name=word, position=pos, signature=features[pos].clone(),
                             bank=torch.randn(4, features.shape[-1], generator=generator),
                             region=region if word == "dog" else None,
                             sigma_max=1e9 if word == "cat" else 5.0)
                for word, pos in (("cat", 5), ("dog", 8))]
    nested = bundle.model.clone()
    install_nested(nested, subjects, "all", exclusive=True)
    out["sampling/nested"] = sample(nested)

    concept_sets = [ConceptSet([Concept(f"V{i}", "thing", {})], deltas, architecture_fingerprint(bundle.model))
                    for i, deltas in enumerate(sets, 1)]
    latent = {"samples": torch.zeros(1, 4, latent_size, latent_size)}
    auto, auto_masks = sample_auto_regional(
        run_ksampler, bundle.model, concept_sets, 1.0, [[5], [8]], 4, 0.3, 0.4, latent,
        texts=texts, restart=True, seed=0, cfg=5.0, sampler_name="euler",
        scheduler="normal", positive=positive, negative=negative, denoise=1.0)
    out["sampling/auto_restart"] = auto["samples"]
    out["sampling/auto_masks"] = auto_masks
    return out


def compare(first: Path, second: Path) -> int:
    """Print which tensors differ between two fingerprint files; 0 when all are bit-identical."""
    from safetensors.torch import load_file

    a, b = load_file(str(first)), load_file(str(second))
    if a.keys() != b.keys():
        print(f"different keys: only in {first}: {sorted(a.keys() - b.keys())[:5]}, "
              f"only in {second}: {sorted(b.keys() - a.keys())[:5]}")
        return 1
    different = [k for k in sorted(a) if not torch.equal(a[k], b[k])]
    for key in different[:20]:
        gap = (a[key].double() - b[key].double()).abs().max().item()
        print(f"DIFFERS {key}: max |difference| {gap:.3g}")
    print(f"{len(a) - len(different)} of {len(a)} tensors bit-identical")
    return 1 if different else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", nargs="?", type=Path, help="safetensors file to write")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"),
                        help="compare two files written before")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if args.output is None:
        parser.error("give an output file or --compare A B")
    from safetensors.torch import save_file

    save_file(run_all(), str(args.output))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
