"""Train with a nested-attention token bank and sample with it, through the real ComfyUI server."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from devkit.workflows import TINY_LOADER, link, node

PROMPT = "a photo of V1 square"


def _scene(comfy_server) -> str:
    """A 64 px red square and blue square on grey, in the server's input folder."""
    pixels = np.full((64, 64, 3), 128, dtype=np.uint8)
    pixels[8:30, 6:28] = (220, 30, 30)
    pixels[34:58, 36:60] = (30, 60, 220)
    comfy_server.input_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(comfy_server.input_dir / "bank_scene.png")
    return "bank_scene.png"


def _sampler(model: list, positive: list) -> dict:
    return node("KSampler", model=model, positive=positive, negative=link("negative"),
                latent_image=link("latent"), seed=1, steps=3, cfg=5.0, sampler_name="euler",
                scheduler="normal", denoise=1.0)


def test_trained_token_bank_drives_nested_attention(comfy_server):
    from concept_attention.concepts.concept_file import load_concepts

    graph = {
        "loader": node(TINY_LOADER, architecture="sd15", seed=0),
        "image": node("LoadImage", image=_scene(comfy_server)),
        "train": node("ConceptAttention_TrainConcepts", model=link("loader", 0), clip=link("loader", 1),
                      vae=link("loader", 2), image=link("image", 0), concepts="V1: square\nV2: circle",
                      caption="photo of a V1 square and V2 circle", steps=3, learning_rate=1e-3,
                      resolution=64, seed=0, calibration=True, attention_weight=0.01,
                      save_name="e2e_bank", micro_batch=1, grad_accumulation=1, token_bank=4),
        "subject": node("ConceptAttention_NestedSubjectFromConcepts", concepts=link("train", 2),
                        trigger="V1", strength=1.0, token_weight=1.0),
        "nested": node("ConceptAttention_ApplyNestedAttention", model=link("train", 0),
                       clip=link("train", 1), text=PROMPT, subject_1=link("subject"), exclusive=True,
                       layers="all", start_percent=0.0, end_percent=1.0),
        "positive": node("CLIPTextEncode", text=PROMPT, clip=link("train", 1)),
        "negative": node("CLIPTextEncode", text="", clip=link("train", 1)),
        "latent": node("EmptyLatentImage", width=64, height=64, batch_size=1),
        "sample_nested": _sampler(link("nested", 0), link("nested", 1)),
        "sample_plain": _sampler(link("train", 0), link("positive")),
        "decode_nested": node("VAEDecode", samples=link("sample_nested"), vae=link("loader", 2)),
        "decode_plain": node("VAEDecode", samples=link("sample_plain"), vae=link("loader", 2)),
        "save_nested": node("SaveImage", images=link("decode_nested"), filename_prefix="bank_nested"),
        "save_plain": node("SaveImage", images=link("decode_plain"), filename_prefix="bank_plain"),
    }
    result = comfy_server.run(graph, timeout=600)
    assert result.ok, result.describe()
    images = {p.name.split("_0")[0]: p for p in comfy_server.output_images(result)
              if p.name.startswith("bank_")}
    assert set(images) == {"bank_nested", "bank_plain"}, images
    with Image.open(images["bank_nested"]) as a, Image.open(images["bank_plain"]) as b:
        nested, plain = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    assert nested.shape == plain.shape == (64, 64, 3)
    assert np.abs(nested - plain).max() > 0, "the token bank did not change the image"

    concepts = load_concepts(comfy_server.concepts_dir / "e2e_bank.safetensors")
    assert [tuple(c.bank.shape) for c in concepts.concepts] == [(4, 32), (4, 32)]
    assert all(bool(torch.isfinite(c.bank).all()) for c in concepts.concepts)
    assert concepts.metadata["settings"]["token_bank"] == 4
