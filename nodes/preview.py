"""A KSampler that also shows where chosen words of the prompt attend."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..attention.patching import install_hook
from ..attention.recorder import AttentionRecorder, MapStore
from ..attention.visualize import colorize, overlay, upscale_maps
from ..concepts.triggers import locate_words_and_triggers
from ..sampling.ksampler import run_ksampler
from .common import check_latent, check_numbers, check_sampled, ksampler_inputs, split_words
from .vocabulary import CATEGORY, NODE_PREFIX

log = logging.getLogger(__name__)


class AttentionMapSampler(io.ComfyNode):
    """Samples like the stock KSampler and records per-word cross-attention heatmaps."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}AttentionMapSampler",
            display_name="KSampler with Attention Maps",
            category=CATEGORY,
            description="Samples exactly like KSampler and records where the chosen words of the "
                        "positive prompt attend, as heatmaps and masks.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x or SDXL)."),
                io.Clip.Input("clip", tooltip="Text encoder used to encode the positive prompt "
                                              "and to find the words in it."),
                io.String.Input("positive_text", multiline=True, default="a photo of a cat and a dog",
                                tooltip="Positive prompt; it is encoded here like CLIPTextEncode."),
                io.String.Input("words", default="cat, dog",
                                tooltip="Comma-separated words or phrases of the positive prompt "
                                        "whose attention maps to show."),
                *ksampler_inputs(with_positive=False),
                io.String.Input("layers", default="all",
                                tooltip="Cross-attention layers to average: 'all', 'latent/4' "
                                        "(SD1.5's 16x16 layers at 512 px), or keys like "
                                        "'output:3:0'. Several may be comma-separated."),
                io.Float.Input("step_start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Average maps from this fraction of the sampling steps..."),
                io.Float.Input("step_end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="...up to this fraction."),
                io.Vae.Input("vae", optional=True,
                             tooltip="If given, heatmaps are overlaid on the decoded image."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The sampled latent."),
                io.Image.Output(display_name="heatmaps",
                                tooltip="One heatmap per image and word (image-major order)."),
                io.Mask.Output(display_name="maps", tooltip="The same maps as masks in [0, 1]."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, positive_text: str, words: str, seed: int, steps: int, cfg: float,
                sampler_name: str, scheduler: str, negative, latent_image, denoise: float,
                layers: str, step_start: float, step_end: float, vae=None) -> io.NodeOutput:
        check_numbers(cls, locals())
        check_latent(latent_image)
        if denoise == 0:
            raise ValueError("'denoise' is 0, so no step is sampled and no attention map can be "
                             "recorded: set denoise above 0 (1.0 for a new picture)")
        word_list = split_words(words)
        positions = locate_words_and_triggers(clip, positive_text, word_list)
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(positive_text))

        patched = model.clone()
        store = MapStore()
        store.set_words(positions)
        install_hook(patched, AttentionRecorder(store=store), layers)
        latent = check_sampled(run_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive,
                                            negative, latent_image, denoise), "KSampler with Attention Maps")
        if not store.steps:
            raise ValueError(f"no attention maps were recorded while sampling with layers {layers!r}: "
                             "choose layers the model has ('all', 'latent/4')")

        maps = cls._word_maps(store, latent["samples"], step_start, step_end)
        batch, n_words, height, width = maps.shape
        flat = maps.reshape(batch * n_words, height, width)
        image_h, image_w = latent["samples"].shape[-2] * 8, latent["samples"].shape[-1] * 8
        masks = upscale_maps(flat, image_h, image_w)
        if vae is not None:
            decoded = vae.decode(latent["samples"])
            decoded = decoded.reshape(-1, *decoded.shape[-3:])[:batch]
            heatmaps = overlay(decoded.repeat_interleave(n_words, 0), flat)
        else:
            heatmaps = colorize(masks)
        return io.NodeOutput(latent, heatmaps, masks.clamp(0, 1))

    @staticmethod
    def _word_maps(store: MapStore, samples: torch.Tensor, step_start: float, step_end: float) -> torch.Tensor:
        """Recorded token maps averaged over the chosen steps, one map per word."""
        n_steps = len(store.steps)
        first = min(int(step_start * n_steps), n_steps - 1)
        last = max(first + 1, round(step_end * n_steps))
        return store.word_maps(range(first, last))[: samples.shape[0]]
