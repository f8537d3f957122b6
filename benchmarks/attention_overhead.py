"""Sampling-time overhead of the attention chain and the map recorder against stock ComfyUI.

In one process, the same ``comfy.sample.sample`` call (euler, normal schedule, cfg 7, batch 1)
is timed for four clones of one model:

  stock          no patches at all
  chain-idle     an ``AttentionChain`` on every cross-attention layer whose only hook is never
                 active (``AttentionHook(sigma_max=-1.0)``): the price of being installed
  recorder-l/4   ``AttentionRecorder`` + ``MapStore`` recording 2 token positions on the default
                 DisenDiff layers ``"latent/4"`` (16x16 at 512 px)
  recorder-all   the same recorder on every cross-attention layer

Variants are interleaved and their order rotated every round; the table gives the median per
variant and its ratio to stock. Run from the repository root:

  .venv/bin/python benchmarks/attention_overhead.py                 # tiny SD1.5, 512 px
  .venv/bin/python benchmarks/attention_overhead.py --arch sdxl     # tiny SDXL
  .venv/bin/python benchmarks/attention_overhead.py --full-size     # random-weight full SD1.5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dev"))

import torch  # noqa: E402

from devkit import bench  # noqa: E402

TOKENS = [5, 8]  # "cat" and "dog" in "a photo of a cat and a dog" (BOS is position 0)
PROMPT, NEGATIVE = "a photo of a cat and a dog", ""
TARGETS = {"chain-idle": 1.02, "recorder-l/4": 1.15}  # issue targets, full-size SD1.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true",
                        help="random-weight full SD1.5 UNet (860M params) with random [1,77,768] "
                             "conditioning instead of the tiny test model")
    parser.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15",
                        help="tiny fixture architecture (ignored with --full-size, which is SD1.5)")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latent = /8)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default 3 tiny, 2 full size)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds, each running every variant once (default 5 tiny, "
                             "3 full size)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed rounds first; the first also measures peak memory (default "
                             "1; 0 at full size on the CPU, where a one-step capture run warms up)")
    parser.add_argument("--call-reps", type=int, default=None,
                        help="repetitions of the per-call measurement on captured layer inputs "
                             "(default 30 tiny, 10 full size; 0 skips it)")
    parser.add_argument("--cfg", type=float, default=7.0)
    bench.add_machine_arguments(parser, attention=True)
    parser.add_argument("--dtype", choices=tuple(bench.DTYPES), default="fp32",
                        help="full-size UNet weight dtype (default fp32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = parser.parse_args(argv)
    if args.dtype != "fp32" and not args.full_size:
        parser.error("--dtype applies to --full-size only (the tiny fixtures are fp32)")
    if args.steps is None:
        args.steps = 2 if args.full_size else 3
    if args.rounds is None:
        args.rounds = 3 if args.full_size else 5
    if args.call_reps is None:
        args.call_reps = 10 if args.full_size else 30
    return args


def recorder_models(model: Any) -> tuple[dict[str, tuple[Any, Callable[[], None]]], dict[str, Any]]:
    """The patched clones (chain-idle, recorder-l/4, recorder-all), each with what resets it
    before a run, and the recorders' map stores."""
    from concept_attention.attention.chain import AttentionHook
    from concept_attention.attention.patching import install_hook
    from concept_attention.attention.recorder import AttentionRecorder, MapStore

    idle = model.clone()
    install_hook(idle, AttentionHook(sigma_max=-1.0), "all")
    models: dict[str, tuple[Any, Callable[[], None]]] = {"chain-idle": (idle, lambda: None)}
    stores = {}
    for name, selector in (("recorder-l/4", "latent/4"), ("recorder-all", "all")):
        patched = model.clone()
        store = MapStore()
        store.set_tokens(TOKENS)
        install_hook(patched, AttentionRecorder(store=store), selector)
        models[name] = (patched, store.clear)
        stores[name] = store
    return models, stores


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bench.start_benchmark(args)
    torch.manual_seed(args.seed)
    if args.warmup is None:
        args.warmup = 0 if args.full_size and device == "cpu" else 1

    from concept_attention.attention.chain import AttentionHook
    from concept_attention.attention.patching import install_hook

    dtype = bench.DTYPES[args.dtype]
    latent = args.size // 8
    started = time.perf_counter()
    if args.full_size:
        label = "full-size SD1.5 (random weights)"
        model = bench.build_full_sd15(args.seed, dtype)
        positive = bench.random_conds(args.seed + 10)
        negative = bench.random_conds(args.seed + 11)
    else:
        label = f"tiny {args.arch} fixture"
        model, clip = bench.build_tiny(args.arch, args.seed)
        positive, negative = bench.encode(clip, PROMPT), bench.encode(clip, NEGATIVE)
    print(f"model: {label}, built in {time.perf_counter() - started:.1f}s")
    print(f"machine: {bench.machine_info(device)}; {bench.load_average()}")
    print(f"sampling: {args.size}x{args.size} px (latent {latent}x{latent}), {args.steps} steps "
          f"euler/normal, cfg {args.cfg}, batch 1, {args.dtype}, device {device}, "
          f"ComfyUI attention {bench.attention_name()}")

    def sampler(patched, steps=args.steps):
        return lambda: bench.sample(patched, positive, negative, latent, steps, args.cfg,
                                      args.seed)

    # Every variant, stock included, samples a clone, so model loading work is the same for all.
    stock = model.clone()
    models, stores = recorder_models(model)

    variants = [bench.Variant("stock", sampler(stock))]
    variants += [bench.Variant(name, sampler(patched), before=before)
                 for name, (patched, before) in models.items()]
    hooked = {name: len(patched.model_options["transformer_options"]["patches_replace"]["attn2"])
              for name, (patched, _) in models.items()}
    print("cross-attention layers hooked: " + ", ".join(f"{k} {v}" for k, v in hooked.items()))

    # Capture each layer's attention inputs (for the per-call measurement); this one-step run
    # also takes the process's one-time allocations before any variant is measured.
    calls = bench.capture_attn2_inputs(model, lambda m: sampler(m, 1)(), install_hook,
                                         AttentionHook)

    # Warm-up (untimed). The first round measures each variant's peak memory increase.
    for w in range(args.warmup):
        for v in variants:
            if w == 0 and not args.no_memory:
                v.last_output, v.peak_mib = bench.run_measuring_peak(v, device)
            else:
                v.before()
                v.last_output = v.run()

    print(f"timing {args.rounds} rounds x {len(variants)} variants (interleaved, order rotated):")
    loads = bench.run_interleaved(variants, args.rounds, device)
    base = variants[0]
    # The patches must change nothing in the sampled latent, and the recorders must record.
    for v in variants[1:]:
        same = torch.equal(v.last_output, base.last_output)
        close = torch.allclose(v.last_output, base.last_output, atol=1e-5, rtol=1e-4)
        print(f"  {v.name}: latent "
              f"{'identical to' if same else ('matches' if close else 'DIFFERS from')} stock")
    for name, store in stores.items():
        print(f"  {name}: recorded {sum(len(s) for s in store.steps)} layer maps over "
              f"{len(store.steps)} model evaluations in its last run")
    if not torch.isfinite(base.last_output).all():
        print("  warning: the stock latent is not finite")

    estimates = {}
    if args.call_reps > 0:
        print(f"per-call overhead: {args.call_reps} back-to-back pairs per hooked layer, on the "
              "inputs of the first model evaluation, against ComfyUI's optimized_attention:")
        overheads = bench.attn2_call_overheads(models, calls, args.call_reps, device)
        for name, per_key in overheads.items():
            added = sum(d for d, _ in per_key.values())
            stock_attn = sum(b for _, b in per_key.values())
            per_res: dict[int, list[float]] = {}
            for key, (d, _) in per_key.items():
                q, _, _, options = calls[key]
                per_res.setdefault(q.shape[1], []).append(d)
            detail = ", ".join(f"{int(n ** 0.5)}x{int(n ** 0.5)}: {statistics.median(ds) * 1e6:+.0f} us"
                               for n, ds in sorted(per_res.items(), reverse=True))
            run_added = added * args.steps  # euler: one evaluation (cond+uncond batch) per step
            estimates[name] = 1.0 + run_added / base.median
            print(f"  {name}: {added * 1e3:+.2f} ms per evaluation over {len(per_key)} layers "
                  f"(their stock attention {stock_attn * 1e3:.1f} ms); median per call by layer "
                  f"size: {detail}; x{args.steps} evaluations = {run_added:+.3f}s per run "
                  f"-> est. ratio {estimates[name]:.4f}x")

    print()
    print(f"{label}, {args.size} px, {args.steps} steps, cfg {args.cfg}, {device}, "
          f"{bench.attention_name()}, median of {args.rounds} rounds; {bench.load_average()}:")
    print(bench.format_table(variants, "stock", TARGETS if args.full_size else None,
                               estimates, show_peak=args.warmup > 0 and not args.no_memory))
    print(bench.footer(variants, loads, device, started, TARGETS if args.full_size else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
