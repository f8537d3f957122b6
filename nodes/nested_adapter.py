"""Nested subjects from a reference image: load an image adapter, turn an IMAGE into a subject."""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from comfy_api.latest import io

from ..attention.layers import CrossAttentionLayer
from ..sampling.nested_adapter import NestedAdapter, load_adapter
from ..sampling.nested_subjects import SubjectSpec
from .common import check_numbers, listed_model_path
from .nested import subject_knob_inputs, subject_output
from .vocabulary import CATEGORY, IPADAPTER_FOLDER, NESTED_ADAPTERS_FOLDER, NODE_PREFIX, NestedAdapterSocket

log = logging.getLogger(__name__)


def _folders() -> list[str]:
    import folder_paths

    return [name for name in (NESTED_ADAPTERS_FOLDER, IPADAPTER_FOLDER)
            if name in folder_paths.folder_names_and_paths]


def adapter_files() -> list[str]:
    """Safetensors files of both folders, without duplicates, in folder order."""
    import folder_paths

    names: list[str] = []
    for folder in _folders():
        names += [n for n in folder_paths.get_filename_list(folder)
                  if n.endswith(".safetensors") and n not in names]
    return names


def adapter_path(name: str) -> str:
    """Full path of a listed adapter file."""
    return listed_model_path(_folders(), name, "adapter_name")


class ImageLayerKV:
    """``SubjectSpec.layer_kv`` for one image: resampled once, projected once per layer set."""

    def __init__(self, adapter: NestedAdapter, tokens: torch.Tensor):
        self.adapter = adapter
        self.tokens = tokens.detach()
        self._cache: dict[tuple, dict] = {}

    def __call__(self, layers: Sequence[CrossAttentionLayer]) -> dict:
        """``{layer key: (K, V)}`` for the model's layers (cached per layer list)."""
        key = tuple((layer.key, layer.heads, layer.dim_head) for layer in layers)
        if key not in self._cache:
            self._cache[key] = self.adapter.layer_kv(layers, self.tokens)
        return self._cache[key]


def image_tokens(clip_vision: Any, image: torch.Tensor) -> torch.Tensor:
    """CLIP-vision penultimate hidden states ``[1, N, width]`` of the first picture of ``image``."""
    output = clip_vision.encode_image(image[:1], crop=True)
    return output.penultimate_hidden_states.float().cpu()


class LoadNestedAdapter(io.ComfyNode):
    """Loads a nested-attention image adapter (IP-Adapter-Plus layout) from the models folders."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}LoadNestedAdapter",
            display_name="Load Nested Adapter",
            category=CATEGORY,
            description="Loads an image adapter for nested attention: one trained with this pack "
                        "(models/nested_adapters) or an IP-Adapter-Plus file (models/ipadapter), "
                        "whose resampled image tokens become the subject's nested tokens.",
            inputs=[io.Combo.Input("adapter_name", options=adapter_files(),
                                   tooltip="A .safetensors adapter file from models/nested_adapters "
                                           "or models/ipadapter (IP-Adapter-Plus files only).")],
            outputs=[NestedAdapterSocket.Output(display_name="NESTED_ADAPTER",
                                              tooltip="Connect to Nested Subject (Image).")],
        )

    @classmethod
    def execute(cls, adapter_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_adapter(adapter_path(adapter_name)))


class NestedSubjectFromImage(io.ComfyNode):
    """A subject whose nested tokens come from a reference picture through an image adapter."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}NestedSubjectFromImage",
            display_name="Nested Subject (Image)",
            category=CATEGORY,
            description="Encodes a reference picture of the subject (a tight crop works best) with "
                        "CLIP vision and the adapter; the subject word then takes its look from it "
                        "while the prompt still decides where it goes.",
            inputs=[
                NestedAdapterSocket.Input("adapter", tooltip="From Load Nested Adapter."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the adapter was "
                                                           "trained with (ViT-H for IP-Adapter-Plus)."),
                io.Image.Input("image", tooltip="Reference picture of the subject (first one used)."),
                io.String.Input("word", default="cat",
                                tooltip="The subject word of the prompt (e.g. the class word 'cat')."),
                *subject_knob_inputs(),
            ],
            outputs=[subject_output()],
        )

    @classmethod
    def execute(cls, adapter, clip_vision, image, word: str, strength: float, token_weight: float,
                mask=None) -> io.NodeOutput:
        check_numbers(cls, locals())
        word = word.strip()
        if not word:
            raise ValueError("give the subject word of the prompt, e.g. 'cat'")
        with torch.inference_mode(False), torch.no_grad():
            tokens = adapter.tokens(image_tokens(clip_vision, image))[0]
        region = None if mask is None else mask.reshape(-1, *mask.shape[-2:])[0]
        log.info("nested subject %r from an image: %d tokens", word, tokens.shape[0])
        return io.NodeOutput(SubjectSpec(word, layer_kv=ImageLayerKV(adapter, tokens), strength=strength,
                                         token_weight=token_weight, region=region))
