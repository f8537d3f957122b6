"""Train, save, load, apply, export and interrupt through the real ComfyUI server."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from devkit.workflows import TINY_LOADER, link, node

TRAIN_STEPS = 3


@pytest.fixture(scope="module")
def scene(comfy_server) -> str:
    """A 128 px picture of a red square and a blue circle on grey, in the server's input folder."""
    pixels = np.full((128, 128, 3), 128, dtype=np.uint8)
    pixels[20:60, 16:56] = (220, 30, 30)
    yy, xx = np.mgrid[:128, :128]
    pixels[(yy - 84) ** 2 + (xx - 88) ** 2 < 22 ** 2] = (30, 60, 220)
    comfy_server.input_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(comfy_server.input_dir / "scene.png")
    return "scene.png"


def train_prompt(scene: str, save_name: str, steps: int = TRAIN_STEPS) -> dict:
    return {
        "loader": node(TINY_LOADER, architecture="sd15", seed=0),
        "image": node("LoadImage", image=scene),
        "train": node("ConceptAttention_TrainConcepts", model=link("loader", 0), clip=link("loader", 1),
                      vae=link("loader", 2), image=link("image", 0), concepts="V1: square\nV2: circle",
                      steps=steps, learning_rate=1e-3, resolution=128, seed=0, calibration=True,
                      attention_weight=0.01, save_name=save_name, micro_batch=1, grad_accumulation=1),
        "maps": node("SaveImage", images=link("train", 3), filename_prefix="maps"),
        "curve": node("SaveImage", images=link("train", 4), filename_prefix="curve"),
    }


def sample_prompt(concept_file: str, prompt: str, lora: str | None = None) -> dict:
    graph = {
        "loader": node(TINY_LOADER, architecture="sd15", seed=0),
        "concepts": node("ConceptAttention_LoadConcepts", concept_name=concept_file),
        "apply": node("ConceptAttention_ApplyConcepts", model=link("loader", 0), clip=link("loader", 1),
                      concepts=link("concepts"), strength=1.0),
        "positive": node("CLIPTextEncode", text=prompt, clip=link("apply", 1)),
        "negative": node("CLIPTextEncode", text="", clip=link("apply", 1)),
        "latent": node("EmptyLatentImage", width=128, height=128, batch_size=1),
        "sampler": node("KSampler", model=link("apply", 0), positive=link("positive"),
                        negative=link("negative"), latent_image=link("latent"), seed=1, steps=3,
                        cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0),
        "decode": node("VAEDecode", samples=link("sampler"), vae=link("loader", 2)),
        "save": node("SaveImage", images=link("decode"), filename_prefix="concept"),
    }
    if lora is not None:
        graph["lora"] = node("LoraLoader", model=link("apply", 0), clip=link("apply", 1),
                             lora_name=lora, strength_model=0.8, strength_clip=0.8)
        graph["sampler"]["inputs"]["model"] = link("lora", 0)
        graph["positive"]["inputs"]["clip"] = link("lora", 1)
        graph["negative"]["inputs"]["clip"] = link("lora", 1)
    return graph


def test_train_save_load_sample_and_stack_lora(comfy_server, scene):
    trained = comfy_server.run(train_prompt(scene, "e2e_pair"), timeout=600)
    assert trained.ok, trained.describe()
    concept_file = comfy_server.concepts_dir / "e2e_pair.safetensors"
    assert concept_file.is_file()
    images = comfy_server.output_images(trained)
    maps = [p for p in images if p.name.startswith("maps")]
    assert len(maps) == 4 and len(images) == 5  # trigger and class map per concept, loss curve
    with Image.open(maps[0]) as first:
        assert first.size == (32, 32)  # 128 px / 4

    sampled = comfy_server.run(sample_prompt("e2e_pair.safetensors", "a photo of V1 square"), timeout=300)
    assert sampled.ok, sampled.describe()
    (picture,) = comfy_server.output_images(sampled)
    with Image.open(picture) as image:
        assert image.size == (128, 128)

    # Export writes into the first folder ComfyUI knows (models/ under the base directory).
    models = comfy_server.base_dir / "models"
    exported = [models / "loras" / "e2e_pair.safetensors", models / "embeddings" / "V1.safetensors",
                models / "embeddings" / "V2.safetensors"]
    try:
        export = comfy_server.run({
            "concepts": node("ConceptAttention_LoadConcepts", concept_name="e2e_pair.safetensors"),
            "export": node("ConceptAttention_ExportConcepts", concepts=link("concepts"), name="e2e_pair",
                           rank=4),
        }, timeout=120)
        assert export.ok, export.describe()
        assert all(path.is_file() for path in exported)

        stacked = comfy_server.run(sample_prompt("e2e_pair.safetensors", "a photo of V2 circle",
                                                 lora="e2e_pair.safetensors"), timeout=300)
        assert stacked.ok, stacked.describe()
    finally:  # the session's server is shared: later tests export embeddings named V1 and V2 too
        for path in exported:
            path.unlink(missing_ok=True)


def test_interrupt_leaves_loadable_partial_concepts(comfy_server, scene):
    prompt_id = comfy_server.queue(train_prompt(scene, "e2e_partial", steps=400))
    comfy_server.wait_for_progress(prompt_id, min_value=2, timeout=300)
    comfy_server.interrupt()
    result = comfy_server.wait(prompt_id, timeout=300)
    assert result.status in ("interrupted", "error"), result.describe()
    partial = comfy_server.concepts_dir / "e2e_partial.safetensors"
    assert partial.is_file(), result.describe()
    loaded = comfy_server.run(sample_prompt("e2e_partial.safetensors", "a photo of V1 square"),
                              timeout=300)
    assert loaded.ok, loaded.describe()


def test_bad_concept_file_is_refused_and_server_keeps_serving(comfy_server):
    (comfy_server.concepts_dir / "broken.safetensors").write_bytes(b"not a safetensors file")
    broken = comfy_server.run(sample_prompt("broken.safetensors", "a photo of V1 square"), timeout=120)
    assert not broken.ok
    assert "broken.safetensors" in (broken.error_message or "")


def test_concepts_for_another_architecture_are_refused(comfy_server, scene):
    if not (comfy_server.concepts_dir / "e2e_pair.safetensors").is_file():
        assert comfy_server.run(train_prompt(scene, "e2e_pair"), timeout=600).ok
    graph = sample_prompt("e2e_pair.safetensors", "a photo of V1 square")
    graph["loader"]["inputs"]["architecture"] = "sdxl"
    refused = comfy_server.run(graph, timeout=120)
    assert not refused.ok
    assert "trained for a SD15 model" in refused.error_message
    assert "MODEL given is SDXL" in refused.error_message


def test_training_with_prior_images(comfy_server, scene):
    graph = train_prompt(scene, "")
    graph["prior"] = node("LoadImage", image=scene)
    graph["train"]["inputs"].update(prior_images=link("prior", 0),
                                    prior_captions="a photo of a square and a circle",
                                    generated_priors=1)
    result = comfy_server.run(graph, timeout=600)
    assert result.ok, result.describe()


def test_merge_two_separately_trained_sets_and_sample(comfy_server, scene):
    first = train_prompt(scene, "e2e_merge_a")
    first["train"]["inputs"]["concepts"] = "V1: square"
    second = train_prompt(scene, "e2e_merge_b")
    second["train"]["inputs"]["concepts"] = "V7: circle"
    second["train"]["inputs"]["seed"] = 1
    for prompt in (first, second):
        result = comfy_server.run(prompt, timeout=600)
        assert result.ok, result.describe()
    merge = {
        "loader": node(TINY_LOADER, architecture="sd15", seed=0),
        "a": node("ConceptAttention_LoadConcepts", concept_name="e2e_merge_a.safetensors"),
        "b": node("ConceptAttention_LoadConcepts", concept_name="e2e_merge_b.safetensors"),
        "merge": node("ConceptAttention_MergeConcepts", model=link("loader", 0), clip=link("loader", 1),
                      concepts_1=link("a"), concepts_2=link("b"), save_name="e2e_merged"),
    }
    merged = comfy_server.run(merge, timeout=300)
    assert merged.ok, merged.describe()
    assert (comfy_server.concepts_dir / "e2e_merged.safetensors").is_file()
    sampled = comfy_server.run(sample_prompt("e2e_merged.safetensors", "a photo of V1 square and V7 circle"),
                               timeout=300)
    assert sampled.ok, sampled.describe()


def concept_sampler_prompt(concept_file: str, composition: str, mask: bool = False,
                           inpaint: bool = False) -> dict:
    graph = sample_prompt(concept_file, "a photo of V1 square and V2 circle")
    graph["sampler"] = node("ConceptAttention_ConceptSampler", model=link("loader", 0),
                            concepts_1=link("concepts"), composition=composition, strength=1.0,
                            seed=1, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal",
                            positive=link("positive"), negative=link("negative"),
                            latent_image=link("latent"), denoise=1.0)
    if mask:
        graph["mask"] = node("SolidMask", value=1.0, width=128, height=128)
        graph["sampler"]["inputs"]["masks"] = link("mask")
    if inpaint:
        graph["region"] = node("SolidMask", value=1.0, width=64, height=128)
        graph["noise_mask"] = node("SetLatentNoiseMask", samples=link("latent"), mask=link("region"))
        graph["sampler"]["inputs"]["latent_image"] = link("noise_mask")
    return graph


@pytest.mark.parametrize("composition,mask,inpaint", [("combined", False, False), ("regional", True, False),
                                                      ("combined", False, True), ("off", False, False)])
def test_concept_sampler_modes_run_through_the_server(comfy_server, scene, composition, mask, inpaint):
    concept_file = comfy_server.concepts_dir / "e2e_sampler.safetensors"
    if not concept_file.is_file():
        trained = comfy_server.run(train_prompt(scene, "e2e_sampler"), timeout=600)
        assert trained.ok, trained.describe()
    result = comfy_server.run(concept_sampler_prompt("e2e_sampler.safetensors", composition, mask, inpaint),
                              timeout=300)
    assert result.ok, result.describe()
    (picture,) = comfy_server.output_images(result)
    with Image.open(picture) as image:
        assert image.size == (128, 128)


def test_regional_mode_without_masks_is_a_clear_error(comfy_server, scene):
    concept_file = comfy_server.concepts_dir / "e2e_sampler.safetensors"
    if not concept_file.is_file():
        assert comfy_server.run(train_prompt(scene, "e2e_sampler"), timeout=600).ok
    result = comfy_server.run(concept_sampler_prompt("e2e_sampler.safetensors", "regional"), timeout=300)
    assert not result.ok and "needs a MASK" in result.describe()


def test_regional_auto_finds_a_region_from_the_class_words(comfy_server, scene):
    concept_file = comfy_server.concepts_dir / "e2e_sampler.safetensors"
    if not concept_file.is_file():
        assert comfy_server.run(train_prompt(scene, "e2e_sampler"), timeout=600).ok
    graph = concept_sampler_prompt("e2e_sampler.safetensors", "regional_auto")
    graph["sampler"]["inputs"].update(clip=link("apply", 1), positive_text="a photo of V1 square and V2 circle",
                                      steps=4, auto_steps=0.5)
    graph["regions"] = node("MaskToImage", mask=link("sampler", 1))
    graph["save_regions"] = node("SaveImage", images=link("regions"), filename_prefix="regions")
    result = comfy_server.run(graph, timeout=300)
    assert result.ok, result.describe()
    pictures = {p.name.split("_")[0]: p for p in comfy_server.output_images(result)}
    with Image.open(pictures["regions"]) as image:
        region = np.asarray(image.convert("L"))
    assert region.shape == (128, 128)
    assert set(np.unique(region).tolist()) <= {0, 255}
    assert 0 < (region == 255).mean() < 1  # a region and a background
    with Image.open(pictures["concept"]) as image:
        assert image.size == (128, 128)
