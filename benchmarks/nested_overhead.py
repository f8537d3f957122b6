"""Sampling time of Apply Nested Attention against the stock ComfyUI path, one process.

Variants, each a clone of one model sampled with the same ``comfy.sample.sample`` call:

  stock       no patches
  nested-1    one nested subject ("cat") with a random token bank of 16 tokens, every
              cross-attention layer (what Apply Nested Attention installs)
  nested-2    two subjects ("cat", "dog"), 16 tokens each, exclusive mode

Banks are seeded random ``[16, context_dim]`` tensors (timing does not depend on their values).
The tiny model goes through the pack's own API (``encode_prompt``, ``SubjectSpec``,
``build_sources``, ``install_nested``). The full-size UNet has no CLIP, so its random positive
conditioning stands in for the prompt: the subjects sit at the rows where "cat" and "dog" are in
"a photo of a cat and a dog", with the features there as their signatures, as ``build_sources``
would make them. Run from the repository root:

  .venv/bin/python benchmarks/nested_overhead.py                # tiny SD1.5, 512 px
  .venv/bin/python benchmarks/nested_overhead.py --full-size    # random-weight full SD1.5
  .venv/bin/python benchmarks/nested_overhead.py --quick        # smoke test (seconds)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dev"))

import torch  # noqa: E402

from devkit import bench  # noqa: E402

PROMPT, NEGATIVE = "a photo of a cat and a dog", ""
WORDS = ("cat", "dog")
POSITIONS = (5, 8)  # "cat" and "dog" in PROMPT (BOS is row 0): the full-size stand-ins
BANK_TOKENS = 16
TARGETS = {"nested-1": 1.10, "nested-2": 1.10}  # issue target, full-size SD1.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` shrinks everything to a smoke test."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="random-weight full SD1.5 UNet")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 128 px, 1 step, 1 round, no warm-up (tiny unless --full-size)")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (latent = /8; default 512)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (3 tiny, 2 full size)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (5 tiny, 3 full size)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed one-step rounds first (default 1; 0 with --quick)")
    parser.add_argument("--bank-tokens", type=int, default=BANK_TOKENS, help="nested tokens per subject")
    parser.add_argument("--call-reps", type=int, default=None,
                        help="back-to-back pairs of the per-call measurement on captured layer inputs "
                             "(default 20 tiny, 10 full size, 0 with --quick; 0 skips it)")
    parser.add_argument("--cfg", type=float, default=7.0)
    bench.add_machine_arguments(parser, attention=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.size = args.size or (128 if args.quick else 512)
    args.steps = args.steps or (1 if args.quick else 2 if args.full_size else 3)
    args.rounds = args.rounds or (1 if args.quick else 3 if args.full_size else 5)
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    if args.call_reps is None:
        args.call_reps = 0 if args.quick else 10 if args.full_size else 20
    return args


def random_bank(tokens: int, width: int, seed: int) -> torch.Tensor:
    """A seeded random token bank ``[tokens, width]``."""
    return torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed))


def tiny_subjects(model: Any, clip: Any, tokens: int, seed: int) -> tuple[list, list]:
    """Positive conditioning and the two subjects' sources, made with the pack's own API."""
    from concept_attention.attention.patching import model_layers
    from concept_attention.sampling.nested_subjects import SubjectSpec, build_sources, encode_prompt

    positive, features = encode_prompt(clip, PROMPT)
    specs = [SubjectSpec(word, bank=random_bank(tokens, features.shape[-1], seed + i))
             for i, word in enumerate(WORDS)]
    return positive, build_sources(clip, PROMPT, features, specs, model_layers(model))


def full_size_subjects(tokens: int, seed: int) -> tuple[list, list]:
    """Random positive conditioning and two sources located at fixed rows of it."""
    from concept_attention.attention.nested_hook import NestedSource

    positive = bench.random_conds(seed + 10)
    features = positive[0][0][0]
    sources = [NestedSource(name=word, position=pos, signature=features[pos].clone(),
                            bank=random_bank(tokens, features.shape[-1], seed + i))
               for i, (word, pos) in enumerate(zip(WORDS, POSITIONS))]
    return positive, sources


def capture_layer_inputs(model: Any, sample_once: Any) -> dict[Any, tuple]:
    """``{layer key: (n, context, extra_options)}`` as the first model evaluation of
    ``sample_once`` hands them to ``attn2_patch``es (hidden states, text features, options)."""
    from concept_attention.attention.chain import AttentionContext

    calls: dict[Any, tuple] = {}

    def record(n: torch.Tensor, context: torch.Tensor, value: Any, extra_options: dict) -> tuple:
        key = AttentionContext(extra_options, context.shape[0]).key
        if key not in calls:
            calls[key] = (n.detach().clone(), context.detach().clone(), dict(extra_options))
        return n, context, value

    capture = model.clone()
    capture.set_model_attn2_patch(record)
    sample_once(capture)
    return calls


def call_overheads(model: Any, patched: Any, calls: dict[Any, tuple], reps: int,
                   device: str) -> dict[Any, tuple[float, float, float]]:
    """Per layer: ``(median extra s of the whole nested call, of its hook alone, median stock s)``.

    Stock is what ComfyUI runs without a replace: ``to_k``/``to_v`` of the text features, then
    ``optimized_attention``. Nested is the context patch (locating the subjects, appending the
    banks), ``to_k``/``to_v`` of the longer context and the attention chain with the nested hook.
    ``to_q``/``to_out`` are the same in both and left out.
    """
    from comfy.ldm.modules import attention as comfy_attention
    from concept_attention.attention.nested_hook import NestedContextPatch
    from concept_attention.attention.patching import model_layers

    diffusion_model = model.model.diffusion_model
    modules = {layer.key: diffusion_model.get_submodule(layer.module_path) for layer in model_layers(model)}
    transformer_options = patched.model_options["transformer_options"]
    patch = next(p for p in transformer_options["patches"]["attn2_patch"] if isinstance(p, NestedContextPatch))
    replaces = transformer_options["patches_replace"]["attn2"]
    results = {}
    for key, (n, context, options) in calls.items():
        module, replace = modules[key], replaces.get(key)
        if replace is None:
            continue
        with torch.inference_mode():
            q = module.to_q(n)

            def stock_attention(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return comfy_attention.optimized_attention(
                    q, k, v, options["n_heads"], attn_precision=options.get("attn_precision"),
                    transformer_options=options)

            def stock() -> torch.Tensor:
                return stock_attention(module.to_k(context), module.to_v(context))

            def nested() -> torch.Tensor:
                extra = dict(options)
                _, ctx, value = patch(n, context, None, extra)
                return replace(q, module.to_k(ctx), module.to_v(value), extra)

            extra = dict(options)
            _, ctx, value = patch(n, context, None, extra)
            k_all, v_all = module.to_k(ctx), module.to_v(value)
            n_text = context.shape[1]

            def stock_text() -> torch.Tensor:
                return stock_attention(k_all[:, :n_text], v_all[:, :n_text])

            def hook() -> torch.Tensor:
                return replace(q, k_all, v_all, extra)

            whole, base = bench.paired_overhead(stock, nested, reps, device)
            hook_only, _ = bench.paired_overhead(stock_text, hook, reps, device)
        results[key] = (whole, hook_only, base)
    return results


def nested_models(model: Any, sources: list) -> dict[str, Any]:
    """Clones of ``model`` with Apply Nested Attention's install: ``nested-1`` (the first subject)
    and ``nested-2`` (both, exclusive), on every cross-attention layer."""
    from concept_attention.attention.patching import install_nested

    nested = {}
    for name, chosen in (("nested-1", sources[:1]), ("nested-2", sources)):
        patched = model.clone()
        install_nested(patched, chosen, "all", exclusive=True)
        nested[name] = patched
    return nested


def main(argv: list[str] | None = None) -> int:
    """Time stock, one-subject and two-subject nested sampling, interleaved; print the report."""
    args = parse_args(argv)
    device = bench.start_benchmark(args)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    if args.full_size:
        label = "full-size SD1.5 (random weights)"
        model = bench.build_full_sd15(args.seed)
        positive, sources = full_size_subjects(args.bank_tokens, args.seed)
        negative = bench.random_conds(args.seed + 11)
    else:
        label = "tiny sd15 fixture"
        model, clip = bench.build_tiny("sd15", args.seed)
        positive, sources = tiny_subjects(model, clip, args.bank_tokens, args.seed)
        negative = bench.encode(clip, NEGATIVE)
    latent = args.size // 8
    print(f"model: {label}, built in {time.perf_counter() - started:.1f}s")
    print(f"machine: {bench.machine_info(device)}; {bench.load_average()}")
    print(f"sampling: {args.size}x{args.size} px (latent {latent}x{latent}), {args.steps} steps "
          f"euler/normal, cfg {args.cfg}, batch 1, fp32, device {device}, "
          f"ComfyUI attention {bench.attention_name()}")

    nested = nested_models(model, sources)
    hooked = len(nested["nested-1"].model_options["transformer_options"]["patches_replace"]["attn2"])
    print(f"nested: {hooked} cross-attention layers hooked, {args.bank_tokens} bank tokens per "
          f"subject at rows {[s.position for s in sources]}, exclusive mode")

    def sampler(patched: Any, steps: int = args.steps) -> Any:
        return lambda: bench.sample(patched, positive, negative, latent, steps, args.cfg, args.seed)

    variants = [bench.Variant("stock", sampler(model.clone()))]
    variants += [bench.Variant(name, sampler(patched)) for name, patched in nested.items()]
    warm = [sampler(model.clone(), 1)] + [sampler(patched, 1) for patched in nested.values()]
    for _ in range(args.warmup):  # untimed, one step: takes the one-time allocations
        for run in warm:
            run()
    if device == "cuda":  # one untimed whole run each, for its peak GPU memory
        for v in variants:
            v.last_output, v.peak_mib = bench.run_measuring_peak(v, device)
    calls = {}
    if args.call_reps > 0:  # after the warm-up; one step, first evaluation's inputs
        calls = capture_layer_inputs(model, lambda m: sampler(m, 1)())
    print(f"timing {args.rounds} rounds x {len(variants)} variants (interleaved, order rotated):")
    loads = bench.run_interleaved(variants, args.rounds, device)
    base = variants[0]
    for v in variants[1:]:  # the subjects must act, or the timing measures nothing
        diff = (v.last_output - base.last_output).abs().max().item()
        print(f"  {v.name}: latent differs from stock by up to {diff:.3g}"
              + ("" if diff > 0 else " (WARNING: nested attention did not act)"))

    estimates = {}
    if calls:
        print(f"per-call overhead: {args.call_reps} back-to-back pairs per hooked layer, on the inputs "
              "of the first model evaluation; whole = context patch + to_k/to_v + attention chain "
              "against to_k/to_v + optimized_attention; hook = the chain alone against "
              "optimized_attention on the text rows:")
        for name, patched in nested.items():
            per_key = call_overheads(model, patched, calls, args.call_reps, device)
            added = sum(w for w, _, _ in per_key.values())
            hook_added = sum(h for _, h, _ in per_key.values())
            stock_attn = sum(b for _, _, b in per_key.values())
            per_res: dict[int, list[float]] = {}
            for key, (w, _, _) in per_key.items():
                per_res.setdefault(calls[key][0].shape[1], []).append(w)
            detail = ", ".join(f"{int(n ** 0.5)}x{int(n ** 0.5)}: {statistics.median(ws) * 1e3:+.2f} ms"
                               for n, ws in sorted(per_res.items(), reverse=True))
            run_added = added * args.steps  # euler: one evaluation (cond+uncond batch) per step
            estimates[name] = 1.0 + run_added / base.median
            print(f"  {name}: {added * 1e3:+.1f} ms per evaluation over {len(per_key)} layers "
                  f"(hook alone {hook_added * 1e3:+.1f} ms; their stock cross-attention "
                  f"{stock_attn * 1e3:.1f} ms); median per call by layer size: {detail}; "
                  f"x{args.steps} evaluations = {run_added:+.3f}s per run -> est. ratio "
                  f"{estimates[name]:.4f}x")

    targets = TARGETS if args.full_size and not args.quick else None
    print()
    print(f"{label}, {args.size} px, {args.steps} steps, cfg {args.cfg}, {device}, "
          f"{bench.attention_name()}, median of {args.rounds} rounds; {bench.load_average()}:")
    print(bench.format_table(variants, "stock", targets, estimates or None, show_peak=device == "cuda"))
    for v in variants[1:]:
        print(f"ratio {v.name}/stock: {v.median / base.median:.3f}x")
    print(bench.footer(variants, loads, device, started, targets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
