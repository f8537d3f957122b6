"""TEST-ONLY ComfyUI node pack: a loader for tiny random SD1.5/SDXL-architecture models.

Never shipped with Concept Attention. The e2e harness (``dev/devkit/server.py``) links this
folder into a temporary ``custom_nodes`` directory so the real ComfyUI server can run whole
workflows on CPU in seconds without any checkpoint on disk.
"""
from __future__ import annotations

import sys
from pathlib import Path

from comfy_api.latest import ComfyExtension, io

# ``devkit`` lives three levels up (dev/devkit/custom_nodes/...). resolve() follows the symlink the
# harness places in its custom_nodes dir, so this works wherever the link lives.
_DEV_DIR = Path(__file__).resolve().parents[3]
if str(_DEV_DIR) not in sys.path:
    sys.path.insert(0, str(_DEV_DIR))

from devkit import tiny_models  # noqa: E402


class TinyModelLoader(io.ComfyNode):
    """MODEL, CLIP and VAE of a tiny random model with a real SD1.5 or SDXL block layout."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptTest_TinyModelLoader",
            display_name="Tiny Model Loader (test only)",
            category="testing/concept_attention",
            description="Builds a tiny seeded random model with SD1.5's or SDXL's block layout. For tests only.",
            inputs=[
                io.Combo.Input("architecture", options=list(tiny_models.ARCHITECTURES), default="sd15",
                               tooltip="Which real block layout the tiny UNet and CLIP mirror."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the random weights; the same seed gives the same model."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, architecture: str, seed: int) -> io.NodeOutput:
        import folder_paths

        bundle = tiny_models.build_bundle(
            architecture, seed, embedding_directory=folder_paths.get_folder_paths("embeddings"))
        return io.NodeOutput(bundle.model, bundle.clip, bundle.vae)


class TinyClipVisionLoader(io.ComfyNode):
    """A tiny random CLIP vision model (ComfyUI's clip_vision classes) for image-adapter workflows."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConceptTest_TinyClipVisionLoader",
            display_name="Tiny CLIP Vision Loader (test only)",
            category="testing/concept_attention",
            description="Builds a tiny seeded random CLIP vision tower (56 px, width 24). For tests only.",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                                 tooltip="Seed of the random weights.")],
            outputs=[io.ClipVision.Output()],
        )

    @classmethod
    def execute(cls, seed: int) -> io.NodeOutput:
        return io.NodeOutput(tiny_models.build_clip_vision(seed))


class ConceptTestExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TinyModelLoader, TinyClipVisionLoader]


async def comfy_entrypoint() -> ConceptTestExtension:
    return ConceptTestExtension()
