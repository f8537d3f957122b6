"""Every UI-format example workflow, converted to an API prompt and run on the real server (tiny models)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch

from support.example_swaps import TINY_ADAPTER, for_tiny_models, write_example_inputs
from support.server import ComfyServer, PromptResult
from support.tiny_adapters import tiny_sd15_plus
from support.ui_workflows import ui_to_api

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "example_workflows"
UI_WORKFLOWS = sorted(p.name for p in EXAMPLES_DIR.glob("*.json") if not p.name.endswith("_api.json"))
# Concept files other examples load, made by training through the learn example itself.
CONCEPT_FILES = {"my_pair": "V1: cat\nV2: dog", "my_cat": "V1: cat", "my_dog": "V2: dog"}


def example_prompt(name: str, object_info: dict) -> dict:
    """The example's API prompt (converted like the front end does), on tiny models."""
    workflow = json.loads((EXAMPLES_DIR / name).read_text(encoding="utf-8"))
    return for_tiny_models(ui_to_api(workflow, object_info))


def by_class(prompt: dict, class_type: str) -> dict:
    """The inputs of the one node of ``class_type``."""
    (node,) = [n for n in prompt.values() if n["class_type"] == class_type]
    return node["inputs"]


@pytest.fixture(scope="module")
def object_info(comfy_server: ComfyServer) -> dict:
    """The server's node definitions (what the front end reads)."""
    return comfy_server.object_info()


@pytest.fixture(scope="module")
def prepared(comfy_server: ComfyServer, object_info: dict) -> dict[str, PromptResult]:
    """Input pictures, a tiny adapter, the concept files and the exported LoRA the examples use."""
    write_example_inputs(comfy_server.input_dir)
    adapter = comfy_server.model_dirs["nested_adapters"] / TINY_ADAPTER
    safetensors.torch.save_file(tiny_sd15_plus(seed=1), str(adapter))
    results = {}
    for stem, lines in CONCEPT_FILES.items():
        prompt = example_prompt("sd15_learn_two_concepts.json", object_info)
        by_class(prompt, "ConceptAttention_TrainConcepts").update(concepts=lines, save_name=stem)
        result = comfy_server.run(prompt, timeout=600)
        assert result.ok, f"training {stem}: {result.describe()}"
        results.setdefault("sd15_learn_two_concepts.json", result)
    export = comfy_server.run(example_prompt("sd15_export_concepts.json", object_info), timeout=300)
    assert export.ok, export.describe()
    results["sd15_export_concepts.json"] = export
    return results


def test_every_example_is_listed_and_converts(object_info):
    assert len(UI_WORKFLOWS) >= 15, UI_WORKFLOWS
    for name in UI_WORKFLOWS:
        prompt = ui_to_api(json.loads((EXAMPLES_DIR / name).read_text(encoding="utf-8")), object_info)
        assert prompt, name
        assert all(n["class_type"] in object_info for n in prompt.values()), name


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_example_runs_on_the_server(comfy_server, object_info, prepared, name):
    result = prepared.get(name) or comfy_server.run(example_prompt(name, object_info), timeout=600)
    assert result.ok, f"{name}: {result.describe()}"
    prompt = example_prompt(name, object_info)
    if any(n["class_type"] in ("SaveImage", "PreviewImage") for n in prompt.values()):
        images = comfy_server.output_images(result)
        assert images and all(p.is_file() for p in images), f"{name}: no images in {result.history}"
    if name == "sd15_export_concepts.json":
        assert (comfy_server.loras_dir / "my_pair.safetensors").is_file() or \
            (comfy_server.base_dir / "models" / "loras" / "my_pair.safetensors").is_file()
    if name == "sd15_merge_concepts.json":
        assert (comfy_server.concepts_dir / "my_cat_and_dog.safetensors").is_file()
