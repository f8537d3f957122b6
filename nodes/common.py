"""Pieces shared by the pack's nodes: naming, the stock KSampler inputs, input checks, parsers."""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from comfy_api.latest import io

log = logging.getLogger(__name__)


def overwrite_input(replaces: str) -> io.Boolean.Input:
    """The ``overwrite`` switch of every node that writes files (docs/reliability.md, "Files")."""
    return io.Boolean.Input("overwrite", default=False, optional=True,
                            tooltip=f"Off (default): if {replaces} already exists, nothing is written "
                                    "and the node stops with a message (before any work). On: "
                                    "REPLACES the existing file(s).")


def listed_model_path(folders: str | Sequence[str], name: str, input_name: str) -> str:
    """Full path of ``name`` as ComfyUI lists it in ``models/<folder>`` (the first folder that
    lists it); names not listed and links that lead out of the folder's paths are refused, naming
    the input."""
    import folder_paths

    from ..concepts.safe_files import inside_folder

    folders = [folders] if isinstance(folders, str) else list(folders)
    for folder in folders:
        if not isinstance(name, str) or name not in folder_paths.get_filename_list(folder):
            continue
        path = folder_paths.get_full_path_or_raise(folder, name)
        if not any(inside_folder(path, root) for root in folder_paths.get_folder_paths(folder)):
            raise ValueError(f"{input_name} {name!r} is a link to {os.path.realpath(path)}, outside "
                             f"models/{folder}: the pack does not follow links out of its folders; copy "
                             f"the file into models/{folder}")
        return path
    where = " or ".join(f"models/{folder}" for folder in folders)
    raise ValueError(f"{input_name} {name!r} is not a file in {where}: choose one of the listed files "
                     "(refresh the list if you just added it)")


def check_numbers(node: type[io.ComfyNode], values: Mapping[str, Any]) -> None:
    """Refuse a NaN, infinite or out-of-range number for any FLOAT/INT input of ``node``.

    The server checks the declared ranges, but NaN passes every comparison (and library callers
    are not checked at all), so each node calls this first with its arguments.
    """
    for spec in node.define_schema().inputs:
        if not isinstance(spec, (io.Float.Input, io.Int.Input)) or values.get(spec.id) is None:
            continue
        value = values[spec.id]
        low, high = spec.min, spec.max
        bounds = f" from {low:g} to {high:g}" if low is not None and high is not None else ""
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if (not number or not math.isfinite(value) or (low is not None and value < low)
                or (high is not None and value > high)):
            raise ValueError(f"'{spec.id}' must be a finite number{bounds}, got {value!r}: set it in "
                             f"the node (default {spec.default!r})")


def ksampler_inputs(with_positive: bool = True) -> list[io.Input]:
    """The stock KSampler's inputs (model excluded), with its defaults and ranges."""
    import comfy.samplers

    inputs: list[io.Input] = [
        io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                     tooltip="Random seed of the initial noise."),
        io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Number of denoising steps."),
        io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale."),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                       tooltip="Sampling algorithm."),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                       tooltip="Noise schedule."),
    ]
    if with_positive:
        inputs.append(io.Conditioning.Input("positive", tooltip="What to generate."))
    inputs += [
        io.Conditioning.Input("negative", tooltip="What to steer away from."),
        io.Latent.Input("latent_image", tooltip="The latent to denoise (empty latent or an "
                                                "encoded image, with an optional noise mask)."),
        io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="How much of the latent is replaced by noise (1.0 = all)."),
    ]
    return inputs


def split_words(text: str) -> list[str]:
    """Comma-separated words or phrases, stripped, empty ones dropped."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise ValueError("no words given: list the words of the prompt to look at, e.g. 'cat, dog'")
    return words


def check_latent(latent: Any, name: str = "latent_image") -> dict:
    """A LATENT input with finite 4-D/5-D samples, or an error naming the input and the fix."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise ValueError(f"'{name}' is not a LATENT: connect an Empty Latent Image or VAE Encode")
    if samples.ndim not in (4, 5) or samples.numel() == 0:
        raise ValueError(f"'{name}' has samples of shape {tuple(samples.shape)}; expected a "
                         "non-empty [batch, channels, height, width] latent")
    if not torch.isfinite(samples).all():
        raise ValueError(f"'{name}' contains NaN or infinite values: re-encode the image or check "
                         "the node that produced the latent (e.g. a VAE in fp16)")
    return latent


def check_sampled(latent: dict, node: str) -> dict:
    """Refuse a sampled latent with NaN or infinite values (it decodes to a black picture) and warn
    about one that is a single value everywhere (a flat picture): what a 'successful' run gave."""
    samples = latent["samples"]
    if not bool(torch.isfinite(samples).all()):
        raise ValueError(f"{node}: sampling produced NaN or infinite values, so the picture would be "
                         "black: lower 'strength' or 'cfg', check the concepts (load them again), or "
                         "run the model in fp32 (--force-fp32)")
    if samples.numel() > 1 and float(samples.amax() - samples.amin()) == 0.0:
        log.warning("%s: the sampled latent is one value everywhere (%.4g), so the picture is flat; "
                    "check the model and the concepts' strength", node, float(samples.flatten()[0]))
    return latent


def check_masks_finite(masks: Any, name: str = "masks") -> None:
    """Refuse a MASK input with NaN or infinite values, naming it."""
    if isinstance(masks, torch.Tensor) and not torch.isfinite(masks).all():
        raise ValueError(f"'{name}' contains NaN or infinite values: redraw or reload the masks")
