"""Every UI-format example workflow, converted to an API prompt and run on the real server (tiny models)."""
from __future__ import annotations

import pytest

from support.example_swaps import UI_WORKFLOWS, example_prompt, load_example, prepare_server
from devkit.server import ComfyServer, PromptResult
from support.ui_workflows import ui_to_api


@pytest.fixture(scope="module")
def object_info(comfy_server: ComfyServer) -> dict:
    """The server's node definitions (what the front end reads)."""
    return comfy_server.object_info()


@pytest.fixture(scope="module")
def prepared(comfy_server: ComfyServer, object_info: dict) -> dict[str, PromptResult]:
    """Pictures, adapter, concept files and exported LoRA the examples load (see prepare_server)."""
    return prepare_server(comfy_server, object_info)


def test_every_example_is_listed_and_converts(object_info):
    assert len(UI_WORKFLOWS) >= 15, UI_WORKFLOWS
    for name in UI_WORKFLOWS:
        prompt = ui_to_api(load_example(name), object_info)
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
        assert (comfy_server.base_dir / "models" / "loras" / "my_pair.safetensors").is_file()
    if name == "sd15_merge_concepts.json":
        assert (comfy_server.concepts_dir / "my_cat_and_dog.safetensors").is_file()
