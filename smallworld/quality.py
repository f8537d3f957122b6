"""Base-model quality gate: does the toy model draw the shape and colour a prompt names?

Prompts name one object's colour and shape on a grey background ("a red circle on a grey
background"), every visible shape x colour pair (hidden combos excluded: they have no words);
each is sampled with fixed seeds through ComfyUI's own sampler and read back with
``readout.read_scene``. A sample counts for shape (colour) when exactly one object is found and its
shape (colour) is the named one. The gate passes when both rates reach ``GATE``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import model as toy
from . import readout
from . import scenes as sw

GATE = 0.80


def encode(clip: Any, text: str) -> list:
    """ComfyUI conditioning for ``text``."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def generate(bundle: Any, prompt: str, seeds: Sequence[int], steps: int = 20, cfg: float = 5.0,
             negative: str = "", size: int = toy.IMAGE_SIZE) -> np.ndarray:
    """Images [len(seeds),H,W,3] in 0..1 from ComfyUI's sampler (euler, normal schedule)."""
    import comfy.sample

    images = []
    with torch.inference_mode():
        positive, neg = encode(bundle.clip, prompt), encode(bundle.clip, negative)
        for seed in seeds:
            latent = torch.zeros(1, 4, size // 8, size // 8)
            noise = comfy.sample.prepare_noise(latent, seed)
            out = comfy.sample.sample(bundle.model, noise, steps, cfg, "euler", "normal", positive,
                                      neg, latent, seed=seed, disable_pbar=True)
            images.append(bundle.vae.decode(out)[0].float().cpu().numpy())
    return np.stack(images)


def gate_prompts() -> list[tuple[str, str, str]]:
    """(prompt, shape, colour) for every shape x colour pair, solid, on grey."""
    return [(f"{sw.object_phrase(sw.ObjectSpec(s, c, 'solid', 0, 0, 1), 128)} on a grey background", s, c)
            for s in sw.SHAPES for c in sw.COLOURS]


@dataclass
class GateReport:
    """Per-attribute accuracy over all gate samples."""

    samples: int = 0
    shape: int = 0
    colour: int = 0
    count: int = 0
    rows: list = field(default_factory=list)

    def add(self, label: str, found: Sequence[Any], shape: str, colour: str) -> None:
        """Score one read-back picture: right only when exactly one object is found."""
        one = len(found) == 1
        self.samples += 1
        self.count += one
        self.shape += one and found[0].shape == shape
        self.colour += one and found[0].colour == colour
        self.rows.append((label, [o.attributes() for o in found]))

    def rate(self, name: str) -> float:
        """Fraction of samples right on ``name`` (shape, colour or count)."""
        return getattr(self, name) / max(1, self.samples)

    @property
    def passed(self) -> bool:
        """Shape and colour both at or above the gate."""
        return self.rate("shape") >= GATE and self.rate("colour") >= GATE

    def table(self) -> str:
        """Markdown summary."""
        return ("| samples | one object | shape right | colour right | gate (>= 80 %) |\n"
                "|---|---|---|---|---|\n"
                f"| {self.samples} | {self.rate('count'):.0%} | {self.rate('shape'):.0%} | "
                f"{self.rate('colour'):.0%} | {'pass' if self.passed else 'FAIL'} |")


def quality_gate(weights_dir: Path = toy.WEIGHTS_DIR, seeds: int = 2, steps: int = 20,
                 prompts: Sequence[tuple[str, str, str]] | None = None) -> GateReport:
    """Sample every gate prompt with ``seeds`` fixed seeds and score shape and colour."""
    bundle = toy.load_bundle(weights_dir)
    report = GateReport()
    for k, (prompt, shape, colour) in enumerate(prompts or gate_prompts()):
        images = generate(bundle, prompt, [1000 + k * seeds + j for j in range(seeds)], steps=steps)
        for image in images:
            report.add(prompt, readout.read_scene(image), shape, colour)
    return report


def roundtrip_report(weights_dir: Path = toy.WEIGHTS_DIR) -> GateReport:
    """The VAE's own ceiling for the gate: every gate object drawn, encoded, decoded and read back."""
    bundle = toy.load_bundle(weights_dir)
    report = GateReport()
    for _prompt, shape, colour in gate_prompts():
        drawn = sw.draw_scene([sw.ObjectSpec(shape, colour, "solid", 64, 64, 48)], "grey")
        pixels = torch.from_numpy(drawn.image).float()[None] / 255.0
        with torch.inference_mode():
            image = bundle.vae.decode(bundle.vae.encode(pixels))[0].float().cpu().numpy()
        report.add(f"VAE round trip: {colour} {shape}", readout.read_scene(image), shape, colour)
    return report
