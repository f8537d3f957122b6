"""Shared pieces of the benchmarks: ComfyUI in library mode, models, conditioning, timing, tables.

Every benchmark measures the pack against the stock ComfyUI path in ONE process, interleaving the
variants round by round (machines are noisy, other work shares them) and reporting the median per
variant and its ratio to the baseline. Nothing is downloaded: models have seeded random weights.

Usage from a benchmark script (``dev/`` on ``sys.path``)::

    from devkit import bench
    bench.add_machine_arguments(parser)          # --device, --threads (, --attention)
    device = bench.start_benchmark(args)         # before anything imports comfy.model_management
    model = bench.build_full_sd15(); bench.run_interleaved(...); print(bench.format_table(...))
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .comfy_env import ATTENTION_FLAGS, start


# ComfyUI's SD1.5 UNet config (comfy/model_detection.py, "SD15"): 320 channels, mult 1-2-4-4,
# 2 res blocks per level, one transformer per attention block on the first three levels.
SD15_FULL_UNET: dict[str, Any] = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    transformer_depth_middle=1, context_dim=768, use_spatial_transformer=True, legacy=False,
    use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
    use_temporal_resblock=False, num_heads=8, num_head_channels=-1, use_checkpoint=False,
)
SD15_CONTEXT = (77, 768)  # one CLIP-L chunk
SD15_PARAMETERS = 859_520_964  # UNet parameters; ComfyUI's dtype choice reads the model's size
# ComfyUI's SDXL base UNet config (comfy/model_detection.py, "SDXL"): 2.6B parameters.
SDXL_FULL_UNET: dict[str, Any] = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
    num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
    transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False,
    use_temporal_resblock=False,
)
SDXL_PARAMETERS = 2_567_463_684
# The SD VAE's encoder/decoder config (comfy/sd.py's default for "AutoencoderKL" checkpoints).
SD_VAE_CONFIG: dict[str, Any] = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3,
                                     ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[],
                                     dropout=0.0)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------- environment

def add_machine_arguments(parser: argparse.ArgumentParser, device: str = "auto",
                          attention: bool = False) -> None:
    """The flags every benchmark takes: ``--device``, ``--threads`` and, if asked, ``--attention``."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=device,
                        help=f"where to run (default {device}; auto = cuda when a GPU is visible)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    if attention:
        parser.add_argument("--attention", choices=("auto", *ATTENTION_FLAGS), default="auto",
                            help="ComfyUI's attention function (auto: ComfyUI's choice for the device)")


def start_benchmark(args: argparse.Namespace, attention: str | None = None) -> str:
    """The one start-up: library-mode ComfyUI on ``args.device`` with ``attention`` (default
    ``args.attention``, else ComfyUI's choice) and ``args.threads`` torch threads; returns the
    device. Call it before anything imports comfy.model_management."""
    device = start(args.device, attention or getattr(args, "attention", "auto"))
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)  # a progress bar per sampling call would flood the log
    return device


def attention_name() -> str:
    """Name of the attention function ComfyUI ended up using."""
    from comfy.ldm.modules import attention

    return attention.optimized_attention.__name__


def machine_info(device: str) -> str:
    """One line naming the machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    info = (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}")
    if device == "cuda":
        info += f", GPU {torch.cuda.get_device_name(0)}"
    return info


# --------------------------------------------------------------------------- models

def build_full_sd15(seed: int = 0, dtype: torch.dtype | None = torch.float32,
                    device: str | None = None) -> Any:
    """A ModelPatcher around a FULL-size SD1.5 UNet (860M parameters) with seeded random weights.

    Built from ``comfy.supported_models.SD15`` and the real SD1.5 UNet config, so every layer,
    shape and patch point is the real one; only the weights are random (~3.4 GB in fp32). Built
    on the CPU by default, or directly on ``device`` (much faster for a GPU; other numbers).
    ``dtype`` None takes ComfyUI's choice for the device, as a checkpoint loader does.
    """
    import comfy.supported_models

    return _full_unet(comfy.supported_models.SD15, SD15_FULL_UNET, SD15_PARAMETERS, seed, dtype, device)


def build_full_sdxl(seed: int = 0, dtype: torch.dtype | None = torch.float32,
                    device: str | None = None) -> Any:
    """A ModelPatcher around a FULL-size SDXL base UNet (2.6B parameters), seeded random weights;
    ``dtype`` None takes ComfyUI's choice for the device."""
    import comfy.supported_models

    return _full_unet(comfy.supported_models.SDXL, SDXL_FULL_UNET, SDXL_PARAMETERS, seed, dtype, device)


def _full_unet(config_class: type, unet: dict[str, Any], parameters: int, seed: int,
               dtype: torch.dtype | None, device: str | None) -> Any:
    import comfy.model_management as mm
    import comfy.model_patcher
    from .tiny_models import seeded_init_

    config = config_class(dict(unet))
    manual_cast = None
    if dtype is None:  # what comfy.sd.load_checkpoint_guess_config picks
        supported = list(config.supported_inference_dtypes)
        dtype = mm.unet_dtype(model_params=parameters, supported_dtypes=supported)
        manual_cast = mm.unet_manual_cast(dtype, mm.get_torch_device(), supported)
    config.set_inference_dtype(dtype, manual_cast)
    base = config.get_model({}, device=device)
    seeded_init_(base.diffusion_model, _generator(seed, device))
    return comfy.model_patcher.ModelPatcher(base, mm.get_torch_device(), mm.unet_offload_device())


def _generator(seed: int, device: str | None) -> torch.Generator:
    return torch.Generator(device=device or "cpu").manual_seed(seed)


def build_full_clip(arch: str = "sd15", seed: int = 1, dtype: torch.dtype | None = torch.float32) -> Any:
    """The real text encoder of ``arch`` with seeded random weights: CLIP-L (123M parameters) for
    ``"sd15"``, CLIP-L + OpenCLIP bigG (820M) for ``"sdxl"``, with ComfyUI's tokenizers.

    Made where ComfyUI puts a new text encoder and filled there (on a GPU, with a CUDA generator);
    ``dtype`` None takes ComfyUI's choice for the device, as a checkpoint loader does.
    """
    import comfy.sd
    import comfy.supported_models
    from .tiny_models import seeded_init_

    config_class, unet = ((comfy.supported_models.SD15, SD15_FULL_UNET) if arch == "sd15"
                          else (comfy.supported_models.SDXL, SDXL_FULL_UNET))
    options = {} if dtype is None else {"dtype": dtype}
    clip = comfy.sd.CLIP(config_class(dict(unet)).clip_target(), model_options=options)
    device = next(clip.cond_stage_model.parameters()).device
    seeded_init_(clip.cond_stage_model, _generator(seed, str(device)))
    return clip


def build_full_vae(seed: int = 2) -> Any:
    """The SD VAE (AutoencoderKL, 84M parameters, 8x down, 4 latent channels), seeded random
    weights, through ComfyUI's ``VAE`` as a checkpoint loader makes it."""
    import comfy.ldm.models.autoencoder
    import comfy.sd
    from .tiny_models import seeded_init_

    module = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_CONFIG), embed_dim=4)
    seeded_init_(module, _generator(seed, None))
    return comfy.sd.VAE(sd=module.state_dict())


def build_tiny(arch: str = "sd15", seed: int = 0) -> tuple[Any, Any]:
    """The tiny test fixture's (MODEL, CLIP) of ``arch`` (``"sd15"`` or ``"sdxl"``)."""
    from . import tiny_models

    return tiny_models.build_model(arch, seed), tiny_models.build_clip(arch, seed)


def encode(clip: Any, text: str) -> list[list[Any]]:
    """CLIPTextEncode, as the stock node does it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def random_conds(seed: int, shape: Sequence[int] = (1, *SD15_CONTEXT)) -> list[list[Any]]:
    """Conditioning in ComfyUI's format ``[[tensor, {}]]`` from a seeded random tensor."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(tuple(shape), generator=generator), {}]]


def sample(model: Any, positive: Any, negative: Any, latent_size: int, steps: int,
           cfg: float = 7.0, seed: int = 0, sampler: str = "euler",
           scheduler: str = "normal") -> torch.Tensor:
    """The stock KSampler's path (the pack's ``run_ksampler``) on a square empty latent, batch 1."""
    from concept_attention.sampling.ksampler import run_ksampler

    latent = {"samples": torch.zeros(1, 4, latent_size, latent_size)}
    return run_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)["samples"]


# --------------------------------------------------------------------------- timing

def synchronize(device: str) -> None:
    """Wait for queued GPU work, so wall-clock time covers it."""
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Variant:
    """One thing to time: ``run()`` does the work; ``before()`` (untimed) resets state."""

    name: str
    run: Callable[[], Any]
    before: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)  # wall-clock seconds per timed run
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds (all threads)
    peak_mib: float | None = None
    last_output: Any = None  # what the latest run() returned

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_times)


def time_once(variant: Variant, device: str) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one ``run()`` (collected and synced before/after)."""
    variant.before()
    gc.collect()
    synchronize(device)
    cpu, start = time.process_time(), time.perf_counter()
    variant.last_output = variant.run()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


def load_average() -> str:
    """The 1/5/15-minute load averages, to judge how busy the machine was."""
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average n/a"


def run_interleaved(variants: Sequence[Variant], rounds: int, device: str,
                    log: Callable[[str], None] = print) -> list[float]:
    """Time every variant once per round, rotating the order each round; fills the times.

    Rotation puts each variant in each position equally often, so slow drifts of the machine
    (other processes, thermal state) spread over all variants instead of biasing one. Returns
    the 1-minute load average seen after each round.
    """
    n = len(variants)
    loads = []
    for r in range(rounds):
        order = [variants[(r + i) % n] for i in range(n)]
        parts = []
        for variant in order:
            wall, cpu = time_once(variant, device)
            variant.times.append(wall)
            variant.cpu_times.append(cpu)
            parts.append(f"{variant.name} {wall:.3f}s")
        log(f"  round {r + 1}/{rounds}: " + ", ".join(parts) + f"  ({load_average()})")
        try:
            loads.append(os.getloadavg()[0])
        except OSError:
            pass
    return loads


def contention_warning(loads: Sequence[float], device: str,
                       variants: Sequence[Variant] = (), max_spread: float = 1.25) -> str | None:
    """A warning when the timed rounds look disturbed by other work on the machine.

    Two signs: the 1-minute load average rose above the core count (it counts this process too,
    about one per busy torch thread), or runs of one variant differ by more than ``max_spread``
    (max/min). With several torch threads, a thread that waits for a core stalls every parallel
    op, and whole runs can slow down severalfold while the load average barely moves.
    """
    cores = os.cpu_count() or 1
    reasons = []
    if device == "cpu" and loads and max(loads) > cores + 0.25:  # 1-minute average: coarse
        reasons.append(f"the 1-minute load average reached {max(loads):.2f} on {cores} cores")
    spread = [(v.name, max(v.times) / min(v.times)) for v in variants if len(v.times) > 1]
    wide = [f"{name} {ratio:.2f}x" for name, ratio in spread if ratio > max_spread]
    if wide:
        reasons.append("runs of one variant differ (max/min: " + ", ".join(wide) + ")")
    if not reasons:
        return None
    return ("warning: " + "; ".join(reasons) + ". Other processes likely competed for the CPU, "
            "so whole-run ratios are noisy: trust the CPU-time and per-call columns more, rerun "
            "when the machine is idle, or use --threads 1.")


def paired_overhead(base: Callable[[], Any], other: Callable[[], Any], reps: int, device: str,
                    before: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Extra seconds ``other()`` takes over ``base()``: median of back-to-back pair differences.

    Pairs alternate which call goes first. Returns ``(median difference, median base time)``.
    Meant for short calls (one attention layer), where a paired difference is far less noisy
    than the difference of two whole sampling runs.
    """
    diffs, bases = [], []
    for i in range(reps):
        before()
        timings = {}
        for name, fn in ((("base", base), ("other", other)) if i % 2 == 0
                         else (("other", other), ("base", base))):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            timings[name] = time.perf_counter() - start
        diffs.append(timings["other"] - timings["base"])
        bases.append(timings["base"])
    return statistics.median(diffs), statistics.median(bases)


class _RssSampler:
    """Polls this process's resident set size in a thread and keeps the maximum."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.start_rss = self.process.memory_info().rss
        self.peak = self.start_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def run_measuring_peak(variant: Variant, device: str) -> tuple[Any, float | None]:
    """One untimed ``run()``; returns its result and the peak memory increase in MiB: the CUDA
    allocator's peak on a GPU, else the resident set size polled every 2 ms (None without
    psutil)."""
    variant.before()
    gc.collect()
    if device == "cuda":
        synchronize(device)
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = variant.run()
        synchronize(device)
        return result, (torch.cuda.max_memory_allocated() - start) / 2**20
    try:
        sampler = _RssSampler()
    except ImportError:
        return variant.run(), None
    with sampler:
        result = variant.run()
    return result, (sampler.peak - sampler.start_rss) / 2**20


# --------------------------------------------------------------------------- per-call timing

def capture_attn2_inputs(model: Any, sample_once: Callable[[Any], Any], install_hook: Callable,
                         hook_base: type) -> dict[Any, tuple]:
    """``{layer key: (q, k, v, extra_options)}`` of every cross-attention layer of ``model``, as
    ComfyUI passes them to an attn2 replace in the first model evaluation of ``sample_once``.

    ``install_hook`` and ``hook_base`` are the pack's ``patching.install_hook`` and
    ``chain.AttentionHook`` (passed in so that this module imports nothing of the pack).
    """

    @dataclass(frozen=True, eq=False)
    class Capture(hook_base):  # type: ignore[misc, valid-type]
        calls: dict = field(default_factory=dict)

        def apply(self, q, k, v, ctx, proceed):
            if ctx.key not in self.calls:
                self.calls[ctx.key] = (q.detach().clone(), k.detach().clone(), v.detach().clone(),
                                       dict(ctx.options))
            return proceed(q, k, v)

    capture = Capture()
    patched = model.clone()
    install_hook(patched, capture, "all")
    sample_once(patched)
    return capture.calls


def attn2_call_overheads(models: dict[str, tuple[Any, Callable[[], None]]],
                         calls: dict[Any, tuple], reps: int,
                         device: str) -> dict[str, dict[Any, tuple[float, float]]]:
    """Per patched model and hooked layer: ``(median extra seconds, median stock seconds)`` of
    its attn2 replace against ComfyUI's own ``optimized_attention`` on the captured inputs.

    ``models`` maps a name to ``(ModelPatcher, before)``; ``before()`` runs untimed before each
    pair (e.g. a map store's ``clear``). Layers without a replace are left out.
    """
    from comfy.ldm.modules import attention as comfy_attention

    results: dict[str, dict[Any, tuple[float, float]]] = {}
    for name, (patched, before) in models.items():
        attn2 = (patched.model_options.get("transformer_options", {})
                 .get("patches_replace", {}).get("attn2", {}))
        per_key = {}
        for key, (q, k, v, options) in calls.items():
            replace = attn2.get(key)
            if replace is None:
                continue

            def stock(q=q, k=k, v=v, options=options):
                return comfy_attention.optimized_attention(
                    q, k, v, options["n_heads"], attn_precision=options.get("attn_precision"),
                    transformer_options=options)

            def hooked(q=q, k=k, v=v, options=options, replace=replace):
                return replace(q, k, v, options)

            with torch.inference_mode():
                per_key[key] = paired_overhead(stock, hooked, reps, device, before)
        results[name] = per_key
    return results


# --------------------------------------------------------------------------- reporting

def format_table(variants: Sequence[Variant], baseline: str, targets: dict[str, float] | None = None,
                 estimates: dict[str, float] | None = None, show_peak: bool = True) -> str:
    """A Markdown table per variant: median/min/max wall seconds; ratios to ``baseline`` of the
    median wall time (the headline), of the minimum wall time and of the median CPU time; an
    optional estimated ratio (from per-call measurements); the target and whether the median
    ratio meets it; the peak memory increase."""
    base = next(v for v in variants if v.name == baseline)
    targets = targets or {}
    peak = show_peak and any(v.peak_mib is not None for v in variants)
    head = ["variant", "median s", "min s", "max s", "ratio (median)", "ratio (min)",
            "ratio (CPU s)"]
    head += ["ratio (per-call est.)"] if estimates else []
    head += ["target", "met"] if targets else []
    head += ["peak mem +MiB"] if peak else []
    rows = [head, ["---"] + ["---:"] * (len(head) - 1)]
    for v in variants:
        ratio = v.median / base.median
        row = [v.name, f"{v.median:.3f}", f"{min(v.times):.3f}", f"{max(v.times):.3f}",
               f"{ratio:.3f}x", f"{min(v.times) / min(base.times):.3f}x",
               f"{v.cpu_median / base.cpu_median:.3f}x"]
        if estimates:
            row.append(f"{estimates[v.name]:.4f}x" if v.name in estimates else "")
        if targets:
            target = targets.get(v.name)
            row += [f"<= {target:.2f}x", "yes" if ratio <= target else "NO"] if target else ["", ""]
        if peak:
            row.append(f"{v.peak_mib:.0f}" if v.peak_mib is not None else "n/a")
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def footer(variants: Sequence[Variant], loads: Sequence[float], device: str, started: float,
           targets: dict[str, float] | None = None) -> str:
    """The report's last lines: whether the median-ratio targets are met, the contention warning,
    the peak GPU memory and the total time."""
    lines = []
    if targets:
        base = variants[0]
        missed = [n for n, t in targets.items()
                  if next(v for v in variants if v.name == n).median / base.median > t]
        lines.append("targets (median ratio): " + ("all met" if not missed else "MISSED: " + ", ".join(missed)))
    warning = contention_warning(loads, device, variants)
    if warning:
        lines.append(warning)
    if device == "cuda":
        lines.append(f"peak GPU memory (CUDA allocator, whole benchmark): "
                     f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    lines.append(f"whole benchmark: {time.perf_counter() - started:.0f}s")
    return "\n".join(lines)
