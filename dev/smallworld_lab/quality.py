"""Base-model quality gate: does the toy model draw the shape and colour a prompt names?

Prompts name one object's colour and shape on a grey background ("a red circle on a grey
background"), every visible shape x colour pair (hidden combos excluded: they have no words);
each is sampled with fixed seeds through ComfyUI's own sampler and read back with
``readout.read_scene``. A sample counts for shape (colour) when exactly one object is found and its
shape (colour) is the named one. The gate passes when both rates reach ``GATE``.

The two-object gate (``two_object_gate``) prompts two solid objects of different shapes and
colours ("a red circle and a blue star on a grey background"); a sample counts when exactly two
objects are read and each named (shape, colour) is one of them. It passes at ``TWO_OBJECT_GATE``.

Pattern adherence (``pattern_adherence``, a diagnostic without a gate) prompts one patterned object
with its colour and pattern words ("a red striped circle on a grey background"): a concept's
pattern can hardly be learned more reliably than the base model draws a named one.

Hidden words (``hidden_words``, a diagnostic) names each hidden combo by both its words (a pair
pretraining never says), by its pattern word alone or by its colour word alone, and counts how often
the drawn object has the combo's colour and pattern: whether the words a new token could lean on
lead towards the combo or away from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np
import torch

from concept_attention.sampling.ksampler import empty_latent, run_ksampler
from concept_attention.smallworld import model as toy
from . import readout
from concept_attention.smallworld import scenes as sw

GATE = 0.80
TWO_OBJECT_GATE = 0.70


def encode(clip: Any, text: str) -> list:
    """ComfyUI conditioning for ``text``."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def generate(bundle: Any, prompt: str, seeds: Sequence[int], steps: int = 20, cfg: float = 5.0,
             negative: str = "", size: int = toy.IMAGE_SIZE) -> np.ndarray:
    """Images [len(seeds),H,W,3] in 0..1 from ComfyUI's KSampler path (euler, normal schedule)."""
    images = []
    with torch.inference_mode():
        positive, neg = encode(bundle.clip, prompt), encode(bundle.clip, negative)
        for seed in seeds:
            out = run_ksampler(bundle.model, seed, steps, cfg, "euler", "normal", positive, neg,
                               empty_latent(size))["samples"]
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


def two_object_prompts(count: int = 40, seed: int = 5) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """(prompt, ((shape, colour), (shape, colour))): seeded pairs with distinct shapes and colours."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        shapes = [sw.SHAPES[i] for i in rng.permutation(len(sw.SHAPES))[:2]]
        colours = [list(sw.COLOURS)[i] for i in rng.permutation(len(sw.COLOURS))[:2]]
        objects = [sw.ObjectSpec(s, c, "solid", 0, 0, 1) for s, c in zip(shapes, colours)]
        out.append((sw.caption_for(objects, "grey"), tuple(zip(shapes, colours))))
    return out


@dataclass
class TwoObjectReport:
    """Two-object prompts: how often exactly two objects are drawn, and both are right."""

    samples: int = 0
    two: int = 0
    both: int = 0
    rows: list = field(default_factory=list)

    def add(self, label: str, found: Sequence[Any], wanted: Sequence[tuple[str, str]]) -> None:
        """Score one picture: right when exactly two objects are read and they are the named ones."""
        drawn = sorted((o.shape, o.colour) for o in found)
        self.samples += 1
        self.two += len(found) == 2
        self.both += drawn == sorted(wanted)
        self.rows.append((label, drawn))

    def rate(self, name: str) -> float:
        """Fraction of samples with ``name`` (two, both)."""
        return getattr(self, name) / max(1, self.samples)

    @property
    def passed(self) -> bool:
        """Both objects right at or above the gate."""
        return self.rate("both") >= TWO_OBJECT_GATE

    def table(self) -> str:
        """Markdown summary."""
        return ("| samples | two objects | both right | gate (>= 70 %) |\n|---|---|---|---|\n"
                f"| {self.samples} | {self.rate('two'):.0%} | {self.rate('both'):.0%} | "
                f"{'pass' if self.passed else 'FAIL'} |")


def two_object_gate(weights_dir: Path = toy.WEIGHTS_DIR, seeds: int = 1, steps: int = 20,
                    prompts: Sequence[tuple[str, tuple]] | None = None) -> TwoObjectReport:
    """Sample every two-object prompt with ``seeds`` fixed seeds and score both objects."""
    bundle = toy.load_bundle(weights_dir)
    report = TwoObjectReport()
    for k, (prompt, wanted) in enumerate(prompts or two_object_prompts()):
        for image in generate(bundle, prompt, [5000 + k * seeds + j for j in range(seeds)], steps=steps):
            report.add(prompt, readout.read_scene(image), wanted)
    return report


def adherence_prompts(count: int = 40, seed: int = 9) -> list[tuple[str, str, str, str]]:
    """(prompt, shape, colour, pattern): seeded single objects whose colour and pattern are named."""
    rng = np.random.default_rng(seed)
    out: list[tuple[str, str, str, str]] = []
    while len(out) < count:
        shape = sw.SHAPES[rng.integers(len(sw.SHAPES))]
        colour = list(sw.COLOURS)[rng.integers(len(sw.COLOURS))]
        pattern = sw.PATTERNS[1 + rng.integers(len(sw.PATTERNS) - 1)]
        if (colour, pattern) in sw.HIDDEN_COMBOS:
            continue
        obj = sw.ObjectSpec(shape, colour, pattern, 0, 0, 1)
        out.append((f"{sw.object_phrase(obj, toy.IMAGE_SIZE)} on a grey background", shape, colour, pattern))
    return out


@dataclass
class AdherenceReport:
    """Named patterned objects: how often one object is drawn with the named colour, and pattern."""

    samples: int = 0
    colour: int = 0
    colour_pattern: int = 0
    pattern: int = 0
    rows: list[tuple[str, list[dict]]] = field(default_factory=list)

    def add(self, label: str, found: Sequence[Any], colours: Collection[str], patterns: Collection[str]) -> None:
        """Score one picture against the colours and patterns that count as right (exactly one object found)."""
        if isinstance(colours, str) or isinstance(patterns, str):
            raise TypeError("colours and patterns are collections of names, not one name")
        one = len(found) == 1
        colour = one and found[0].colour in colours
        pattern = one and found[0].pattern in patterns
        self.samples += 1
        self.colour += colour
        self.pattern += pattern
        self.colour_pattern += colour and pattern
        self.rows.append((label, [o.attributes() for o in found]))

    def table(self) -> str:
        """Markdown summary."""
        n = max(1, self.samples)
        return ("| samples | colour right | colour and pattern right |\n|---|---|---|\n"
                f"| {self.samples} | {self.colour / n:.0%} | {self.colour_pattern / n:.0%} |")


def pattern_adherence(weights_dir: Path = toy.WEIGHTS_DIR, seeds: int = 1, steps: int = 20,
                      count: int = 40) -> AdherenceReport:
    """Sample ``count`` adherence prompts with ``seeds`` fixed seeds each and score colour and pattern."""
    bundle = toy.load_bundle(weights_dir)
    report = AdherenceReport()
    for k, (prompt, _shape, colour, pattern) in enumerate(adherence_prompts(count)):
        for image in generate(bundle, prompt, [7000 + k * seeds + j for j in range(seeds)], steps=steps):
            report.add(prompt, readout.read_scene(image), {colour}, {pattern})
    return report


HIDDEN_WORD_KINDS = ("both words", "pattern word", "colour word")


def hidden_word_prompts() -> list[tuple[str, str, str, frozenset, frozenset]]:
    """(kind, shape, prompt, colours and patterns that count as the hidden combo's); no prompt twice.

    "both words" names a hidden pair, which pretraining never says; "pattern word" names a hidden
    pattern alone, which counts any hidden colour that pattern comes with (stripes: purple or
    yellow); "colour word" names a hidden colour alone. By default pretraining says none of these
    words of a hidden object (``sw.hidden_hints``).
    """
    out = []
    for shape in sw.SHAPES:
        for colour, pattern in sorted(sw.HIDDEN_COMBOS):
            both = f"{colour} {sw.PATTERN_WORDS[pattern]} {shape}"
            out.append(("both words", shape, both, frozenset({colour}), frozenset({pattern})))
        for pattern in sorted({p for _, p in sw.HIDDEN_COMBOS}):
            colours = frozenset(c for c, p in sw.HIDDEN_COMBOS if p == pattern)
            out.append(("pattern word", shape, f"{sw.PATTERN_WORDS[pattern]} {shape}", colours, frozenset({pattern})))
        for colour, pattern in sorted(sw.HIDDEN_COMBOS):
            patterns = frozenset(p for c, p in sw.HIDDEN_COMBOS if c == colour)
            out.append(("colour word", shape, f"{colour} {shape}", frozenset({colour}), patterns))
    return [(kind, shape, f"{sw.with_article(words)} on a grey background", colours, patterns)
            for kind, shape, words, colours, patterns in out]


@dataclass
class HiddenWordReport:
    """Per kind of prompt (``HIDDEN_WORD_KINDS``), an ``AdherenceReport`` against the hidden combos' looks."""

    kinds: dict[str, AdherenceReport] = field(default_factory=lambda: {k: AdherenceReport() for k in HIDDEN_WORD_KINDS})

    def table(self) -> str:
        """Markdown summary, one row per kind of prompt."""
        lines = ["| hidden combo named by | samples | drawn in its colour | in its pattern | both |",
                 "|---|---|---|---|---|"]
        for kind, r in self.kinds.items():
            n = max(1, r.samples)
            lines.append(f"| {kind} | {r.samples} | {r.colour / n:.0%} | {r.pattern / n:.0%} | "
                         f"{r.colour_pattern / n:.0%} |")
        return "\n".join(lines)


def hidden_words(weights_dir: Path = toy.WEIGHTS_DIR, seeds: int = 1, steps: int = 20) -> HiddenWordReport:
    """Sample every ``hidden_word_prompts`` prompt with ``seeds`` seeds, shared by the prompts of one shape."""
    bundle = toy.load_bundle(weights_dir)
    report = HiddenWordReport()
    for kind, shape, prompt, colours, patterns in hidden_word_prompts():
        first = 9000 + sw.SHAPES.index(shape) * seeds
        for image in generate(bundle, prompt, range(first, first + seeds), steps=steps):
            report.kinds[kind].add(prompt, readout.read_scene(image), colours, patterns)
    return report
