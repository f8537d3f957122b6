"""Nodes that compose concepts learned separately."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..concepts.concept_file import save_concepts
from ..concepts.concept_set import check_compatible
from ..concepts.merge import merge_concept_sets
from ..sampling.composition import MODES, Composition, sample_composed
from .common import (check_latent, check_masks_finite, check_numbers, check_sampled, ksampler_inputs,
                     overwrite_input)
from .concepts import concept_path
from .vocabulary import CATEGORY, NODE_PREFIX, ConceptsSocket

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
                ConceptsSocket.Input("concepts_1", tooltip="First concept set."),
                ConceptsSocket.Input("concepts_2", tooltip="Second concept set (triggers must differ)."),
                ConceptsSocket.Input("concepts_3", optional=True, tooltip="Optional third set."),
                io.String.Input("save_name", default="", optional=True,
                                tooltip="If set, write the merged set to models/concepts/<name>.safetensors."),
                overwrite_input("models/concepts/<save_name>.safetensors"),
            ],
            outputs=[ConceptsSocket.Output(display_name="CONCEPTS", tooltip="The merged concept set; "
                                                                      "apply it like any other.")],
            is_output_node=True,  # may end a graph: merge-and-save needs nothing downstream
        )

    @classmethod
    def execute(cls, model, clip, concepts_1, concepts_2, concepts_3=None,
                save_name: str = "", overwrite: bool = False) -> io.NodeOutput:
        sets = [s for s in (concepts_1, concepts_2, concepts_3) if s is not None]
        path = concept_path(save_name, overwrite=overwrite) if save_name.strip() else None
        merged = merge_concept_sets(model, clip, sets)
        if path is not None:
            save_concepts(path, merged, overwrite=overwrite)
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
                        "'regional' applies each set only inside its mask; 'regional_auto' finds the "
                        "regions itself from the class words' attention over the first steps "
                        "(and by default samples again from the start with them, auto_restart). "
                        "In the regional modes each region can read the prompt without the other "
                        "sets' concepts (region_texts). Encode the prompts with a CLIP from Apply "
                        "Concepts so the trigger words are known.",
            inputs=[
                io.Model.Input("model", tooltip="The BASE model (not one that already has these "
                                                "concepts applied)."),
                ConceptsSocket.Input("concepts_1", tooltip="First concept set."),
                io.Combo.Input("composition", options=list(MODES), default="combined",
                               tooltip="off = stock KSampler; combined = all deltas everywhere; "
                                       "regional = each set's deltas only inside its mask; "
                                       "regional_auto = regions from the class words' maps."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=2.0, step=0.01,
                               tooltip="Scale of the K/V deltas."),
                *ksampler_inputs(),
                ConceptsSocket.Input("concepts_2", optional=True, tooltip="Second concept set."),
                ConceptsSocket.Input("concepts_3", optional=True, tooltip="Third concept set."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Regional mode: one mask per connected concept set, in order "
                                      "(a MASK batch); white = where that set acts."),
                io.Clip.Input("clip", optional=True,
                              tooltip="regional_auto: the CLIP that encoded 'positive' (with the "
                                      "triggers, e.g. from Apply Concepts), to find the class words."),
                io.String.Input("positive_text", multiline=True, default="", optional=True,
                                tooltip="regional_auto: the text of the positive prompt, written "
                                        "'V1 cat ... V2 dog' (each trigger before its class)."),
                io.Float.Input("auto_steps", default=0.3, min=0.05, max=0.95, step=0.05, optional=True,
                               tooltip="regional_auto: fraction of the steps sampled with all sets "
                                       "everywhere while the class-word maps are recorded."),
                io.Float.Input("region_threshold", default=0.4, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="regional_auto: a pixel joins its strongest class word's region "
                                       "if that normalised map reaches this value, else background."),
                io.Boolean.Input("region_texts", default=True, optional=True,
                                 tooltip="Regional modes: each region reads the positive text without "
                                         "the other sets' concepts (trigger, class word and article: "
                                         "'a V2 dog'), so it neither takes their look nor draws them "
                                         "(needs 'clip' and 'positive_text'; without them regions read "
                                         "the whole prompt)."),
                io.Boolean.Input("auto_restart", default=True, optional=True,
                                 tooltip="regional_auto: after the first steps have found the regions, "
                                         "sample again from the first step with the regions in place, "
                                         "so each concept is drawn in its region from the start (the "
                                         "first steps, every set everywhere, often leave a blend the "
                                         "regions cannot undo); costs the auto_steps once more. Off = "
                                         "go on from where the first steps stopped."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT"),
                     io.Mask.Output(display_name="regions",
                                    tooltip="Where each concept set acted (one mask per set): the "
                                            "given masks, the automatic ones, all white when "
                                            "combined, all black when off.")],
        )

    @classmethod
    def execute(cls, model, concepts_1, composition: str, strength: float, seed: int, steps: int,
                cfg: float, sampler_name: str, scheduler: str, positive, negative, latent_image,
                denoise: float, concepts_2=None, concepts_3=None, masks=None, clip=None,
                positive_text: str = "", auto_steps: float = 0.3,
                region_threshold: float = 0.4, region_texts: bool = True,
                auto_restart: bool = True) -> io.NodeOutput:
        check_numbers(cls, locals())
        sets = [s for s in (concepts_1, concepts_2, concepts_3) if s is not None]
        for concepts in sets:
            check_compatible(concepts, model, None)
        check_latent(latent_image)
        check_masks_finite(masks)
        how = Composition(mode=composition, strength=strength, masks=masks, clip=clip,
                          positive_text=positive_text, auto_steps=auto_steps,
                          region_threshold=region_threshold,
                          region_texts=region_texts, auto_restart=auto_restart)
        latent, regions = sample_composed(model, sets, how, seed=seed, steps=steps, cfg=cfg,
                                          sampler_name=sampler_name, scheduler=scheduler, positive=positive,
                                          negative=negative, latent=latent_image, denoise=denoise)
        return io.NodeOutput(check_sampled(latent, "KSampler with Concepts"), regions)
