"""Example workflows that learn, sample, compose, merge, inpaint, stack and export concepts."""
from __future__ import annotations

from example_parts import (CAT_FILE, DOG_FILE, NEGATIVE, PAIR_FILE, SD15, SDXL, TRAINING_IMAGE,
                           checkpoint, concept_sampler, decode_save, encode, ksampler, latent,
                           load_and_apply)
from ui_workflow import Graph

TOGETHER = "a photo of V1 cat and V2 dog playing in a park"


def learn_two_concepts(arch: str = "sd15") -> Graph:
    """Train Concepts on one picture, then draw both learned concepts together."""
    xl = arch == "sdxl"
    g = Graph()
    g.note(0, ("Learn two concepts from ONE picture.\n\n"
               f"1. Load your checkpoint ({'SDXL' if xl else 'SD1.5'}) and your picture (both "
               "objects visible).\n2. In Train Concepts, write one line per object: 'V1: cat', "
               "'V2: dog' (trigger: class word).\n3. save_name keeps the result in "
               "models/concepts/ for the other example workflows.\n4. Prompt with 'V1 cat' / "
               "'V2 dog'.\n\n"
               + ("SDXL trains at 1024 px: bf16, gradient checkpointing and micro_batch 1 keep it "
                  "within about 24 GB." if xl else
                  "250 steps at 512 px take a few minutes on a recent GPU.")))
    ckpt = checkpoint(g, SDXL if xl else SD15)
    image = g.add("LoadImage", 0, image=TRAINING_IMAGE)
    size = 1024 if xl else 512
    memory = (dict(micro_batch=1, grad_accumulation=8, precision="bf16", gradient_checkpointing=True)
              if xl else dict(micro_batch=2, grad_accumulation=4, precision="auto"))
    train = g.add("ConceptAttention_TrainConcepts", 1, model=ckpt[0], clip=ckpt[1], vae=ckpt[2],
                  image=image[0], concepts="V1: cat\nV2: dog", steps=250, learning_rate=8e-5,
                  resolution=size, seed=0, calibration=True, attention_weight=0.01,
                  save_name="my_pair_sdxl" if xl else "my_pair", map_layers="latent/4", **memory)
    g.add("PreviewImage", 2, title="Attention maps (trigger, then class word)", images=train[3])
    g.add("PreviewImage", 2, title="Loss curve", images=train[4])
    positive = encode(g, 2, train[1], "a photo of V1 cat and V2 dog on the beach")
    negative = encode(g, 2, train[1], NEGATIVE)
    empty = latent(g, 2, size)
    sampled = ksampler(g, 3, train[0], positive[0], negative[0], empty[0],
                       steps=30 if xl else 25)
    decode_save(g, 4, sampled[0], ckpt[2], "concepts_together")
    return g


def each_concept_alone() -> Graph:
    """Load a trained pair and draw each concept in its own picture."""
    g = Graph()
    g.note(0, ("Draw each learned concept on its own.\n\nPick the file saved by Train Concepts in "
               "Load Concepts and write prompts with one trigger each ('V1 cat', 'V2 dog'). "
               "Apply Concepts' strength scales the learned K/V changes."))
    ckpt = checkpoint(g)
    _loaders, apply = load_and_apply(g, 0, ckpt, [PAIR_FILE])
    negative = encode(g, 2, apply[1], NEGATIVE)
    empty = latent(g, 2)
    for i, (text, prefix) in enumerate((("a photo of V1 cat on a sofa", "concept_v1"),
                                        ("a photo of V2 dog in the snow", "concept_v2"))):
        positive = encode(g, 2, apply[1], text)
        sampled = ksampler(g, 3, apply[0], positive[0], negative[0], empty[0], seed=i)
        decode_save(g, 4, sampled[0], ckpt[2], prefix)
    return g


def combine_sets() -> Graph:
    """KSampler with Concepts in 'combined' mode: two sets trained on different pictures."""
    g = Graph()
    g.note(0, ("Combine concepts learned from DIFFERENT pictures (here my_cat with 'V1: cat' and "
               "my_dog with 'V2: dog').\n\nApply Concepts only teaches the CLIP the trigger words; "
               "KSampler with Concepts gets the BASE model and adds every set's K/V changes. "
               "Concepts learned together from one picture need no combining: just prompt both."))
    ckpt = checkpoint(g)
    loaders, apply = load_and_apply(g, 0, ckpt, [CAT_FILE, DOG_FILE])
    positive = encode(g, 2, apply[1], TOGETHER)
    negative = encode(g, 2, apply[1], NEGATIVE)
    empty = latent(g, 2)
    sampled = concept_sampler(g, 3, ckpt[0], [x[0] for x in loaders], "combined", positive[0],
                              negative[0], empty[0])
    decode_save(g, 4, sampled[0], ckpt[2], "concepts_combined")
    return g


def regional_masks() -> Graph:
    """Regional composition: each set acts only inside its mask (left half / right half)."""
    g = Graph()
    g.note(0, ("Regional composition: set 1 acts only in the white part of mask 1, set 2 in mask 2 "
               "(elsewhere the base model).\n\nHere the masks are the left and right halves of a "
               "512 px picture; to paint your own, replace them with Load Image (as Mask) nodes "
               "and keep one mask per connected concept set, in order (Image Batch collects them).\n\n"
               "With the CLIP and the prompt's text connected (region_texts on), each region reads the "
               "prompt without the other set's trigger, so the cat's look stays out of the dog's half."))
    ckpt = checkpoint(g)
    loaders, apply = load_and_apply(g, 0, ckpt, [CAT_FILE, DOG_FILE])
    empty_mask = g.add("SolidMask", 0, value=0.0, width=512, height=512)
    half = g.add("SolidMask", 0, value=1.0, width=256, height=512)
    left = g.add("MaskComposite", 1, destination=empty_mask[0], source=half[0], x=0, y=0,
                 operation="add")
    right = g.add("InvertMask", 1, mask=left[0])
    images = [g.add("MaskToImage", 2, mask=m[0]) for m in (left, right)]
    batch = g.add("ImageBatch", 2, image1=images[0][0], image2=images[1][0])
    masks = g.add("ImageToMask", 2, image=batch[0], channel="red")
    text = g.add("PrimitiveStringMultiline", 1, title="Prompt",
                 value="a photo of V1 cat on the left and V2 dog on the right")
    positive = g.add("CLIPTextEncode", 2, clip=apply[1], text=text[0])
    negative = encode(g, 2, apply[1], NEGATIVE)
    empty = latent(g, 2)
    sampled = concept_sampler(g, 3, ckpt[0], [x[0] for x in loaders], "regional", positive[0],
                              negative[0], empty[0], masks=masks[0], clip=apply[1], positive_text=text[0],
                              region_texts=True)
    decode_save(g, 4, sampled[0], ckpt[2], "concepts_regional")
    return g


def regional_auto() -> Graph:
    """regional_auto: the regions come from the class words' attention maps."""
    g = Graph()
    g.note(0, ("regional_auto finds each set's region itself: the first auto_steps of sampling "
               "record where 'cat' and 'dog' attend, then each set acts only in its region.\n\n"
               "The prompt is typed once (String node) and feeds both the CLIP Text Encode and the "
               "sampler's positive_text, which must match. Connect the CLIP that encoded it. The "
               "'regions' output shows what was found."))
    ckpt = checkpoint(g)
    loaders, apply = load_and_apply(g, 0, ckpt, [CAT_FILE, DOG_FILE])
    text = g.add("PrimitiveStringMultiline", 1, title="Prompt", value=TOGETHER)
    positive = g.add("CLIPTextEncode", 2, clip=apply[1], text=text[0])
    negative = encode(g, 2, apply[1], NEGATIVE)
    empty = latent(g, 2)
    sampled = concept_sampler(g, 3, ckpt[0], [x[0] for x in loaders], "regional_auto",
                              positive[0], negative[0], empty[0], clip=apply[1],
                              positive_text=text[0], auto_steps=0.3, region_threshold=0.4,
                              region_texts=True)
    decode_save(g, 4, sampled[0], ckpt[2], "concepts_regional_auto")
    regions = g.add("MaskToImage", 4, mask=sampled[1])
    g.add("PreviewImage", 5, title="Regions (one per set)", images=regions[0])
    return g


def merge_sets() -> Graph:
    """Merge Concepts: two separately trained files into one set, saved and sampled."""
    g = Graph()
    g.note(0, ("Merge concept sets trained on different pictures into one set (closed-form, as "
               "Custom Diffusion): triggers must differ (V1 in one file, V2 in the other). "
               "save_name writes the merged set to models/concepts/ so later workflows can load "
               "it like any other."))
    ckpt = checkpoint(g)
    loaders = [g.add("ConceptAttention_LoadConcepts", 0, concept_name=f) for f in (CAT_FILE, DOG_FILE)]
    merged = g.add("ConceptAttention_MergeConcepts", 1, model=ckpt[0], clip=ckpt[1],
                   concepts_1=loaders[0][0], concepts_2=loaders[1][0], save_name="my_cat_and_dog")
    apply = g.add("ConceptAttention_ApplyConcepts", 2, model=ckpt[0], clip=ckpt[1],
                  concepts=merged[0], strength=1.0)
    positive = encode(g, 2, apply[1], TOGETHER)
    negative = encode(g, 2, apply[1], NEGATIVE)
    empty = latent(g, 2)
    sampled = ksampler(g, 3, apply[0], positive[0], negative[0], empty[0])
    decode_save(g, 4, sampled[0], ckpt[2], "concepts_merged")
    return g


def inpaint_concept() -> Graph:
    """Inpaint a concept into a photo through a latent noise mask."""
    g = Graph()
    g.note(0, ("Put a learned concept into your own photo.\n\nLoad the photo, right-click it -> "
               "Open in MaskEditor and paint where the concept should go (the painted area is the "
               "MASK). Only that area is re-drawn. Lower denoise keeps more of the original."))
    ckpt = checkpoint(g)
    photo = g.add("LoadImage", 0, image="photo.png")
    concepts = g.add("ConceptAttention_LoadConcepts", 1, concept_name=PAIR_FILE)
    apply = g.add("ConceptAttention_ApplyConcepts", 2, model=ckpt[0], clip=ckpt[1],
                  concepts=concepts[0], strength=1.0)
    encoded = g.add("VAEEncode", 1, pixels=photo[0], vae=ckpt[2])
    masked = g.add("SetLatentNoiseMask", 1, samples=encoded[0], mask=photo[1])
    positive = encode(g, 2, apply[1], "a photo of V1 cat sitting on a sofa")
    negative = encode(g, 2, apply[1], NEGATIVE)
    sampled = concept_sampler(g, 3, ckpt[0], [concepts[0]], "combined", positive[0], negative[0],
                              masked[0])
    decode_save(g, 4, sampled[0], ckpt[2], "concept_inpaint")
    return g


def with_stock_lora() -> Graph:
    """Apply Concepts, then a stock LoRA on top (K/V deltas are weight patches, so they stack)."""
    g = Graph()
    g.note(0, ("Concepts stack with ordinary LoRAs: Apply Concepts -> Load LoRA -> sampler. Pick "
               "any SD1.5 LoRA (e.g. a style) in Load LoRA and lower its strengths if it "
               "overpowers the concepts."))
    ckpt = checkpoint(g)
    _loaders, apply = load_and_apply(g, 0, ckpt, [PAIR_FILE])
    lora = g.add("LoraLoader", 2, model=apply[0], clip=apply[1],
                 lora_name="your_style_lora.safetensors", strength_model=0.8, strength_clip=0.8)
    positive = encode(g, 3, lora[1], "a watercolor painting of V1 cat and V2 dog")
    negative = encode(g, 3, lora[1], NEGATIVE)
    empty = latent(g, 3)
    sampled = ksampler(g, 4, lora[0], positive[0], negative[0], empty[0])
    decode_save(g, 5, sampled[0], ckpt[2], "concepts_with_lora")
    return g


def export_concepts() -> Graph:
    """Export Concepts: a LoRA plus one embedding per trigger."""
    g = Graph()
    g.note(0, ("Export a concept file for use WITHOUT this pack: the K/V changes become "
               "models/loras/<name>.safetensors (rank 0 = exact, or a low-rank LoRA) and each "
               "trigger an embedding in models/embeddings/. Then open "
               "sd15_use_exported_concepts."))
    concepts = g.add("ConceptAttention_LoadConcepts", 0, concept_name=PAIR_FILE)
    g.add("ConceptAttention_ExportConcepts", 1, concepts=concepts[0], name="my_pair", rank=0)
    return g


def use_exported() -> Graph:
    """Stock nodes only: the exported LoRA in Load LoRA and the triggers as embeddings."""
    g = Graph()
    g.note(0, ("Uses exported concepts with stock nodes only (works without this pack): Load LoRA "
               "with the exported file, and 'embedding:V1 cat' in the prompt for each trigger."))
    ckpt = checkpoint(g)
    lora = g.add("LoraLoader", 1, model=ckpt[0], clip=ckpt[1], lora_name=PAIR_FILE,
                 strength_model=1.0, strength_clip=1.0)
    positive = encode(g, 2, lora[1], "a photo of embedding:V1 cat and embedding:V2 dog on the beach")
    negative = encode(g, 2, lora[1], NEGATIVE)
    empty = latent(g, 2)
    sampled = ksampler(g, 3, lora[0], positive[0], negative[0], empty[0])
    decode_save(g, 4, sampled[0], ckpt[2], "exported_concepts")
    return g
