"""Nested attention nodes: apply subjects (from any source) to a MODEL for one prompt."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..attention.patching import install_nested, model_layers, resolve_layers
from ..sampling.nested_subjects import SubjectSpec, build_sources, encode_prompt
from .common import check_numbers
from .vocabulary import CATEGORY, NODE_PREFIX, ConceptsSocket, NestedSubjectSocket

log = logging.getLogger(__name__)



def sigma_window(model, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(sigma_max, sigma_min) of a start/end fraction of sampling, as ComfyUI's percent inputs."""
    sampling = model.get_model_object("model_sampling")
    if start_percent > end_percent:
        raise ValueError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent})")
    sigma_max = float(sampling.percent_to_sigma(start_percent))
    sigma_min = float(sampling.percent_to_sigma(end_percent)) if end_percent < 1.0 else 0.0
    return sigma_max if start_percent > 0.0 else float("inf"), sigma_min


def subject_knob_inputs() -> list[io.Input]:
    """Strength, token weight and optional region: the knobs every subject source node has."""
    return [
        io.Float.Input("strength", default=1.0, min=0.0, max=4.0, step=0.01,
                       tooltip="How much of the nested value replaces the word's own value "
                               "(1 = the method; 0 = no effect; above 1 exaggerates)."),
        io.Float.Input("token_weight", default=1.0, min=0.0, max=10.0, step=0.01,
                       tooltip="Multiplies how much attention the word receives "
                               "(above 1: larger, stronger subject)."),
        io.Mask.Input("mask", optional=True,
                      tooltip="Optional region: the subject only changes pixels inside it."),
    ]


def subject_output() -> io.Output:
    """The NESTED_SUBJECT output of a subject source node."""
    return NestedSubjectSocket.Output(display_name="NESTED_SUBJECT", tooltip="Connect to Apply Nested Attention.")


class ApplyNestedAttention(io.ComfyNode):
    """Encodes the prompt and gives each subject word query-dependent values."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}ApplyNestedAttention",
            display_name="Apply Nested Attention",
            category=CATEGORY,
            description="Nested Attention: each subject word keeps its text key (the prompt decides "
                        "where the subject goes) while its value becomes a per-pixel mix of the "
                        "subject's nested tokens. Encodes the positive prompt itself, so the words "
                        "are found exactly; use its CONDITIONING as the sampler's positive.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x or SDXL); it is cloned, "
                                                "never changed."),
                io.Clip.Input("clip", tooltip="Text encoder for the positive prompt (use the CLIP "
                                              "from Apply Concepts if the prompt has trigger words)."),
                io.String.Input("text", multiline=True, default="a photo of a cat",
                                tooltip="Positive prompt. Every subject word must occur in it."),
                NestedSubjectSocket.Input("subject_1", tooltip="A subject: its word and nested tokens."),
                NestedSubjectSocket.Input("subject_2", optional=True, tooltip="Optional second subject."),
                NestedSubjectSocket.Input("subject_3", optional=True, tooltip="Optional third subject."),
                io.Boolean.Input("exclusive", default=True,
                                 tooltip="Each pixel takes only the subject it attends to most, so "
                                         "several subjects cannot blend into one."),
                io.String.Input("layers", default="all",
                                tooltip="Cross-attention layers to use: 'all', 'latent/4', or keys "
                                        "like 'output:3:0' (comma-separated)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Start at this fraction of sampling (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Stop at this fraction of sampling (1 = last step)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with nested attention."),
                io.Conditioning.Output(display_name="positive",
                                       tooltip="The encoded prompt; connect it to the sampler."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, text: str, subject_1, subject_2=None, subject_3=None,
                exclusive: bool = True, layers: str = "all", start_percent: float = 0.0,
                end_percent: float = 1.0) -> io.NodeOutput:
        check_numbers(cls, locals())
        sigma_max, sigma_min = sigma_window(model, start_percent, end_percent)
        specs = [s.with_knobs(sigma_max=sigma_max, sigma_min=sigma_min)
                 for s in (subject_1, subject_2, subject_3) if s is not None]
        conditioning, features = encode_prompt(clip, text)
        patched = model.clone()
        chosen = resolve_layers(patched, layers)
        sources = build_sources(clip, text, features, specs, model_layers(patched))
        install_nested(patched, sources, chosen, exclusive=exclusive)
        log.info("nested attention for %s on %d layers", ", ".join(s.word for s in specs), len(chosen))
        return io.NodeOutput(patched, conditioning)


class NestedSubjectFromConcepts(io.ComfyNode):
    """A subject whose nested tokens are a bank of vectors learned with Train Concepts."""

    @classmethod
    def define_schema(cls) -> io.Schema:

        return io.Schema(
            node_id=f"{NODE_PREFIX}NestedSubjectFromConcepts",
            display_name="Nested Subject (Concept Token Bank)",
            category=CATEGORY,
            description="Uses a concept's learned token bank (Train Concepts with token_bank > 0) "
                        "as the nested tokens of its trigger word.",
            inputs=[
                ConceptsSocket.Input("concepts", tooltip="A concept set trained with a token bank."),
                io.String.Input("trigger", default="",
                                tooltip="Which concept (its trigger word); empty = the first one."),
                *subject_knob_inputs(),
            ],
            outputs=[subject_output()],
        )

    @classmethod
    def execute(cls, concepts, trigger: str, strength: float, token_weight: float,
                mask=None) -> io.NodeOutput:
        check_numbers(cls, locals())
        concept = concepts.find(trigger.strip()) if trigger.strip() else concepts.concepts[0]
        if concept.bank is None:
            raise ValueError(f"concept {concept.trigger!r} has no token bank: train it with "
                             "token_bank > 0 in Train Concepts")
        region = None if mask is None else mask.reshape(-1, *mask.shape[-2:])[0]
        return io.NodeOutput(SubjectSpec(concept.trigger, bank=concept.bank, strength=strength,
                                         token_weight=token_weight, region=region))
