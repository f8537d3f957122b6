"""Stacks of our attention features and a stand-in other pack on the tiny models, for the
coexistence contract tests (tests/integration/test_coexistence*.py, docs/reliability.md,
"Coexistence").

A stack is written like ``"A,O,B"``: ``A`` and ``B`` are installs of ``support/attn2_pack.py``
with two different callbacks, ``O`` is one of our features (the map recorder, regional K/V deltas,
nested attention), applied left to right to the tiny model of an architecture.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

from concept_attention.attention.patching import install_hook, install_nested, install_regional, model_layers
from concept_attention.attention.recorder import AttentionRecorder, MapStore
from concept_attention.attention.tokens import locate_words
from concept_attention.sampling.nested_subjects import SubjectSpec, build_sources, encode_prompt
from support.attn2_pack import apply_pack, make_callback
from support.synthetic_concepts import synthetic_set

PROMPT = "a photo of a cat and a dog"
STEPS, SIZE = 2, 16  # two steps on a 16x16 latent (128 px): the smallest attention map is 2x2
PER_DEPTH = {"sd15": False, "sdxl": True}  # how the other pack keys each architecture
CALLS: Counter = Counter()
FOREIGN = {"A": make_callback("A", CALLS), "B": make_callback("B", CALLS)}
ARCHS = ["sd15", "sdxl"]
FEATURES = ["recorder", "regional", "nested"]
# Calls of the rest of the chain per layer call: the regional hook attends once per region (two)
# and once for the background, with the whole feature map each time when another pack's
# attention is below it.
PROCEED_CALLS = {"recorder": 1, "regional": 3, "nested": 1}


def sample(tiny: Any, model: Any, positive: Any = None, steps: int = STEPS) -> torch.Tensor:
    """comfy.sample.sample as the stock KSampler calls it."""
    import comfy.sample

    latent = torch.zeros(1, 4, SIZE, SIZE)
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive or tiny.encode(PROMPT),
                               tiny.encode(""), latent, seed=0, disable_pbar=True)


@dataclass
class Feature:
    """One of our patching features: how it installs on a MODEL and what it samples with."""

    install: Callable[[Any], Any]  # MODEL -> patched clone
    positive: Any = None
    stores: list | None = None  # map stores of the installed recorders, newest last


def make_feature(tiny: Any, name: str) -> Feature:
    if name == "recorder":
        stores: list[MapStore] = []
        tokens = [group[0] for group in locate_words(tiny.bundle.clip, PROMPT, ["cat", "dog"])]

        def install(model: Any) -> Any:
            patched, store = model.clone(), MapStore()
            store.set_tokens(tokens)
            install_hook(patched, AttentionRecorder(store=store), "all")
            stores.append(store)
            return patched

        return Feature(install, stores=stores)
    if name == "regional":
        sets = [synthetic_set(tiny.bundle, [t], seed, scale=0.3) for t, seed in (("V1", 1), ("V2", 2))]
        masks = torch.zeros(2, SIZE, SIZE)
        masks[0, :, : SIZE // 2], masks[1, :, SIZE // 2:] = 1, 1

        def install(model: Any) -> Any:
            patched = model.clone()
            install_regional(patched, [s.kv_deltas for s in sets], masks)
            return patched

        return Feature(install)
    conditioning, features = encode_prompt(tiny.bundle.clip, PROMPT)
    bank = 3 * torch.randn(8, features.shape[-1], generator=torch.Generator().manual_seed(5))
    sources = build_sources(tiny.bundle.clip, PROMPT, features, [SubjectSpec("cat", bank=bank)],
                            model_layers(tiny.bundle.model))

    def install(model: Any) -> Any:
        patched = model.clone()
        install_nested(patched, sources)
        return patched

    return Feature(install, positive=conditioning)


@dataclass
class Run:
    latent: torch.Tensor
    calls: Counter
    model: Any


class Stacks:
    """Builds and samples stacks like "A,O,B" (A, B: the other pack's installs; O: ours), cached."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.request = request
        self.features: dict[tuple[str, str], Feature] = {}
        self.runs: dict[tuple[str, str, str], Run] = {}

    def feature(self, arch: str, name: str) -> Feature:
        if (arch, name) not in self.features:
            self.features[arch, name] = make_feature(self.request.getfixturevalue(arch), name)
        return self.features[arch, name]

    def build(self, arch: str, name: str, order: str) -> Any:
        tiny = self.request.getfixturevalue(arch)
        model = tiny.bundle.model
        for step in order.split(","):
            model = (self.feature(arch, name).install(model) if step == "O"
                     else apply_pack(model, FOREIGN[step], PER_DEPTH[arch]))
        return model

    def run(self, arch: str, name: str, order: str) -> Run:
        if (arch, name, order) not in self.runs:
            tiny = self.request.getfixturevalue(arch)
            model = self.build(arch, name, order)
            CALLS.clear()
            latent = sample(tiny, model, self.feature(arch, name).positive)
            self.runs[arch, name, order] = Run(latent, Counter(CALLS), model)
        return self.runs[arch, name, order]


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Clearly different: by more than 0.1 % of the latent's range, far beyond float noise (the
    other pack's term moves the tiny models' latents, some hundreds in size, by tens)."""
    return float((a - b).abs().max()) > 1e-3 * float(a.abs().max())
