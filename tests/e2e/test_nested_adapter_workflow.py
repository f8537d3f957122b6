"""Load Nested Adapter -> Nested Subject (Image) -> Apply Nested Attention -> KSampler, on the real server."""
from __future__ import annotations

import numpy as np
import safetensors.torch
from PIL import Image

from support.tiny_adapters import tiny_sd15_plus
from devkit.workflows import TINY_LOADER, link, node


def graph(strength: float, prefix: str) -> dict:
    return {
        "loader": node(TINY_LOADER, architecture="sd15", seed=0),
        "vision": node("ConceptTest_TinyClipVisionLoader", seed=0),
        "adapter": node("ConceptAttention_LoadNestedAdapter", adapter_name="e2e_tiny_plus.safetensors"),
        "image": node("LoadImage", image="subject.png"),
        "subject": node("ConceptAttention_NestedSubjectFromImage", adapter=link("adapter"),
                        clip_vision=link("vision"), image=link("image"), word="cat", strength=strength,
                        token_weight=1.0),
        "apply": node("ConceptAttention_ApplyNestedAttention", model=link("loader", 0), clip=link("loader", 1),
                      text="a photo of a cat", subject_1=link("subject"), exclusive=True, layers="all",
                      start_percent=0.0, end_percent=1.0),
        "negative": node("CLIPTextEncode", text="", clip=link("loader", 1)),
        "latent": node("EmptyLatentImage", width=64, height=64, batch_size=1),
        "sampler": node("KSampler", model=link("apply", 0), positive=link("apply", 1), negative=link("negative"),
                        latent_image=link("latent"), seed=1, steps=2, cfg=5.0, sampler_name="euler",
                        scheduler="normal", denoise=1.0),
        "decode": node("VAEDecode", samples=link("sampler"), vae=link("loader", 2)),
        "save": node("SaveImage", images=link("decode"), filename_prefix=prefix),
    }


def test_image_subject_workflow(comfy_server):
    folder = comfy_server.model_dirs["nested_adapters"]
    safetensors.torch.save_file(tiny_sd15_plus(seed=1), str(folder / "e2e_tiny_plus.safetensors"))
    comfy_server.input_dir.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(comfy_server.input_dir / "subject.png")
    results = {}
    for strength, prefix in ((1.0, "nested_image"), (0.0, "nested_off")):
        result = comfy_server.run(graph(strength, prefix), timeout=300)
        assert result.ok, result.describe()
        (picture,) = comfy_server.output_images(result)
        with Image.open(picture) as image:
            assert image.size == (64, 64)
            results[prefix] = np.asarray(image, dtype=np.int16)
    assert np.abs(results["nested_image"] - results["nested_off"]).max() > 0
