"""Make an example workflow's API prompt runnable on CPU in seconds: tiny models, few steps, small sizes.

The example workflows name real model files (an SD1.5 / SDXL checkpoint, ViT-H CLIP vision,
IP-Adapter-Plus, a style LoRA); here those loaders become the test-only tiny ones (or the test's
tiny files), and steps and resolutions shrink. The graph's structure is left as the example has it.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
from PIL import Image

from devkit.pack import REPO_ROOT
from .tiny_adapters import tiny_sd15_plus
from .ui_workflows import ui_to_api
from devkit.workflows import TINY_LOADER, Prompt

EXAMPLES_DIR = REPO_ROOT / "example_workflows"
UI_WORKFLOWS = sorted(p.name for p in EXAMPLES_DIR.glob("*.json") if not p.name.endswith("_api.json"))
# Concept files other examples load, made by training through the learn example itself.
CONCEPT_FILES = {"my_pair": "V1: cat\nV2: dog", "my_cat": "V1: cat", "my_dog": "V2: dog"}

TINY_ADAPTER = "examples_tiny_plus.safetensors"  # written into models/nested_adapters by the test
TINY_LORA = "my_pair.safetensors"  # what sd15_export_concepts writes (from tiny-model concepts)
SIZE = 64  # pixels of every latent and training image
SAMPLER_STEPS = 4
TRAIN_STEPS = 2
SCALED_BY_8 = {"SolidMask": ("width", "height"), "MaskComposite": ("x", "y")}  # 512 px -> 64 px


def for_tiny_models(prompt: Prompt) -> Prompt:
    """A copy of ``prompt`` with tiny models, few steps and 64 px images."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            arch = "sdxl" if "xl" in inputs["ckpt_name"].lower() else "sd15"
            node.update(class_type=TINY_LOADER, inputs={"architecture": arch, "seed": 0})
        elif kind == "CLIPVisionLoader":
            node.update(class_type="ConceptTest_TinyClipVisionLoader", inputs={"seed": 0})
        elif kind == "ConceptAttention_LoadNestedAdapter":
            inputs["adapter_name"] = TINY_ADAPTER
        elif kind == "LoraLoader":
            inputs["lora_name"] = TINY_LORA
        elif kind == "ConceptAttention_TrainConcepts":
            inputs.update(steps=TRAIN_STEPS, resolution=SIZE, micro_batch=1, grad_accumulation=1)
        elif kind == "EmptyLatentImage":
            inputs.update(width=SIZE, height=SIZE, batch_size=1)
        elif kind in SCALED_BY_8:
            inputs.update({k: max(1, inputs[k] // 8) for k in SCALED_BY_8[kind]})
        if "steps" in inputs and kind != "ConceptAttention_TrainConcepts":
            inputs["steps"] = SAMPLER_STEPS
    return prompt


def write_example_inputs(input_dir: Path) -> None:
    """The pictures the examples load: a two-object scene, a photo with a painted mask, a reference."""
    input_dir.mkdir(parents=True, exist_ok=True)
    scene = np.full((SIZE, SIZE, 3), 128, dtype=np.uint8)
    scene[8:30, 6:28] = (220, 30, 30)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    scene[(yy - 44) ** 2 + (xx - 44) ** 2 < 12 ** 2] = (30, 60, 220)
    Image.fromarray(scene).save(input_dir / "my_two_concepts.png")
    photo = np.concatenate([scene[::-1], np.full((SIZE, SIZE, 1), 255, dtype=np.uint8)], axis=2)
    photo[16:48, 16:48, 3] = 0  # LoadImage's MASK is 1 - alpha: the painted (transparent) square
    Image.fromarray(photo, "RGBA").save(input_dir / "photo.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(input_dir / "reference_cat.png")


def load_example(name: str) -> dict[str, Any]:
    """The UI-format workflow ``example_workflows/<name>``."""
    return json.loads((EXAMPLES_DIR / name).read_text(encoding="utf-8"))


def example_prompt(name: str, object_info: dict[str, Any]) -> Prompt:
    """The example's API prompt (converted as the front end does), on tiny models."""
    return for_tiny_models(ui_to_api(load_example(name), object_info))


def prepare_server(server: Any, object_info: dict[str, Any]) -> dict[str, Any]:
    """Input pictures, the tiny adapter, the concept files (trained by the learn example) and the
    exported LoRA that the examples load; returns the learn and export runs by file name."""
    write_example_inputs(server.input_dir)
    adapter = server.model_dirs["nested_adapters"] / TINY_ADAPTER
    safetensors.torch.save_file(tiny_sd15_plus(seed=1), str(adapter))
    results = {}
    for stem, lines in CONCEPT_FILES.items():
        prompt = example_prompt("sd15_learn_two_concepts.json", object_info)
        (train,) = [n for n in prompt.values() if n["class_type"] == "ConceptAttention_TrainConcepts"]
        train["inputs"].update(concepts=lines, save_name=stem)
        result = server.run(prompt, timeout=600)
        assert result.ok, f"training {stem}: {result.describe()}"
        results.setdefault("sd15_learn_two_concepts.json", result)
    export = server.run(example_prompt("sd15_export_concepts.json", object_info), timeout=300)
    assert export.ok, export.describe()
    results["sd15_export_concepts.json"] = export
    return results
