"""Node definitions as ``/object_info`` serves them, built in-process (no server, no browser).

ComfyUI is imported in library mode (``.comfyui`` or ``$COMFYUI_PATH``) with its built-in extra
nodes; this pack's nodes come from their V3 schemas. Used by ``build_example_workflows.py`` to know
each node's inputs, widgets and outputs in the order the front end uses.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def _import_comfy() -> Any:
    """ComfyUI's top-level ``nodes`` module with the built-in extra nodes registered."""
    sys.path.insert(0, str(REPO_ROOT / "dev"))
    from devkit.comfy_env import start  # the tests' start-up: same ComfyUI, CPU only

    start("cpu")
    import nodes

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # optional comfy_extras (audio...) may not import
    try:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    finally:
        logging.getLogger().setLevel(level)
    return nodes


def node_info(cls: type) -> dict[str, Any]:
    """One node's ``/object_info`` entry (V3 schema or classic ``INPUT_TYPES``)."""
    if hasattr(cls, "GET_NODE_INFO_V1"):
        return cls.GET_NODE_INFO_V1()
    inputs = cls.INPUT_TYPES()
    return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)}


def load_definitions() -> dict[str, dict[str, Any]]:
    """``{node type: object_info entry}`` for every stock node and every node of this pack."""
    nodes = _import_comfy()
    from concept_attention.nodes import node_list, register_model_folders

    register_model_folders()
    defs = {name: node_info(cls) for name, cls in nodes.NODE_CLASS_MAPPINGS.items()
            if name in USED_STOCK_NODES}
    for cls in node_list():
        info = cls.GET_NODE_INFO_V1()
        defs[info["name"]] = info
    return defs


# Stock nodes the examples use (the rest of NODE_CLASS_MAPPINGS is not needed).
USED_STOCK_NODES = {
    "CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode",
    "VAEEncode", "SaveImage", "PreviewImage", "LoadImage", "LoraLoader", "SetLatentNoiseMask",
    "VAEEncodeForInpaint", "CLIPVisionLoader", "SolidMask", "MaskComposite", "InvertMask",
    "MaskToImage", "ImageToMask", "ImageBatch", "PrimitiveStringMultiline",
}
