"""Pieces shared by the example workflows: model file names and common node chains."""
from __future__ import annotations

from ui_workflow import Graph, Link, Node

SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
MODEL_URLS = {  # the front end offers these downloads when the file is missing
    SD15: ("https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
           "v1-5-pruned-emaonly-fp16.safetensors?download=true", "checkpoints"),
    SDXL: ("https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
           "sd_xl_base_1.0.safetensors?download=true", "checkpoints"),
    "clip_vision_h.safetensors": ("https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/"
                                  "resolve/main/split_files/clip_vision/clip_vision_h.safetensors",
                                  "clip_vision"),
}
PAIR_FILE = "my_pair.safetensors"  # what sd15_learn_two_concepts saves
CAT_FILE, DOG_FILE = "my_cat.safetensors", "my_dog.safetensors"  # two sets from two pictures
TRAINING_IMAGE = "my_two_concepts.png"
NEGATIVE = "blurry, low quality, deformed"


def models_property(name: str) -> dict:
    """The ``properties.models`` entry templates use to point at a model's download."""
    url, directory = MODEL_URLS[name]
    return {"models": [{"name": name, "url": url, "directory": directory}]}


def checkpoint(g: Graph, name: str = SD15, col: int = 0) -> Node:
    """Load Checkpoint with the model's download link."""
    return g.add("CheckpointLoaderSimple", col, properties=models_property(name), ckpt_name=name)


def encode(g: Graph, col: int, clip: Link, text: str, title: str | None = None) -> Node:
    """CLIP Text Encode."""
    return g.add("CLIPTextEncode", col, title=title, clip=clip, text=text)


def latent(g: Graph, col: int, size: int = 512, batch: int = 1) -> Node:
    """Empty Latent Image of ``size`` pixels square."""
    return g.add("EmptyLatentImage", col, width=size, height=size, batch_size=batch)


def ksampler(g: Graph, col: int, model: Link, positive: Link, negative: Link, latent_image: Link,
             steps: int = 25, cfg: float = 7.0, seed: int = 0) -> Node:
    """The stock KSampler (euler / normal)."""
    return g.add("KSampler", col, control="randomize", model=model, positive=positive,
                 negative=negative, latent_image=latent_image, seed=seed, steps=steps, cfg=cfg,
                 sampler_name="euler", scheduler="normal", denoise=1.0)


def decode_save(g: Graph, col: int, samples: Link, vae: Link, prefix: str) -> Node:
    """VAE Decode then Save Image."""
    decoded = g.add("VAEDecode", col, samples=samples, vae=vae)
    return g.add("SaveImage", col + 1, images=decoded[0], filename_prefix=prefix)


def concept_sampler(g: Graph, col: int, model: Link, sets: list[Link], composition: str,
                    positive: Link, negative: Link, latent_image: Link, **extra: object) -> Node:
    """KSampler with Concepts for one to three concept sets."""
    named = {f"concepts_{i + 1}": s for i, s in enumerate(sets)}
    return g.add("ConceptAttention_ConceptSampler", col, control="randomize", model=model,
                 composition=composition, strength=1.0, seed=0, steps=25, cfg=7.0,
                 sampler_name="euler", scheduler="normal", positive=positive, negative=negative,
                 latent_image=latent_image, denoise=1.0, **named, **extra)


def load_and_apply(g: Graph, col: int, ckpt: Node, files: list[str]) -> tuple[list[Node], Node]:
    """Load Concepts for each file and Apply Concepts in a chain; returns the loaders and the last apply."""
    loaders = [g.add("ConceptAttention_LoadConcepts", col, concept_name=f) for f in files]
    model, clip = ckpt[0], ckpt[1]
    apply = None
    for loader in loaders:
        apply = g.add("ConceptAttention_ApplyConcepts", col + 1, model=model, clip=clip,
                      concepts=loader[0], strength=1.0)
        model, clip = apply[0], apply[1]
    assert apply is not None
    return loaders, apply
