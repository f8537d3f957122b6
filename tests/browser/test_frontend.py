"""The front-end extension in a real browser against the real server: loading, live training panel,
trigger completions, and the read-only concept route."""
from __future__ import annotations

import time
import urllib.parse

import numpy as np
import pytest
import requests
from PIL import Image

from support.concept_files import write_broken_file, write_concept_file
from devkit.workflows import TINY_LOADER, link, node

EXTENSION = "concept_attention.ui"
SCRIPT = "/extensions/comfyui-concept-attention/js/concept_attention.js"
TRAIN_STEPS = 3
RUN_TIMEOUT_S = 300


def add_node(page, class_type: str, x: int = 100, y: int = 100) -> int:
    """Add a node of ``class_type`` to the page's graph; returns its id."""
    return page.js("""([type, x, y]) => {
        const n = LiteGraph.createNode(type);
        n.pos = [x, y];
        app.graph.add(n);
        app.canvas.setDirty(true, true);
        return n.id;
    }""", [class_type, x, y])


def empty_graph(page) -> None:
    """Start from an empty graph (the front end restores the profile's last workflow)."""
    page.js("() => { app.graph.clear(); app.canvas.setDirty(true, true); }")


def test_extension_loads_without_errors_and_ignores_foreign_messages(comfy_page):
    empty_graph(comfy_page)
    listed = requests.get(f"{comfy_page.server.url}/extensions", timeout=30).json()
    assert SCRIPT in listed
    assert comfy_page.js("(name) => app.extensions.some(e => e.name === name)", EXTENSION)
    # Messages for nodes that are not in the graph, or are not Train Concepts, change nothing.
    stock = add_node(comfy_page, "EmptyLatentImage")
    comfy_page.js("""(ids) => {
        for (const id of ids) {
            window.comfyAPI.api.api.dispatchCustomEvent("concept_attention.training",
                {node: String(id), step: 1, total: 2, losses: {step: [1], loss: [0.5]}, maps: []});
        }
        window.comfyAPI.api.api.dispatchCustomEvent("concept_attention.training", null);
    }""", [stock, 9999])
    assert comfy_page.js("() => app.graph.nodes.filter(n => n.conceptAttentionPanel).length") == 0
    assert comfy_page.js("() => window.conceptAttention.lastUpdate(9999).step") == 1
    # The panel is display only: never in the API prompt, nor in the saved widget values.
    train = add_node(comfy_page, "ConceptAttention_TrainConcepts", 400, 80)
    saved = comfy_page.js("""async (id) => {
        const node = app.graph.getNodeById(id);
        const prompt = await app.graphToPrompt();
        return {inputs: Object.keys(prompt.output[String(id)].inputs),
                values: node.serialize().widgets_values.length,
                widgets: node.widgets.filter(w => w.name !== 'live_training').length};
    }""", train)
    assert "live_training" not in saved["inputs"] and "steps" in saved["inputs"]
    assert saved["values"] == saved["widgets"]
    time.sleep(0.5)
    assert comfy_page.log.pack_errors() == []


@pytest.fixture(scope="module")
def scene(browser_server) -> str:
    """A 128 px picture of a red square and a blue circle, in the server's input folder."""
    pixels = np.full((128, 128, 3), 128, dtype=np.uint8)
    pixels[20:60, 16:56] = (220, 30, 30)
    yy, xx = np.mgrid[:128, :128]
    pixels[(yy - 84) ** 2 + (xx - 88) ** 2 < 22 ** 2] = (30, 60, 220)
    browser_server.input_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(browser_server.input_dir / "browser_scene.png")
    return "browser_scene.png"


def test_live_panel_shows_loss_and_maps_of_a_training_run(comfy_page, scene, tmp_path):
    empty_graph(comfy_page)
    train_id = add_node(comfy_page, "ConceptAttention_TrainConcepts", 400, 80)
    assert comfy_page.js("() => document.querySelectorAll('.concept-attention-live').length") == 1
    panel_of = "app.graph.getNodeById(id).conceptAttentionPanel"
    prompt = {
        "900": node(TINY_LOADER, architecture="sd15", seed=0),
        "901": node("LoadImage", image=scene),
        str(train_id): node("ConceptAttention_TrainConcepts", model=link("900", 0), clip=link("900", 1),
                            vae=link("900", 2), image=link("901", 0), concepts="V1: square\nV2: circle",
                            steps=TRAIN_STEPS, learning_rate=1e-3, resolution=128, seed=0,
                            calibration=True, attention_weight=0.01, save_name="", micro_batch=1,
                            grad_accumulation=1),
        "902": node("PreviewImage", images=link(str(train_id), 4)),
    }
    status, body = comfy_page.js("""async (prompt) => {
        const r = await fetch("/prompt", {method: "POST", headers: {"Content-Type": "application/json"},
            body: JSON.stringify({prompt, client_id: window.comfyAPI.api.api.clientId})});
        return [r.status, await r.json()];
    }""", prompt)
    assert status == 200, body
    comfy_page.page.wait_for_function(f"(id) => {panel_of}.dataset.done === 'true'", arg=train_id,
                                      timeout=RUN_TIMEOUT_S * 1000)

    deadline = time.monotonic() + 60
    while (entry := comfy_page.server.history(body["prompt_id"])) is None or not entry.get("status", {}).get("completed"):
        assert time.monotonic() < deadline, f"the prompt did not finish: {entry}"
        time.sleep(0.5)
    time.sleep(0.5)  # the run is over: the panel must keep what it showed
    panel = comfy_page.js(f"""(id) => {{
        const p = {panel_of};
        return {{data: {{...p.dataset}}, status: p.querySelector('.ca-status').textContent,
                maps: [...p.querySelectorAll('img')].map(i => [i.alt, i.naturalWidth]),
                inked: (() => {{ const c = p.querySelector('canvas');
                                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                                let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }})()}};
    }}""", train_id)
    comfy_page.page.screenshot(path=str(tmp_path / "live_panel.png"))
    assert panel["data"]["step"] == str(TRAIN_STEPS) and panel["data"]["points"] == str(TRAIN_STEPS)
    assert f"step {TRAIN_STEPS}/{TRAIN_STEPS}" in panel["status"] and "loss" in panel["status"]
    assert [alt for alt, _ in panel["maps"]] == ["V1", "V2", "square", "circle"]
    assert all(width > 0 for _, width in panel["maps"])
    assert panel["inked"] > 0
    assert comfy_page.js("(id) => window.conceptAttention.lastUpdate(id).losses.loss.length",
                         train_id) == TRAIN_STEPS
    assert comfy_page.log.pack_errors() == []


@pytest.fixture
def concept_files(browser_server):
    """A good concept file (Zq1 teapot, Zq2 lamp) and a damaged one in the server's models/concepts."""
    good = write_concept_file(browser_server.concepts_dir / "browser_pair.safetensors",
                              [("Zq1", "teapot"), ("Zq2", "lamp")])
    broken = write_broken_file(browser_server.concepts_dir / "browser_broken.safetensors")
    yield good.name, broken.name
    good.unlink(missing_ok=True)
    broken.unlink(missing_ok=True)


def test_concept_route_lists_triggers_and_rejects_other_names(browser_server, concept_files):
    good, broken = concept_files
    listing = requests.get(f"{browser_server.url}/api/concept_attention/concepts", timeout=30)
    entries = {e["name"]: e for e in listing.json()["concepts"]}
    assert entries[good]["triggers"] == ["Zq1", "Zq2"] and entries[good]["classes"] == ["teapot", "lamp"]
    assert entries[broken]["error"] and entries[broken]["triggers"] == []
    one = requests.get(f"{browser_server.url}/concept_attention/concept", params={"name": good}, timeout=30)
    assert one.status_code == 200 and one.json()["triggers"] == ["Zq1", "Zq2"]
    for name in ("../extra_model_paths.yaml", f"../concepts/{good}", "..%2Fserver.log", "/etc/passwd",
                 f"./{good}", ""):
        answer = requests.get(f"{browser_server.url}/concept_attention/concept?name="
                              f"{urllib.parse.quote(name, safe='')}", timeout=30)
        assert answer.status_code == 404, name
        assert "triggers" not in answer.json()


def test_prompt_box_offers_trigger_completions(concept_files, comfy_page):
    empty_graph(comfy_page)
    encode = add_node(comfy_page, "CLIPTextEncode", 120, 420)
    comfy_page.js("""(id) => {
        const box = app.graph.getNodeById(id).widgets.find(w => w.name === 'text').inputEl;
        box.value = 'a photo of ';
        box.focus();
        box.setSelectionRange(box.value.length, box.value.length);
    }""", encode)
    comfy_page.page.keyboard.type("zq")
    items = comfy_page.page.locator(".concept-attention-completions .ca-item")
    items.first.wait_for(timeout=30_000)
    texts = [t.split(good_name := concept_files[0])[0] for t in items.all_inner_texts()]
    assert [t.strip() for t in texts] == ["Zq1 teapot", "Zq2 lamp"], good_name
    comfy_page.page.keyboard.press("ArrowDown")
    comfy_page.page.keyboard.press("Enter")
    value = comfy_page.js("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'text').value",
                          encode)
    assert value == "a photo of Zq2 lamp"
    assert comfy_page.js("() => document.querySelectorAll('.concept-attention-completions').length") == 0
    assert comfy_page.log.pack_errors() == []
