"""Nodes that compose concepts learned separately."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..attention.patching import install_regional
from ..training.apply import apply_concepts
from ..training.concept_file import save_concepts
from ..training.concepts import check_compatible
from ..training.merge import merge_concept_sets
from .common import CATEGORY, NODE_PREFIX, ksampler_inputs, run_ksampler
from .concepts import Concepts, concept_path

MODES = ("off", "combined", "regional")

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


class ConceptSampler(io.ComfyNode):
    """KSampler that composes learned concepts: off, combined, or each in its own region."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}ConceptSampler",
            display_name="KSampler with Concepts",
            category=CATEGORY,
            description="Samples like KSampler with learned concepts' K/V deltas: 'off' is exactly "
                        "KSampler; 'combined' applies every set everywhere (as Apply Concepts); "
                        "'regional' applies each set only inside its mask. Encode the prompts with "
                        "a CLIP from Apply Concepts so the trigger words are known.",
            inputs=[
                io.Model.Input("model", tooltip="The BASE model (not one that already has these "
                                                "concepts applied)."),
                Concepts.Input("concepts_1", tooltip="First concept set."),
                io.Combo.Input("composition", options=list(MODES), default="combined",
                               tooltip="off = stock KSampler; combined = all deltas everywhere; "
                                       "regional = each set's deltas only inside its mask."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=2.0, step=0.01,
                               tooltip="Scale of the K/V deltas."),
                *ksampler_inputs(),
                Concepts.Input("concepts_2", optional=True, tooltip="Second concept set."),
                Concepts.Input("concepts_3", optional=True, tooltip="Third concept set."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Regional mode: one mask per connected concept set, in order "
                                      "(a MASK batch); white = where that set acts."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, model, concepts_1, composition: str, strength: float, seed: int, steps: int,
                cfg: float, sampler_name: str, scheduler: str, positive, negative, latent_image,
                denoise: float, concepts_2=None, concepts_3=None, masks=None) -> io.NodeOutput:
        sets = [s for s in (concepts_1, concepts_2, concepts_3) if s is not None]
        for concepts in sets:
            check_compatible(concepts, model, None)
        patched = model
        if composition == "combined":
            for concepts in sets:
                patched, _ = apply_concepts(patched, None, concepts, strength)
        elif composition == "regional":
            if masks is None:
                raise ValueError("regional composition needs a MASK batch with one mask per "
                                 "concept set (connect Load Image (as Mask) / mask nodes to 'masks')")
            if masks.dim() == 2:
                masks = masks[None]
            if masks.shape[0] != len(sets):
                raise ValueError(f"{len(sets)} concept sets are connected but 'masks' holds "
                                 f"{masks.shape[0]} masks: give exactly one per set, in order")
            patched = model.clone()
            install_regional(patched, [{k: strength * d for k, d in s.kv_deltas.items()} for s in sets],
                             masks.float())
        elif composition != "off":
            raise ValueError(f"unknown composition {composition!r}; use one of {MODES}")
        return io.NodeOutput(run_ksampler(patched, seed, steps, cfg, sampler_name, scheduler,
                                          positive, negative, latent_image, denoise))
