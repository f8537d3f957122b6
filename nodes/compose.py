"""Nodes that compose concepts learned separately."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..training.concept_file import save_concepts
from ..training.merge import merge_concept_sets
from .common import CATEGORY, NODE_PREFIX
from .concepts import Concepts, concept_path

log = logging.getLogger(__name__)


class MergeConcepts(io.ComfyNode):
    """Merges concept sets trained on different images into one set of K/V deltas."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}MergeConcepts",
            display_name="Merge Concepts",
            category=CATEGORY,
            description="Custom Diffusion's closed-form merge: every set's trigger words keep their "
                        "trained attention outputs while other text keeps the base model's, as far "
                        "as possible. Use it for concepts learned from different pictures.",
            inputs=[
                io.Model.Input("model", tooltip="The base model all sets were trained on."),
                io.Clip.Input("clip", tooltip="Its text encoder (features of the triggers and of "
                                              "the generic regulariser captions)."),
                Concepts.Input("concepts_1", tooltip="First concept set."),
                Concepts.Input("concepts_2", tooltip="Second concept set (triggers must differ)."),
                Concepts.Input("concepts_3", optional=True, tooltip="Optional third set."),
                io.String.Input("save_name", default="", optional=True,
                                tooltip="If set, write the merged set to models/concepts/<name>.safetensors."),
            ],
            outputs=[Concepts.Output(display_name="CONCEPTS", tooltip="The merged concept set; "
                                                                      "apply it like any other.")],
            is_output_node=True,  # may end a graph: merge-and-save needs nothing downstream
        )

    @classmethod
    def execute(cls, model, clip, concepts_1, concepts_2, concepts_3=None,
                save_name: str = "") -> io.NodeOutput:
        sets = [s for s in (concepts_1, concepts_2, concepts_3) if s is not None]
        merged = merge_concept_sets(model, clip, sets)
        if save_name.strip():
            path = concept_path(save_name)
            save_concepts(path, merged)
            log.info("merged concepts %s saved to %s", merged.describe(), path)
        return io.NodeOutput(merged)
