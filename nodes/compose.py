"""Nodes that compose concepts learned separately."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..attention.patching import install_regional
from ..concepts.apply import apply_concepts
from ..concepts.concept_file import save_concepts
from ..concepts.concept_set import check_compatible
from ..sampling.auto_regions import class_word_positions, region_text_features, sample_auto_regional
from ..concepts.merge import merge_concept_sets
from .common import (check_latent, check_masks_finite, check_numbers, check_sampled, ksampler_inputs,
                     overwrite_input, run_ksampler)
from .concepts import concept_path
from .vocabulary import CATEGORY, NODE_PREFIX, ConceptsSocket

MODES = ("off", "combined", "regional", "regional_auto")

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
        sampling = dict(seed=seed, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                        positive=positive, negative=negative, denoise=denoise)
        size = latent_image["samples"].shape[-2:]
        image_size = (size[0] * 8, size[1] * 8)
        if composition == "regional_auto":
            if denoise == 0:
                raise ValueError("'denoise' is 0, so no step is sampled, but regional_auto finds its "
                                 "regions while sampling: set denoise above 0 (1.0 for a new picture), "
                                 "or use 'regional' with masks")
            per_set = cls._class_words(clip, positive_text, positive, sets)
            texts = region_text_features(clip, positive_text, sets) if region_texts else None
            latent, regions = sample_auto_regional(run_ksampler, model, sets, strength, per_set, steps,
                                                   auto_steps, region_threshold, latent_image, texts=texts,
                                                   restart=auto_restart, **sampling)
            check_sampled(latent, "KSampler with Concepts")
            regions = regions.reshape(-1, *regions.shape[-2:])
            return io.NodeOutput(latent, F.interpolate(regions[None], size=image_size, mode="nearest")[0])
        patched, regions = model, torch.zeros(len(sets), *image_size)
        if composition == "combined":
            regions = torch.ones(len(sets), *image_size)
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
            texts = None
            if region_texts and clip is not None and positive_text.strip():
                texts = cls._region_texts(clip, positive_text, positive, sets)
            elif region_texts:
                log.info("regional: no 'clip' and 'positive_text' connected, so every region reads the "
                         "whole prompt; connect them to give each region its own text")
            patched = model.clone()
            install_regional(patched, [{k: strength * d for k, d in s.kv_deltas.items()} for s in sets],
                             masks.float(), texts)
            regions = masks.float()
        elif composition != "off":
            raise ValueError(f"unknown composition {composition!r}; use one of {MODES}")
        latent = run_ksampler(patched, steps=steps, latent=latent_image, **sampling)
        return io.NodeOutput(check_sampled(latent, "KSampler with Concepts"), regions)

    @staticmethod
    def _check_text(clip, positive_text: str, positive) -> None:
        """Check that ``positive_text`` encoded with ``clip`` is the ``positive`` conditioning."""
        if clip is None or not positive_text.strip():
            raise ValueError("regional_auto needs 'clip' and 'positive_text' (the positive prompt's "
                             "text) to find the class words; or use 'regional' with masks")
        encoded = clip.encode_from_tokens_scheduled(clip.tokenize(positive_text))[0][0]
        given = positive[0][0]
        if encoded.shape != given.shape or not torch.allclose(encoded.float(), given.float(), atol=1e-3, rtol=1e-3):
            raise ValueError("'positive_text' encoded with 'clip' does not give the 'positive' "
                             "conditioning: connect the same text and CLIP that made 'positive'")

    @classmethod
    def _class_words(cls, clip, positive_text: str, positive, sets) -> list[list[int]]:
        """Class-word positions per set, after checking that the text is the positive prompt."""
        cls._check_text(clip, positive_text, positive)
        return class_word_positions(clip, positive_text, sets)

    @classmethod
    def _region_texts(cls, clip, positive_text: str, positive, sets) -> list[torch.Tensor]:
        """Each set's own text features: the positive text without the other sets' concepts."""
        cls._check_text(clip, positive_text, positive)
        return region_text_features(clip, positive_text, sets)
