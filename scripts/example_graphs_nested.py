"""Example workflows for nested attention (each subject source) and the attention-map preview."""
from __future__ import annotations

from example_parts import (NEGATIVE, PAIR_FILE, TRAINING_IMAGE, checkpoint, decode_save, encode,
                           ksampler, latent, load_and_apply, models_property)
from ui_workflow import Graph


def nested_token_bank() -> Graph:
    """Train with a token bank, then use the bank as V1's nested tokens."""
    g = Graph()
    g.note(0, ("Nested attention from a concept's token bank.\n\nTrain Concepts with token_bank > 0 "
               "(4 to 16) also learns that many nested tokens per concept. Nested Subject (Concept "
               "Token Bank) picks one trigger; Apply Nested Attention encodes the prompt itself, so "
               "use ITS conditioning as the positive. Later, load the saved file (Load Concepts -> "
               "Apply Concepts) instead of training again."))
    ckpt = checkpoint(g)
    image = g.add("LoadImage", 0, image=TRAINING_IMAGE)
    train = g.add("ConceptAttention_TrainConcepts", 1, model=ckpt[0], clip=ckpt[1], vae=ckpt[2],
                  image=image[0], concepts="V1: cat\nV2: dog", steps=250, learning_rate=8e-5,
                  resolution=512, seed=0, calibration=True, attention_weight=0.01,
                  save_name="my_pair_bank", token_bank=8)
    subject = g.add("ConceptAttention_NestedSubjectFromConcepts", 2, concepts=train[2],
                    trigger="V1", strength=1.0, token_weight=1.0)
    nested = g.add("ConceptAttention_ApplyNestedAttention", 2, model=train[0], clip=train[1],
                   text="a photo of V1 cat wearing a hat on the beach", subject_1=subject[0],
                   exclusive=True, layers="all", start_percent=0.0, end_percent=1.0)
    negative = encode(g, 2, train[1], NEGATIVE)
    empty = latent(g, 2)
    sampled = ksampler(g, 3, nested[0], nested[1], negative[0], empty[0])
    decode_save(g, 4, sampled[0], ckpt[2], "nested_token_bank")
    return g


def nested_image(adapter: str, note: str, prefix: str) -> Graph:
    """Nested attention from a reference picture through an image adapter."""
    g = Graph()
    g.note(0, note)
    ckpt = checkpoint(g)
    vision = g.add("CLIPVisionLoader", 0, properties=models_property("clip_vision_h.safetensors"),
                   clip_name="clip_vision_h.safetensors")
    loaded = g.add("ConceptAttention_LoadNestedAdapter", 0, adapter_name=adapter)
    reference = g.add("LoadImage", 0, image="reference_cat.png")
    subject = g.add("ConceptAttention_NestedSubjectFromImage", 1, adapter=loaded[0],
                    clip_vision=vision[0], image=reference[0], word="cat", strength=1.0,
                    token_weight=1.0)
    nested = g.add("ConceptAttention_ApplyNestedAttention", 2, model=ckpt[0], clip=ckpt[1],
                   text="a photo of a cat wearing a hat on the beach", subject_1=subject[0],
                   exclusive=True, layers="all", start_percent=0.0, end_percent=1.0)
    negative = encode(g, 2, ckpt[1], NEGATIVE)
    empty = latent(g, 2)
    sampled = ksampler(g, 3, nested[0], nested[1], negative[0], empty[0])
    decode_save(g, 4, sampled[0], ckpt[2], prefix)
    return g


def nested_image_adapter() -> Graph:
    """An adapter trained with scripts/train_nested_adapter.py (models/nested_adapters)."""
    return nested_image(
        "my_nested_adapter_sd15.safetensors",
        "Nested attention from a reference picture with an adapter trained by "
        "scripts/train_nested_adapter.py (put it in models/nested_adapters/). Use the CLIP vision "
        "model it was trained with, a tight crop of the subject, and the subject's word ('cat') "
        "as it appears in the prompt.", "nested_image_adapter")


def nested_ipadapter_plus() -> Graph:
    """An IP-Adapter-Plus file (models/ipadapter) used as nested keys/values without training."""
    return nested_image(
        "ip-adapter-plus_sd15.safetensors",
        "Nested attention from a reference picture with an IP-Adapter-Plus file, no training "
        "needed: put ip-adapter-plus_sd15.safetensors in models/ipadapter/ and the ViT-H CLIP "
        "vision model in models/clip_vision/. Plain (non-Plus) IP-Adapter files are refused.",
        "nested_ipadapter_plus")


def attention_maps() -> Graph:
    """KSampler with Attention Maps: where the triggers and class words attend."""
    g = Graph()
    g.note(0, ("See where words of the prompt act. 'words' lists words or phrases of "
               "positive_text (learned triggers too); heatmaps come one per image and word, over "
               "the decoded picture when a VAE is connected. 'layers' picks which cross-attention "
               "layers are averaged."))
    ckpt = checkpoint(g)
    _loaders, apply = load_and_apply(g, 0, ckpt, [PAIR_FILE])
    negative = encode(g, 2, apply[1], NEGATIVE)
    empty = latent(g, 2)
    sampled = g.add("ConceptAttention_AttentionMapSampler", 3, control="randomize", model=apply[0],
                    clip=apply[1], positive_text="a photo of V1 cat and V2 dog on the beach",
                    words="V1, cat, V2, dog", seed=0, steps=25, cfg=7.0, sampler_name="euler",
                    scheduler="normal", negative=negative[0], latent_image=empty[0], denoise=1.0,
                    layers="all", step_start=0.0, step_end=1.0, vae=ckpt[2])
    decode_save(g, 4, sampled[0], ckpt[2], "attention_maps_image")
    g.add("SaveImage", 5, title="Heatmaps (V1, cat, V2, dog)", images=sampled[1],
          filename_prefix="attention_maps")
    return g
