"""Every UI example workflow loaded in the real front end, converted by its own ``app.graphToPrompt()``
and queued (tiny models swapped in) until it completes."""
from __future__ import annotations

from typing import Any

import pytest

from support.example_swaps import UI_WORKFLOWS, for_tiny_models, load_example, prepare_server
from devkit.server import PACK_FOLDER_NAME, ComfyServer
from support.ui_workflows import ui_to_api

RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def examples_ready(browser_server: ComfyServer) -> dict[str, Any]:
    """The server's node definitions, once the files the examples load are in place."""
    object_info = browser_server.object_info()
    prepare_server(browser_server, object_info)
    return browser_server.object_info()  # again: the concept/LoRA lists now hold the new files


def front_end_prompt(comfy_page: Any, name: str) -> dict[str, Any]:
    """Fetch ``name`` as the template browser does, load it, and return ``app.graphToPrompt()``'s prompt."""
    return comfy_page.js("""async (url) => {
        const workflow = await (await fetch(url)).json();
        await app.loadGraphData(workflow, true, true, null);
        const {output} = await app.graphToPrompt();
        return output;
    }""", f"/api/workflow_templates/{PACK_FOLDER_NAME}/{name}")


def replacing_files(prompt: dict[str, Any]) -> dict[str, Any]:
    """The prompt with 'overwrite' on wherever a node has it: the preparation already ran the learn
    and export examples once, and running them again is meant to replace what they wrote."""
    for node in prompt.values():
        if "overwrite" in node["inputs"]:
            node["inputs"]["overwrite"] = True
    return prompt


def comparable(prompt: dict[str, Any]) -> dict[str, Any]:
    """Class and inputs of each node (the front end also sends titles as '_meta')."""
    return {key: {"class_type": n["class_type"], "inputs": n["inputs"]} for key, n in prompt.items()}


def test_every_example_loads_converts_and_runs_from_the_front_end(examples_ready, comfy_page):
    """One page for all examples (a page load costs more than a tiny run); every failure is listed."""
    listed = comfy_page.js("async () => (await (await fetch('/api/workflow_templates')).json())")
    assert set(UI_WORKFLOWS) <= {f"{n}.json" for n in listed.get(PACK_FOLDER_NAME, [])}, listed
    failures = []
    for name in UI_WORKFLOWS:
        workflow = load_example(name)
        prompt = comparable(front_end_prompt(comfy_page, name))
        if prompt != comparable(ui_to_api(workflow, examples_ready)):
            failures.append(f"{name}: the front end converts it differently from "
                            f"tests/support/ui_workflows.py: {prompt}")
            continue
        result = comfy_page.server.run(replacing_files(for_tiny_models(prompt)), timeout=RUN_TIMEOUT_S)
        if not result.ok:
            failures.append(f"{name}: {result.describe()}")
        elif (any(n["class_type"] in ("SaveImage", "PreviewImage") for n in prompt.values())
              and not comfy_page.server.output_images(result)):
            failures.append(f"{name}: no images")
    assert not failures, "\n".join(failures)
    assert comfy_page.log.pack_errors() == []
