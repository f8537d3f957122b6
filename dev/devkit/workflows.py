"""Small builders of API-format prompts (``{node_id: {"class_type": ..., "inputs": {...}}}``).

A link to another node's output is ``[node_id, output_index]``. Node ids are strings.
"""
from __future__ import annotations

from typing import Any

Prompt = dict[str, dict[str, Any]]

TINY_LOADER = "ConceptTest_TinyModelLoader"  # test-only node: dev/devkit/custom_nodes/concept_test_nodes


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    """One API-format node."""
    return {"class_type": class_type, "inputs": inputs}


def link(node_id: str, output_index: int = 0) -> list[Any]:
    """A reference to output ``output_index`` of node ``node_id``."""
    return [node_id, output_index]


def tiny_txt2img(arch: str = "sd15", prompt: str = "a photo of a cat", seed: int = 0, steps: int = 4,
                 size: int | tuple[int, int] = 256, filename_prefix: str = "tiny",
                 negative: str = "", cfg: float = 5.0, sampler: str = "euler",
                 scheduler: str = "normal", model_seed: int = 0) -> Prompt:
    """Tiny random model → CLIPTextEncode ×2 → EmptyLatentImage → KSampler → VAEDecode → SaveImage.

    Node ids: "loader", "positive", "negative", "latent", "sampler", "decode", "save".
    """
    width, height = (size, size) if isinstance(size, int) else size
    return {
        "loader": node(TINY_LOADER, architecture=arch, seed=model_seed),
        "positive": node("CLIPTextEncode", text=prompt, clip=link("loader", 1)),
        "negative": node("CLIPTextEncode", text=negative, clip=link("loader", 1)),
        "latent": node("EmptyLatentImage", width=width, height=height, batch_size=1),
        "sampler": node("KSampler", model=link("loader", 0), positive=link("positive"),
                        negative=link("negative"), latent_image=link("latent"), seed=seed, steps=steps,
                        cfg=cfg, sampler_name=sampler, scheduler=scheduler, denoise=1.0),
        "decode": node("VAEDecode", samples=link("sampler"), vae=link("loader", 2)),
        "save": node("SaveImage", images=link("decode"), filename_prefix=filename_prefix),
    }
