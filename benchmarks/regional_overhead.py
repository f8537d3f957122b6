"""Sampling time of KSampler with Concepts (regional) against the stock ComfyUI path, one process.

Variants, each a clone of one model sampled with the same seed, steps and sampler (the auto ones
through KSampler's own path, as the node runs them; the others through ``comfy.sample.sample``):

  stock       no patches
  combined    two concept sets' K/V deltas as ordinary weight patches (what Apply Concepts does)
  regional    the same two sets, each only inside its half of the image (RegionalKV on every
              cross-attention layer; each query is attended once with hard masks)
  regional+texts  the same, each region reading its own text in the positive rows (the node's
              default ``region_texts``: the prompt without the other set's concept)
  auto        'regional_auto' without restart: the first 30 % of the steps with both sets
              everywhere while two class words' maps are recorded, the rest regional with texts
  auto+restart    the node's default 'regional_auto': the same first steps find the regions,
              then every step is sampled again with them (expected: about 1.3x regional+texts)

Concept sets are random K/V deltas of the model's real shapes (timing does not depend on their
values). Run from the repository root:

  .venv/bin/python benchmarks/regional_overhead.py                # tiny SD1.5, 512 px
  .venv/bin/python benchmarks/regional_overhead.py --full-size    # random-weight full SD1.5
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dev"))

import torch  # noqa: E402

from devkit import bench  # noqa: E402

PROMPT, NEGATIVE = "a photo of a cat and a dog", ""
TARGETS = {"regional": 1.30, "regional+texts": 1.30}  # issue target, full-size SD1.5
AUTO_FRACTION, REGION_THRESHOLD = 0.3, 0.4  # the node's defaults
CLASS_POSITIONS = [[5], [8]]  # 'cat' and 'dog' in PROMPT


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="random-weight full SD1.5 UNet")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latent = /8)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (3 tiny, 2 full size)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (5 tiny, 3 full size)")
    parser.add_argument("--cfg", type=float, default=7.0)
    bench.add_machine_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.full_size else 3)
    args.rounds = args.rounds or (3 if args.full_size else 5)
    return args


def random_deltas(model, seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """One concept set's worth of K/V deltas, shaped like the model's attn2 projections."""
    from concept_attention.concepts.concept_set import kv_weight_shapes

    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(shape, generator=g) for k, shape in kv_weight_shapes(model).items()}


def concept_set(model: Any, deltas: dict[str, torch.Tensor], trigger: str) -> Any:
    """A ConceptSet around random deltas (what sample_auto_regional takes)."""
    from concept_attention.concepts.concept_set import Concept, ConceptSet, architecture_fingerprint

    return ConceptSet([Concept(trigger, "thing", {})], deltas, architecture_fingerprint(model))


def auto_sampler(model: Any, sets: list, texts: list[torch.Tensor], positive: Any, negative: Any,
                 args: argparse.Namespace, restart: bool) -> Callable[[], torch.Tensor]:
    """One 'regional_auto' sampling as KSampler with Concepts runs it."""
    from concept_attention.sampling.ksampler import run_ksampler
    from concept_attention.sampling.auto_regions import sample_auto_regional

    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
    sampling = dict(seed=args.seed, cfg=args.cfg, sampler_name="euler", scheduler="normal",
                    positive=positive, negative=negative, denoise=1.0)
    return lambda: sample_auto_regional(run_ksampler, model, sets, 1.0, CLASS_POSITIONS, args.steps,
                                        AUTO_FRACTION, REGION_THRESHOLD, latent, texts=texts, restart=restart,
                                        **sampling)[0]["samples"]


def regional_variants(model: Any, texts: list[torch.Tensor], positive: Any, negative: Any,
                      args: argparse.Namespace, sampler: Callable[[Any], Callable[[], Any]]) -> list[Any]:
    """combined, regional, regional+texts, auto and auto+restart on clones of ``model``, with two
    random concept sets in the two halves of the image (``args``: size, steps, cfg, seed)."""
    from concept_attention.attention.patching import install_regional

    latent = args.size // 8
    sets = [random_deltas(model, args.seed + i) for i in (1, 2)]
    combined = model.clone()
    for deltas in sets:
        combined.add_patches({k: ("diff", (d,)) for k, d in deltas.items()}, 1.0)
    regional = model.clone()
    masks = torch.zeros(2, latent, latent)
    masks[0, :, : latent // 2], masks[1, :, latent // 2:] = 1, 1
    install_regional(regional, sets, masks)
    with_texts = model.clone()
    install_regional(with_texts, sets, masks, texts)
    concept_sets = [concept_set(model, deltas, f"V{i + 1}") for i, deltas in enumerate(sets)]
    return [bench.Variant("combined", sampler(combined)),
            bench.Variant("regional", sampler(regional)),
            bench.Variant("regional+texts", sampler(with_texts)),
            bench.Variant("auto", auto_sampler(model, concept_sets, texts, positive, negative, args, False)),
            bench.Variant("auto+restart", auto_sampler(model, concept_sets, texts, positive, negative, args, True))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bench.start_benchmark(args)
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)  # the auto variants sample through KSampler's own path

    started = time.perf_counter()
    if args.full_size:
        label = "full-size SD1.5 (random weights)"
        model = bench.build_full_sd15(args.seed)
        positive, negative = bench.random_conds(args.seed + 10), bench.random_conds(args.seed + 11)
        texts = [bench.random_conds(args.seed + 12 + i)[0][0] for i in range(2)]
    else:
        label = "tiny sd15 fixture"
        model, clip = bench.build_tiny("sd15", args.seed)
        positive, negative = bench.encode(clip, PROMPT), bench.encode(clip, NEGATIVE)
        texts = [bench.encode(clip, text)[0][0] for text in ("a photo of a cat", "a photo of a dog")]
    latent = args.size // 8
    print(f"model: {label}, built in {time.perf_counter() - started:.1f}s")
    print(f"machine: {bench.machine_info(device)}; {bench.load_average()}")

    def sampler(patched):
        return lambda: bench.sample(patched, positive, negative, latent, args.steps, args.cfg, args.seed)

    variants = [bench.Variant("stock", sampler(model.clone()))]
    variants += regional_variants(model, texts, positive, negative, args, sampler)
    for v in variants:  # warm-up, untimed (on a GPU it also measures each variant's peak memory)
        if device == "cuda":
            v.last_output, v.peak_mib = bench.run_measuring_peak(v, device)
        else:
            v.last_output = v.run()
    loads = bench.run_interleaved(variants, args.rounds, device)
    print()
    print(f"{label}, {args.size} px, {args.steps} steps, cfg {args.cfg}, {device}, "
          f"{bench.attention_name()}, median of {args.rounds} rounds; {bench.load_average()}:")
    print(bench.format_table(variants, "stock", TARGETS if args.full_size else None,
                             show_peak=device == "cuda"))
    print(bench.footer(variants, loads, device, started, TARGETS if args.full_size else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
