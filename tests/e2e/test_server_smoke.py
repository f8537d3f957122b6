"""Smoke tests against the real ComfyUI server: the pack loads, tiny workflows run, errors are clean."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from devkit import workflows
from devkit.server import PACK_FOLDER_NAME, ComfyServer, PromptRejected

PACK_PREFIX = "ConceptAttention_"
PACK_MODULE = f"custom_nodes.{PACK_FOLDER_NAME}"
SIZE = 256
STEPS = 4
MIN_PIXEL_STD = 2.0  # on the 0..255 scale; a constant image has 0


def _pack_import_lines(server: ComfyServer) -> str:
    return "\n".join(line for line in server.log_text().splitlines()
                     if PACK_FOLDER_NAME in line or "IMPORT FAILED" in line)


def test_object_info_lists_pack_and_test_nodes(comfy_server: ComfyServer) -> None:
    info = comfy_server.object_info()
    ours = {node_id: spec for node_id, spec in info.items() if node_id.startswith(PACK_PREFIX)}
    assert ours, (f"no node id starts with {PACK_PREFIX!r}; pack import lines in the server log:\n"
                  f"{_pack_import_lines(comfy_server)}")
    wrong_module = {node_id: spec.get("python_module") for node_id, spec in ours.items()
                    if spec.get("python_module") != PACK_MODULE}
    assert not wrong_module, f"expected python_module {PACK_MODULE!r}, got {wrong_module}"

    loader = info.get(workflows.TINY_LOADER)
    assert loader is not None, "the test-only loader node did not load"
    assert loader["output"] == ["MODEL", "CLIP", "VAE"]
    assert loader["input"]["required"]["architecture"][0] == ["sd15", "sdxl"] or \
        loader["input"]["required"]["architecture"][1].get("options") == ["sd15", "sdxl"]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_tiny_txt2img_saves_a_real_image(comfy_server: ComfyServer, arch: str) -> None:
    prompt = workflows.tiny_txt2img(arch, "a photo of a cat", seed=7, steps=STEPS, size=SIZE,
                                    filename_prefix=f"smoke_{arch}")
    result = comfy_server.run(prompt, timeout=180)
    assert result.ok, result.describe()
    assert result.progress, "no progress events were seen on the websocket"
    assert result.progress[-1]["value"] == result.progress[-1]["max"] == STEPS

    paths = comfy_server.output_images(result)
    assert len(paths) == 1, paths
    assert paths[0].is_file(), paths[0]
    assert paths[0].name.startswith(f"smoke_{arch}")
    with Image.open(paths[0]) as image:
        assert image.size == (SIZE, SIZE)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.std() > MIN_PIXEL_STD, f"image is (nearly) constant: std {pixels.std():.3f}"


def test_broken_prompts_are_rejected_and_server_keeps_working(comfy_server: ComfyServer) -> None:
    # An input left out: validation names the node and the missing input.
    missing_input = workflows.tiny_txt2img("sd15", size=64, steps=1, filename_prefix="broken")
    del missing_input["positive"]["inputs"]["text"]
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.queue(missing_input)
    assert rejected.value.status_code == 400
    assert "positive" in rejected.value.node_errors
    assert "required_input_missing" in str(rejected.value)
    assert "text" in str(rejected.value)

    # A node class that does not exist.
    unknown_class = workflows.tiny_txt2img("sd15", size=64, steps=1, filename_prefix="broken")
    unknown_class["decode"]["class_type"] = "ConceptAttention_NoSuchNode"
    with pytest.raises(PromptRejected, match="ConceptAttention_NoSuchNode does not exist"):
        comfy_server.queue(unknown_class)

    # Valid but fails while running: a corrupt LoRA file in the yaml-configured loras dir.
    (comfy_server.loras_dir / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    failing = workflows.tiny_txt2img("sd15", size=64, steps=1, filename_prefix="broken")
    failing["lora"] = workflows.node("LoraLoader", model=workflows.link("loader", 0),
                                     clip=workflows.link("loader", 1), lora_name="corrupt.safetensors",
                                     strength_model=1.0, strength_clip=1.0)
    failing["sampler"]["inputs"]["model"] = workflows.link("lora", 0)
    result = comfy_server.run(failing, timeout=120)
    assert result.status == "error", result.describe()
    assert result.error_node_id == "lora" and result.error_node_type == "LoraLoader"
    assert result.error_message and result.traceback

    # The server still runs the next good prompt.
    good = comfy_server.run(workflows.tiny_txt2img("sd15", size=64, steps=1, filename_prefix="after_error"),
                            timeout=120)
    assert good.ok, good.describe()
    assert comfy_server.output_images(good)[0].is_file()
    assert comfy_server.is_running()
