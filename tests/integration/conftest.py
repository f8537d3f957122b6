"""Library-mode fixtures: ComfyUI imported in-process, tiny random models, stock sampling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from devkit import tiny_models


@dataclass
class Conditioned:
    """A tiny bundle with encoded positive/negative prompts, ready for ``comfy.sample``."""

    bundle: tiny_models.TinyBundle
    arch: str

    def encode(self, text: str) -> list[list[Any]]:
        """CLIPTextEncode, as the stock node does it."""
        tokens = self.bundle.clip.tokenize(text)
        return self.bundle.clip.encode_from_tokens_scheduled(tokens)

    def sample(self, model: Any = None, prompt: str = "a photo of a cat and a dog", steps: int = 3,
               cfg: float = 5.0, seed: int = 0, size: int = 32, denoise: float = 1.0) -> torch.Tensor:
        """Sample exactly as the stock KSampler does (the pack's one sampling helper)."""
        from concept_attention.sampling.ksampler import run_ksampler

        latent = {"samples": torch.zeros(1, 4, size, size)}
        return run_ksampler(model or self.bundle.model, seed, steps, cfg, "euler", "normal",
                            self.encode(prompt), self.encode(""), latent, denoise)["samples"]


@pytest.fixture(scope="module")
def one_thread() -> Any:
    """Tiny tensors on a shared machine: one torch thread is faster and deterministic.

    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sd15() -> Conditioned:
    """Tiny SD1.5-architecture model, CLIP and VAE."""
    return Conditioned(tiny_models.build_bundle("sd15", seed=0), "sd15")


@pytest.fixture(scope="session")
def sdxl() -> Conditioned:
    """Tiny SDXL-architecture model, CLIP (clip_l + clip_g) and VAE."""
    return Conditioned(tiny_models.build_bundle("sdxl", seed=0), "sdxl")


@pytest.fixture(params=["sd15", "sdxl"])
def tiny(request: pytest.FixtureRequest) -> Conditioned:
    """Each tiny architecture in turn."""
    return request.getfixturevalue(request.param)
