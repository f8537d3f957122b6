"""The demo workflow (example_workflows/toy_world_two_concepts_api.json) on the real server."""
from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image

from devkit.pack import REPO_ROOT

WEIGHTS = REPO_ROOT / "smallworld" / "weights"

WORKFLOW = REPO_ROOT / "example_workflows" / "toy_world_two_concepts_api.json"
SCENE = REPO_ROOT / "example_workflows" / "toy_world_scene.png"


def test_toy_world_weights_are_shipped():
    """The demo's base model is part of the product: a checkout without it is broken, not skipped."""
    for name in ("unet.safetensors", "clip_l.safetensors", "taesd.safetensors"):
        assert (WEIGHTS / name).is_file(), f"smallworld/weights/{name} is missing"


def test_toy_world_demo_workflow_learns_and_draws(comfy_server):
    shutil.copy2(SCENE, comfy_server.input_dir / SCENE.name)
    prompt = json.loads(WORKFLOW.read_text())
    prompt["train"]["inputs"]["steps"] = 10
    prompt["train"]["inputs"]["save_name"] = "toy_world_demo_test"
    result = comfy_server.run(prompt, timeout=600)
    assert result.ok, result.describe()

    images = {p.name: p for p in comfy_server.output_images(result)}
    prefixes = ("toy_demo_combined", "toy_demo_heatmaps", "toy_demo_training_maps", "toy_demo_loss",
                "toy_demo_v1_alone")
    for prefix in prefixes:
        assert any(name.startswith(prefix) for name in images), (prefix, sorted(images))
    combined = [np.asarray(Image.open(p)) for n, p in images.items() if n.startswith("toy_demo_combined")]
    assert len(combined) == 4 and combined[0].shape == (128, 128, 3)
    heatmaps = [n for n in images if n.startswith("toy_demo_heatmaps")]
    assert len(heatmaps) == 4 * 4  # 4 images x (V1, square, V2, diamond)
    assert (comfy_server.concepts_dir / "toy_world_demo_test.safetensors").is_file()
