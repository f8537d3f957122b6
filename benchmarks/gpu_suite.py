"""Every speed figure of issue 21 in one run and one Markdown table: training and sampling.

Training (``training.loop.train_concepts``, what the Train Concepts node runs): two concepts from
one random picture with the official recipe (250 steps, effective batch 8, calibration on) on
random-weight SD1.5 (UNet + CLIP-L + SD VAE, 512 px, micro-batch 2 x 4) and SDXL (UNet + CLIP-L/G
+ SD VAE, 1024 px, micro-batch 1 x 8). Per model: wall time of the whole call (set-up included),
steps per second after warm-up, peak memory, and the split of a step into UNet forward,
backward, calibration, optimizer and the rest, timed with CUDA events in the steps right after
the warm-up (``devkit.step_split``). A run that would outlast its time share stops early and is
extrapolated at its steady rate; the table says so.

Sampling: the stock KSampler path against the recorder, regional, nested and automatic-region
variants of the pack, on one random-weight SD1.5 UNet in one process, interleaved rounds,
ratios of medians (the builders of ``attention_overhead``, ``regional_overhead`` and
``nested_overhead``). On CUDA also the absolute times and each variant's peak memory.

  python benchmarks/gpu_suite.py --out DIR                  # full size on a GPU (about 7 min, H200)
  python benchmarks/gpu_suite.py --device cpu --out DIR     # smoke test: tiny models, 1-2 min
  python benchmarks/gpu_suite.py --render DIR/gpu_suite.json  # the table again from the raw rows

On a lent GPU machine: ``scripts/gpu_suite.sh`` (``prepare`` here, ``run`` there).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "dev"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from devkit import bench, step_split  # noqa: E402

RECIPE_STEPS = 250
SPECS = (("V1", "cat"), ("V2", "dog"))
ARCHS = {"sd15": "SD1.5", "sdxl": "SDXL"}
TRAIN_TARGETS = {"sd15": {"wall": 60.0, "peak": 12.0}, "sdxl": {"wall": 240.0, "peak": 24.0}}
SAMPLING_TARGETS = {"recorder-l/4": 1.05, "nested-1": 1.05, "nested-2": 1.05,
                    "regional": 1.10, "regional+texts": 1.10}
SAMPLING_VARIANTS = ("chain-idle", "recorder-l/4", "recorder-all", "combined", "regional",
                     "regional+texts", "auto", "auto+restart", "nested-1", "nested-2")
SPLIT = (*step_split.PARTS, "rest (text encoder, noise, loss, host)")


@dataclasses.dataclass(frozen=True)
class Scale:
    """The sizes of one mode: full size on a GPU, or tiny models for a smoke test."""

    full: bool
    resolution: dict[str, int]
    batches: dict[str, tuple[int, int]]  # micro-batch x accumulation
    steps: int  # the recipe's
    max_steps: dict[str, int]  # bound on the timed run (the rest is extrapolated)
    max_seconds: float  # bound on each timed run's steps
    warmup: int  # steps left out of the steady rate and before the parts are timed
    split_steps: int  # steps after the warm-up whose parts are timed
    sample_size: int
    sample_steps: int
    rounds: int
    sampling_seconds: float  # no new round after this
    budget: float  # seconds for the whole suite; SDXL trains in what is left


FULL = Scale(True, {"sd15": 512, "sdxl": 1024}, {"sd15": (2, 4), "sdxl": (1, 8)}, RECIPE_STEPS,
             {"sd15": RECIPE_STEPS, "sdxl": RECIPE_STEPS}, 150.0, 3, 2, 512, 20, 5, 120.0, 420.0)
TINY = Scale(False, {"sd15": 64, "sdxl": 64}, {"sd15": (2, 4), "sdxl": (1, 8)}, 4,
             {"sd15": 4, "sdxl": 3}, 120.0, 1, 1, 64, 3, 2, 60.0, 600.0)


@dataclasses.dataclass
class Row:
    """One figure of the table; ``value`` None when it could not be measured (``note`` says why)."""

    figure: str
    value: float | None
    unit: str
    target: float | None = None
    note: str = ""


class _Enough(Exception):
    """Raised from the progress callback to end a bounded run."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_machine_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("gpu_suite_out"),
                        help="folder for gpu_suite.json (raw rows) and gpu_suite.md (the table)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole suite (default 420 on a GPU): SDXL trains in "
                             "what is left and is extrapolated beyond it")
    parser.add_argument("--render", type=Path, default=None,
                        help="print the table of a gpu_suite.json and exit (runs nothing)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- training

def _training_models(arch: str, scale: Scale, device: str, seed: int) -> tuple[Any, Any, Any]:
    """MODEL, CLIP, VAE: full size with ComfyUI's dtypes for the device, or the tiny fixtures."""
    if not scale.full:
        from devkit import tiny_models

        bundle = tiny_models.build_bundle(arch, seed)
        return bundle.model, bundle.clip, bundle.vae
    build = bench.build_full_sd15 if arch == "sd15" else bench.build_full_sdxl
    model = build(seed, dtype=None, device=device if device == "cuda" else None)
    return model, bench.build_full_clip(arch, seed + 1, dtype=None), bench.build_full_vae(seed + 2)


def _train(models: tuple[Any, Any, Any], arch: str, scale: Scale, steps: int,
           progress: Callable[[int, int, dict, Any], None]) -> str:
    """One train_concepts call with the recipe's settings; how it stopped ("complete", "bounded"
    when the progress callback ended it, or the run's own reason, e.g. "non-finite loss")."""
    from concept_attention.concepts.specs import ConceptSpec
    from concept_attention.training.loop import train_concepts
    from concept_attention.training.settings import TrainSettings

    micro, accumulation = scale.batches[arch]
    size = scale.resolution[arch]
    settings = TrainSettings(steps=steps, micro_batch=micro, grad_accumulation=accumulation,
                             resolution=size)
    picture = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(0))
    try:
        return train_concepts(*models, picture, [ConceptSpec(*spec) for spec in SPECS], settings,
                              progress=progress).stopped
    except _Enough:
        return "bounded"


def timed_run(models: tuple[Any, Any, Any], arch: str, scale: Scale, device: str,
              max_seconds: float) -> dict[str, Any]:
    """The recipe's run, timed: wall, steady step, peak memory, and the parts of the
    ``scale.split_steps`` steps after the warm-up (``devkit.step_split``: a few CUDA events
    per step). Stops early at the scale's bounds (never inside the warm-up or those steps) and
    extrapolates the rest at the steady rate."""
    least = min(scale.steps, scale.warmup + max(2, scale.split_steps))
    parts = step_split.PartTimes(device == "cuda")
    timing = step_split.timing_parts(models[0].model.diffusion_model, parts)
    times: list[float] = []
    started, stopped = 0.0, ""

    def progress(step: int, total: int, losses: dict, maps: Any) -> None:
        times.append(time.perf_counter())  # each step ends in one read of its losses: synced
        if step == scale.warmup:
            timing.__enter__()
        elif step == scale.warmup + scale.split_steps:
            timing.__exit__(None, None, None)
        if step < total and step >= least and (step >= scale.max_steps[arch]
                                               or times[-1] - started > max_seconds):
            raise _Enough

    def run() -> None:
        nonlocal started, stopped
        started = time.perf_counter()
        try:
            stopped = _train(models, arch, scale, scale.steps, progress)
        finally:
            if scale.warmup <= len(times) < scale.warmup + scale.split_steps:  # broke inside
                timing.__exit__(None, None, None)

    _, peak_mib = bench.run_measuring_peak(bench.Variant("train", run), device)
    wall = time.perf_counter() - started
    done = len(times)
    if done < least:  # too few steps for a steady rate and the split
        raise RuntimeError(f"the run stopped after {done} steps: {stopped}")
    warm = min(scale.warmup, done - 1)
    steady = (times[-1] - (times[warm - 1] if warm else started)) / (done - warm)
    window = times[scale.warmup + scale.split_steps - 1] - times[scale.warmup - 1]
    split = {name: (device_s / scale.split_steps, host_s / scale.split_steps)
             for name, (device_s, host_s) in parts.seconds().items()}
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    return dict(wall=wall, done=done, steady=steady, first_step=times[0] - started,
                estimated=wall + (scale.steps - done) * steady, peak_gb=peak, peak_rss_mib=peak_mib,
                split=split, split_step=window / scale.split_steps, stopped=stopped)


def training_rows(arch: str, scale: Scale, device: str, seed: int, max_seconds: float) -> list[Row]:
    """The rows of one model's training figures."""
    name, targets = ARCHS[arch], TRAIN_TARGETS[arch]
    size, (micro, accumulation) = scale.resolution[arch], scale.batches[arch]
    recipe = f"{scale.steps} steps, {micro} x {accumulation} = batch {micro * accumulation}, {size} px"
    built = time.perf_counter()
    models = _training_models(arch, scale, device, seed)
    built = time.perf_counter() - built
    timed = timed_run(models, arch, scale, device, max_seconds)
    del models
    _free(device)

    how = (f"{timed['done']} of {scale.steps} steps measured in {timed['wall']:.1f} s, the rest "
           f"extrapolated at the steady rate" if timed["done"] < scale.steps else "measured")
    if timed["stopped"] not in ("complete", "bounded"):
        how = f"THE RUN STOPPED ITSELF ({timed['stopped']}): {how}"
    rows = [Row(f"{name} training: wall time of the run ({recipe})", timed["estimated"], "s",
                targets["wall"], f"{how}; set-up and first step {timed['first_step']:.1f} s; "
                f"models built beforehand in {built:.1f} s (not counted)"),
            Row(f"{name} training: steps per second", 1 / timed["steady"], "it/s", None,
                f"mean over the steps after step {scale.warmup}")]
    if timed["peak_gb"] is not None:
        rows.append(Row(f"{name} training: peak memory", timed["peak_gb"], "GB", targets["peak"],
                        "CUDA allocator peak over the run, weights included (GB = 1e9 bytes)"))
    else:
        rows.append(Row(f"{name} training: peak memory", timed["peak_rss_mib"], "MiB", None,
                        "no GPU: increase of the process's resident memory"))
    step, parts = timed["split_step"], timed["split"]
    rest = max(step - sum(device_s for device_s, _ in parts.values()), 0.0)
    timed_steps = f"{scale.warmup + 1}-{scale.warmup + scale.split_steps}" if scale.split_steps > 1 else scale.warmup + 1
    where = f"of a {step * 1e3:.0f} ms step (mean of step {timed_steps})"
    for part, (device_s, host_s) in parts.items():
        rows.append(Row(f"{name} step split: {part}", device_s * 1e3, "ms/step", None,
                        f"{100 * device_s / step:.0f} % {where}"
                        + (f"; the host spent {host_s * 1e3:.0f} ms in it" if device == "cuda" else "")))
    rows.append(Row(f"{name} step split: {SPLIT[-1]}", rest * 1e3, "ms/step", None,
                    f"{100 * rest / step:.0f} % {where}: the step minus the four parts"))
    return rows


# --------------------------------------------------------------------------- sampling

def _sampling_inputs(scale: Scale, device: str, seed: int) -> tuple[Any, Any, Any, list, list]:
    """Model, positive, negative, the two nested subjects and the two region texts."""
    import nested_overhead

    if scale.full:
        model = bench.build_full_sd15(seed, dtype=None, device=device if device == "cuda" else None)
        positive, sources = nested_overhead.full_size_subjects(nested_overhead.BANK_TOKENS, seed)
        negative = bench.random_conds(seed + 11)
        texts = [bench.random_conds(seed + 12 + i)[0][0] for i in range(2)]
        return model, positive, negative, sources, texts
    model, clip = bench.build_tiny("sd15", seed)
    positive, sources = nested_overhead.tiny_subjects(model, clip, nested_overhead.BANK_TOKENS, seed)
    texts = [bench.encode(clip, text)[0][0] for text in ("a photo of a cat", "a photo of a dog")]
    return model, positive, bench.encode(clip, ""), sources, texts


def sampling_rows(scale: Scale, device: str, seed: int) -> list[Row]:
    """Stock KSampler sampling and every pack variant in interleaved rounds, one row each."""
    import attention_overhead
    import nested_overhead
    import regional_overhead

    model, positive, negative, sources, texts = _sampling_inputs(scale, device, seed)
    latent = scale.sample_size // 8
    options = SimpleNamespace(size=scale.sample_size, steps=scale.sample_steps, cfg=7.0, seed=seed)

    def sampler(patched: Any) -> Callable[[], torch.Tensor]:
        return lambda: bench.sample(patched, positive, negative, latent, options.steps, options.cfg, seed)

    recorders, _ = attention_overhead.recorder_models(model)
    variants = [bench.Variant("stock", sampler(model.clone()))]
    variants += [bench.Variant(name, sampler(patched), before=before) for name, (patched, before) in recorders.items()]
    variants += regional_overhead.regional_variants(model, texts, positive, negative, options, sampler)
    variants += [bench.Variant(name, sampler(patched))
                 for name, patched in nested_overhead.nested_models(model, sources).items()]
    assert [v.name for v in variants[1:]] == list(SAMPLING_VARIANTS), [v.name for v in variants]

    for variant in variants:  # warm-up, untimed; on a GPU it measures each variant's peak
        if device == "cuda":
            variant.last_output, variant.peak_mib = bench.run_measuring_peak(variant, device)
        else:
            variant.before()
            variant.last_output = variant.run()
    started = time.perf_counter()
    for r in range(scale.rounds):  # rotate the order each round, as bench.run_interleaved does
        if r >= 2 and time.perf_counter() - started > scale.sampling_seconds:
            break
        bench.run_interleaved(variants[r % len(variants):] + variants[:r % len(variants)], 1, device)
    stock = variants[0]
    where = (f"SD1.5 {'full size' if scale.full else 'tiny'}, {scale.sample_size} px, "
             f"{scale.sample_steps} steps euler, cfg 7, batch 1; median of {len(stock.times)} rounds")
    rows = [Row("sampling: stock KSampler, seconds per image", stock.median, "s", None,
                where + _peak_note(stock))]
    for v in variants[1:]:
        same = torch.equal(v.last_output, stock.last_output)
        rows.append(Row(f"sampling: {v.name} / stock", v.median / stock.median, "x",
                        SAMPLING_TARGETS.get(v.name), f"median {v.median:.3f} s"
                        + _peak_note(v) + ("; latent identical to stock" if same else "")))
    del variants, recorders, model
    _free(device)
    return rows


def _peak_note(variant: bench.Variant) -> str:
    return "" if variant.peak_mib is None else f"; peak +{variant.peak_mib:.0f} MiB"


# --------------------------------------------------------------------------- the suite

def _free(device: str) -> None:
    """Drop every loaded model and cached block, so the next section measures its own peak."""
    import comfy.model_management as mm

    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    if device == "cuda":
        torch.cuda.empty_cache()


def header(argv: list[str], device: str, scale: Scale) -> dict[str, str]:
    """Command, machine, versions and what the models are."""
    from devkit.comfy_env import comfy_root

    version = "unknown"
    version_file = comfy_root() / "comfyui_version.py"
    if version_file.is_file():
        version = version_file.read_text().split("__version__ = ")[-1].strip().strip('"\'')
    return {"command": " ".join(["python benchmarks/gpu_suite.py", *argv]),
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU (no GPU)",
            "machine": bench.machine_info(device),
            "torch": torch.__version__, "ComfyUI": version, "python": platform.python_version(),
            "attention": bench.attention_name(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "models": ("full size, seeded random weights, ComfyUI's dtypes for the device"
                       if scale.full else "TINY fixtures, few steps: a smoke test, not the issue's figures")}


def render(result: dict[str, Any]) -> str:
    """The Markdown table of a result (header lines, then one row per figure)."""
    head, full = result["header"], result["full"]
    lines = [f"# GPU suite (issue 21): {head['device']}", ""]
    lines += [f"- {key}: `{value}`" if key == "command" else f"- {key}: {value}"
              for key, value in head.items()]
    lines += ["", "| figure | value | target | met | how |", "|---|---:|---:|---|---|"]
    for row in result["rows"]:
        value, target = row["value"], row["target"]
        shown = "n/a" if value is None else f"{value:.3f}x" if row["unit"] == "x" else f"{value:.4g} {row['unit']}"
        goal = "" if target is None else f"<= {target:.2f}x" if row["unit"] == "x" else f"<= {target:g} {row['unit']}"
        met = ("" if target is None else "n/a (tiny models)" if not full
               else "n/a" if value is None else "yes" if value <= target else "NO")
        lines.append(f"| {row['figure']} | {shown} | {goal} | {met} | {row['note']} |")
    return "\n".join(lines) + "\n"


def _section(rows: list[dict], make: Callable[[], list[Row]], names: list[str]) -> None:
    """Run one section; on failure its rows say so and the suite goes on."""
    try:
        rows += [dataclasses.asdict(row) for row in make()]
    except Exception as error:  # noqa: BLE001 - one broken figure must not cost the others
        traceback.print_exc()
        rows += [dataclasses.asdict(Row(name, None, "", None, f"failed: {type(error).__name__}: {error}"[:300]))
                 for name in names]


def main(argv: list[str] | None = None) -> int:
    """Run the suite; write gpu_suite.json and gpu_suite.md under --out and print the table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    started = time.perf_counter()
    device = bench.start_benchmark(args)
    scale = FULL if device == "cuda" else TINY
    budget = args.budget or scale.budget
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"header": header(argv, device, scale), "full": scale.full, "rows": []}
    sections: dict[str, list[dict]] = {"sd15": [], "sdxl": [], "sampling": []}

    def save() -> None:
        result["rows"] = sections["sd15"] + sections["sdxl"] + sections["sampling"]
        (args.out / "gpu_suite.json").write_text(json.dumps(result, indent=1))
        (args.out / "gpu_suite.md").write_text(render(result))

    def log(what: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s] {what}", flush=True)

    log(f"start: {result['header']['machine']}")
    _section(sections["sd15"], lambda: training_rows("sd15", scale, device, args.seed, scale.max_seconds),
             [f"SD1.5 training ({scale.steps} steps)"])
    save()
    log("SD1.5 training done")
    _section(sections["sampling"], lambda: sampling_rows(scale, device, args.seed), ["sampling"])
    save()
    log("sampling done")
    # SDXL last: it trains in what is left of the budget (its models and set-up kept aside).
    left = budget - (time.perf_counter() - started) - (60.0 if scale.full else 10.0)
    if left < 20.0:
        sections["sdxl"].append(dataclasses.asdict(Row("SDXL training", None, "", None,
                                                       f"not run: {left:.0f} s of the budget left")))
    else:
        _section(sections["sdxl"], lambda: training_rows("sdxl", scale, device, args.seed,
                                                         min(scale.max_seconds, left)),
                 [f"SDXL training ({scale.steps} steps)"])
    save()
    log("SDXL training done")
    print()
    print(render(result))
    print(f"whole suite: {time.perf_counter() - started:.0f} s; raw rows in {args.out / 'gpu_suite.json'}")
    return 0 if all(row["value"] is not None and math.isfinite(row["value"]) for row in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
