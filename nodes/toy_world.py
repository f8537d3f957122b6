"""Demo nodes for the toy world: its tiny pretrained base model and its reference scenes."""
from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io

from ..smallworld import model as toy
from ..smallworld import scenes as sw
from .vocabulary import CATEGORY, EMBEDDINGS_FOLDER, NODE_PREFIX


class ToyWorldLoader(io.ComfyNode):
    """MODEL, CLIP and VAE of the toy world's shipped base model."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}ToyWorldLoader",
            display_name="Load Toy-World Model (demo)",
            category=f"{CATEGORY}/toy_world",
            description="A 13 M-parameter SD1.5-architecture model pretrained on 128 px scenes of "
                        "coloured, patterned shapes. Runs on a CPU in seconds; for demos and tests.",
            inputs=[],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        import folder_paths

        bundle = toy.load_bundle(embedding_directory=folder_paths.get_folder_paths(EMBEDDINGS_FOLDER))
        return io.NodeOutput(bundle.model, bundle.clip, bundle.vae)


class ToyWorldScene(io.ComfyNode):
    """One of the toy world's reference scenes: image, object masks and caption."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}ToyWorldScene",
            display_name="Toy-World Reference Scene (demo)",
            category=f"{CATEGORY}/toy_world",
            description="Draws a deterministic multi-object scene whose first object has a colour "
                        "and pattern the base model has no words for.",
            inputs=[
                io.Int.Input("index", default=0, min=0, max=9999,
                             tooltip="Which reference scene (the benchmark uses 0, 1, 2, ...)."),
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="The 128 px scene."),
                io.Mask.Output(display_name="MASKS", tooltip="One mask per object, left to right "
                                                             "as listed in the caption."),
                io.String.Output(display_name="caption", tooltip="Caption naming visible attributes."),
                io.String.Output(display_name="concepts",
                                 tooltip="'V1: shape' lines for Train Concepts, one per object."),
            ],
        )

    @classmethod
    def execute(cls, index: int) -> io.NodeOutput:
        scene = sw.reference_scenes(index + 1)[index]
        image = torch.from_numpy(scene.image.astype(np.float32) / 255.0)[None]
        masks = torch.from_numpy(scene.masks.astype(np.float32))
        lines = "\n".join(f"V{i + 1}: {obj.shape}" for i, obj in enumerate(scene.objects))
        return io.NodeOutput(image, masks, scene.caption, lines)
