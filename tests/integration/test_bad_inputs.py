"""The bad-input catalogue (docs/reliability.md), library mode: every row is one broken input.

Each row names the input, where it goes in, and the words its error must contain. A row passes
when the call raises a ``ValueError`` whose message
contains every expected word -- never a ``KeyError``, ``RuntimeError``, ``RecursionError`` or
a silent success. Rows that are *accepted* on purpose (RGBA, greyscale, a class word repeated in
the caption) are listed in ``ACCEPTED``. Concept-file rows live in ``tests/unit/test_concept_file.py``
(``INVALID``, ``BANK_INVALID``) and are listed in the same document.

Nothing here trains: every refusal happens before the first optimizer step, so the table runs in
seconds on the shared tiny models.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from concept_attention.nodes.compose import ConceptSampler, MergeConcepts
from concept_attention.nodes.concepts import (ApplyConcepts, ExportConcepts, LoadConcepts, SaveConcepts,
                                              TrainConcepts, concept_path)
from concept_attention.nodes.nested import ApplyNestedAttention, NestedSubjectFromConcepts
from concept_attention.nodes.nested_adapter import NestedSubjectFromImage
from concept_attention.nodes.preview import AttentionMapSampler
from concept_attention.concepts.apply import apply_concepts
from concept_attention.training.data import prepare_image
from concept_attention.concepts.specs import ConceptSpec, parse_concept_specs
from concept_attention.training.loop import ConceptTrainer, train_concepts
from concept_attention.training.settings import TrainSettings
from concept_attention.concepts.concept_file import concept_file_contents
from concept_attention.concepts.concept_set import ConceptSet
from concept_attention.sampling.nested_subjects import SubjectSpec
from support.concept_files import write_concept_file
from support.synthetic_concepts import synthetic_set

pytestmark = pytest.mark.usefixtures("one_thread")

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
SIZE = 64
SPECS = [ConceptSpec("V1", "cat"), ConceptSpec("V2", "dog")]
PROMPT = "a photo of V1 cat and V2 dog"
NAN, INF = float("nan"), float("inf")
TAKEN = "taken_by_a_folder"  # a folder of this name sits where each writer would put its file


@dataclass(frozen=True)
class Case:
    """One catalogue row: what is broken, the call that receives it, the words of its error."""

    id: str
    where: str
    call: Callable[["Env"], Any]
    expect: tuple[str, ...]
    error: type[Exception] = ValueError


class Env:
    """The tiny models and small inputs the rows need (shared, built once)."""

    def __init__(self, sd15: Any, sdxl: Any, models: Path) -> None:
        self._sd15, self._sdxl = sd15, sdxl
        self.models = models  # the temporary concepts, loras and embeddings folders

    @property
    def b(self) -> Any:
        return self._sd15.bundle

    @property
    def xl(self) -> Any:
        return self._sdxl.bundle

    def encode(self, text: str) -> Any:
        return self.b.clip.encode_from_tokens_scheduled(self.b.clip.tokenize(text))

    def image(self) -> torch.Tensor:
        return torch.full((1, SIZE, SIZE, 3), 0.5)

    def masks(self) -> torch.Tensor:
        masks = torch.zeros(2, SIZE, SIZE)
        masks[0, :, : SIZE // 2] = 1
        masks[1, :, SIZE // 2:] = 1
        return masks

    def train(self, image: torch.Tensor | None = None, specs: list[ConceptSpec] | None = None,
              masks: torch.Tensor | None = None, prior: list[tuple[torch.Tensor, str]] | None = None,
              **settings: Any) -> Any:
        """Train Concepts' library call with one tiny step (every refusal comes before it)."""
        base = dict(steps=1, micro_batch=1, grad_accumulation=1, resolution=SIZE, pool_size=1)
        return train_concepts(self.b.model, self.b.clip, self.b.vae,
                              self.image() if image is None else image, specs or SPECS,
                              TrainSettings(**{**base, **settings}), masks=masks, prior=prior)

    def train_node(self, **inputs: Any) -> Any:
        """The Train Concepts node with one tiny step and the given inputs changed."""
        args = dict(model=self.b.model, clip=self.b.clip, vae=self.b.vae, image=self.image(),
                    concepts="V1: cat\nV2: dog", steps=1, learning_rate=1e-3, resolution=SIZE, seed=0,
                    calibration=True, attention_weight=0.01, save_name="", micro_batch=1,
                    grad_accumulation=1)
        return TrainConcepts.execute(**{**args, **inputs})

    def scaled(self, kv: float = 1.0, embeddings: float = 1.0, triggers: tuple[str, ...] = ("V1",)) -> ConceptSet:
        """A set whose K/V deltas and token vectors are multiplied (absurd values, in memory)."""
        concepts = self.set(list(triggers))
        concepts.kv_deltas = {k: d * kv for k, d in concepts.kv_deltas.items()}
        for concept in concepts.concepts:
            concept.embeddings = {k: v * embeddings for k, v in concept.embeddings.items()}
        return concepts

    def nan_model(self) -> Any:
        """The tiny model with a patch that makes every prediction NaN (a broken model or patch).

        Kept for the module, as ComfyUI's cache keeps a node's output: a clone of a patcher that is
        gone would stay in ComfyUI's list of loaded models as a "memory leak" of the tests.
        """
        if not hasattr(self, "_nan_model"):
            self._nan_model = self.b.model.clone()
            self._nan_model.set_model_unet_function_wrapper(
                lambda apply, a: apply(a["input"], a["timestep"], **a["c"]) * float("nan"))
        return self._nan_model

    def bad_file(self, name: str, edit: Callable[[list[dict]], list[dict]]) -> str:
        """A concept file in models/concepts whose concept list was edited past the checks of saving."""
        import json

        import safetensors.torch

        tensors, metadata = concept_file_contents(self.set(["V1"]))
        metadata = {**metadata, "concepts": json.dumps(edit(json.loads(metadata["concepts"])))}
        safetensors.torch.save_file(dict(tensors), str(self.models / "concepts" / name), metadata=metadata)
        return name

    def set(self, triggers: list[str] = ("V1",), seed: int = 1, xl: bool = False) -> Any:
        return synthetic_set(self.xl if xl else self.b, list(triggers), seed)

    def sampler(self, composition: str = "combined", latent: Any = None, **extra: Any) -> Any:
        args = dict(model=self.b.model, concepts_1=self.set(), composition=composition, strength=1.0,
                    seed=1, steps=1, cfg=5.0, sampler_name="euler", scheduler="normal",
                    positive=self.encode(PROMPT), negative=self.encode(""), denoise=1.0,
                    latent_image={"samples": torch.zeros(1, 4, 8, 8)} if latent is None else latent)
        return ConceptSampler.execute(**{**args, **extra})

    def maps(self, text: str = "a photo of a cat", words: str = "cat", latent: Any = None,
             layers: str = "all", model: Any = None, **numbers: float) -> Any:
        args = dict(seed=1, steps=1, cfg=5.0, denoise=1.0, step_start=0.0, step_end=1.0)
        return AttentionMapSampler.execute(
            model or self.b.model, self.b.clip, text, words, sampler_name="euler", scheduler="normal",
            negative=self.encode(""), layers=layers,
            latent_image={"samples": torch.zeros(1, 4, 8, 8)} if latent is None else latent,
            **{**args, **numbers})


def _with(value: float, shape: tuple[int, ...] = (1, SIZE, SIZE, 3)) -> torch.Tensor:
    tensor = torch.full(shape, 0.5)
    tensor.view(-1)[3] = value
    return tensor


def _overlapping(env: Env) -> torch.Tensor:
    masks = torch.zeros(2, SIZE, SIZE)
    masks[0, 8:48, 8:48] = 1
    masks[1, 16:56, 16:56] = 1  # 32x32 of the 40x40 squares: 64 % shared
    return masks


def _encode(clip: Any, text: str) -> Any:
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _nan_latent() -> dict:
    samples = torch.zeros(1, 4, 8, 8)
    samples[0, 1, 2, 3] = float("nan")
    return {"samples": samples}


TRAINING: list[Case] = [
    # ----- the picture
    Case("image: empty batch", "Train Concepts image", lambda e: e.train(torch.zeros(0, SIZE, SIZE, 3)),
         ("image input", "empty batch", "Load Image")),
    Case("image: 0x0 px", "Train Concepts image", lambda e: e.train(torch.zeros(1, 0, 0, 3)),
         ("image", "0x0 px", "at least 64 px", "larger picture")),
    Case("image: 1 pixel", "Train Concepts image", lambda e: e.train(torch.zeros(1, 1, 1, 3)),
         ("image", "1x1 px", "at least 64 px")),
    Case("image: batch of two", "Train Concepts image", lambda e: e.train(torch.rand(2, SIZE, SIZE, 3)),
         ("batch of 2 pictures", "ONE picture", "ImageFromBatch")),
    Case("image: no batch axis", "Train Concepts image", lambda e: e.train(torch.rand(SIZE, SIZE, 3)),
         ("image input", "[batch, height, width, channels]", "Load Image")),
    Case("image: 2 channels", "Train Concepts image", lambda e: e.train(torch.rand(1, SIZE, SIZE, 2)),
         ("image has 2 channels", "convert it to RGB")),
    Case("image: NaN pixel", "Train Concepts image", lambda e: e.train(_with(float("nan"))),
         ("image", "NaN or infinite", "reload")),
    Case("image: inf pixel", "Train Concepts image", lambda e: e.train(_with(float("inf"))),
         ("image", "NaN or infinite")),
    # ----- the masks
    Case("masks: one for two concepts", "Train Concepts masks", lambda e: e.train(masks=e.masks()[:1]),
         ("1 masks were given for 2 concepts", "one mask per concept")),
    Case("masks: three for two concepts", "Train Concepts masks",
         lambda e: e.train(masks=torch.cat([e.masks(), e.masks()[:1]])), ("3 masks", "2 concepts")),
    Case("masks: wrong size", "Train Concepts masks", lambda e: e.train(masks=e.masks()[:, :32]),
         ("masks are 64x32 px", "image is 64x64 px", "same size")),
    Case("masks: wrong rank", "Train Concepts masks", lambda e: e.train(masks=e.masks()[None]),
         ("masks input", "[count, height, width]", "(1, 2, 64, 64)")),
    Case("masks: all zero", "Train Concepts masks",
         lambda e: e.train(masks=torch.cat([e.masks()[:1], torch.zeros(1, SIZE, SIZE)])),
         ("mask 2 is empty", "cover its object")),
    Case("masks: all one", "Train Concepts masks", lambda e: e.train(masks=torch.ones(2, SIZE, SIZE)),
         ("masks 1 and 2 overlap on 100%", "its own object")),
    Case("masks: one all-one beside a small one", "Train Concepts masks",
         lambda e: e.train(masks=torch.stack([torch.ones(SIZE, SIZE), e.masks()[1]])),
         ("masks 1 and 2 overlap", "not the whole picture")),
    Case("masks: overlapping objects", "Train Concepts masks", lambda e: e.train(masks=_overlapping(e)),
         ("masks 1 and 2 overlap on 64%", "at most 50%")),
    Case("masks: NaN", "Train Concepts masks", lambda e: e.train(masks=_with(float("nan"), (2, SIZE, SIZE))),
         ("masks contain NaN or infinite",)),
    # ----- triggers and class phrases
    Case("concepts: empty text", "Train Concepts concepts", lambda e: parse_concept_specs("  \n"),
         ("no concepts given", "'V1: cat'")),
    Case("concepts: no colon", "Train Concepts concepts", lambda e: parse_concept_specs("V1 cat"),
         ("cannot read 'V1 cat'", "TRIGGER: class")),
    Case("trigger: two concepts share it", "Train Concepts concepts",
         lambda e: parse_concept_specs("V1: cat\nV1: dog"), ("trigger 'v1' is used twice",)),
    Case("trigger: same up to case", "Train Concepts concepts",
         lambda e: parse_concept_specs("sks: cat\nSKS: dog"), ("used twice", "its own trigger")),
    Case("trigger: a common word ('photo')", "Train Concepts concepts",
         lambda e: parse_concept_specs("photo: cat"), ("trigger 'photo' is a common word", "made-up word")),
    Case("trigger: an article ('a')", "Train Concepts concepts", lambda e: parse_concept_specs("a: cat"),
         ("trigger 'a' is a common word",)),
    Case("trigger: another concept's class word", "Train Concepts concepts",
         lambda e: parse_concept_specs("dog: cat\nV2: dog"), ("trigger 'dog' is also a class word",)),
    Case("trigger: equal to its own class", "Train Concepts concepts",
         lambda e: parse_concept_specs("cat: cat"), ("must differ from its class word",)),
    Case("trigger: not a word", "Train Concepts concepts", lambda e: parse_concept_specs("1V: cat"),
         ("trigger '1V' must be one word", "starting with a letter")),
    Case("trigger: common word through the library call", "train_concepts specs",
         lambda e: e.train(specs=[ConceptSpec("the", "cat")]), ("trigger 'the' is a common word",)),
    Case("class: missing", "Train Concepts concepts", lambda e: parse_concept_specs("V1:"),
         ("'V1' has no class word", "'V1: cat'")),
    Case("class: a special token", "Train Concepts concepts",
         lambda e: e.train(specs=[ConceptSpec("V1", "<|endoftext|>")]),
         ("class phrase '<|endoftext|>'", "no ordinary tokens", "plain word")),
    Case("caption: without any trigger", "Train Concepts caption",
         lambda e: e.train(caption="a photo of a cat and a dog"),
         ("caption 'a photo of a cat and a dog' must contain 'V1 cat'",)),
    Case("caption: trigger not before its class", "Train Concepts caption",
         lambda e: e.train(caption="a photo of a V1 and a cat, V2 dog"), ("must contain 'V1 cat'",)),
    Case("caption: trigger written twice", "Train Concepts caption",
         lambda e: e.train(caption="V1 cat, a photo of V1 cat and V2 dog"),
         ("uses the trigger 'V1' 2 times", "write it once")),
    Case("concepts: more than CLIP can bind", "Train Concepts concepts",
         lambda e: e.train(specs=[ConceptSpec(f"V{i}", "cat") for i in range(30)]),
         ("longer than CLIP's 75-token window", "30 concepts", "Merge Concepts")),
    # ----- settings
    Case("steps: 0", "Train Concepts steps", lambda e: e.train(steps=0), ("steps must be", "at least 1")),
    Case("micro_batch: 0", "Train Concepts micro_batch", lambda e: e.train(micro_batch=0),
         ("micro_batch must be", "at least 1")),
    Case("grad_accumulation: -1", "Train Concepts grad_accumulation",
         lambda e: e.train(grad_accumulation=-1), ("grad_accumulation must be",)),
    Case("resolution: not a multiple of 8", "Train Concepts resolution", lambda e: e.train(resolution=100),
         ("resolution must be a multiple of 8", "512")),
    Case("resolution: below 64", "Train Concepts resolution", lambda e: e.train(resolution=32),
         ("resolution must be", "at least 64")),
    Case("learning_rate: NaN", "Train Concepts learning_rate",
         lambda e: e.train(learning_rate=float("nan")), ("learning_rate must be a positive finite",)),
    Case("learning_rate: inf", "Train Concepts learning_rate",
         lambda e: e.train(learning_rate=float("inf")), ("learning_rate must be a positive finite",)),
    Case("learning_rate: 0", "Train Concepts learning_rate", lambda e: e.train(learning_rate=0.0),
         ("learning_rate must be a positive finite", "8e-5")),
    Case("precision: unknown", "Train Concepts precision", lambda e: e.train(autocast="fp8"),
         ("precision/autocast must be", "'bf16'")),
    Case("token_bank: negative", "Train Concepts token_bank", lambda e: e.train(token_bank=-1),
         ("token_bank must be",)),
    # ----- soft and faint masks (the overlap counts soft masks by how much they cover)
    Case("masks: two soft 0.5 masks over the whole picture", "Train Concepts masks",
         lambda e: e.train(masks=torch.full((2, SIZE, SIZE), 0.5)),
         ("masks 1 and 2 overlap on 100%", "soft masks counted by how much they cover")),
    Case("masks: soft 0.7 and 0.4 over the whole picture", "Train Concepts masks",
         lambda e: e.train(masks=torch.stack([torch.full((SIZE, SIZE), 0.7), torch.full((SIZE, SIZE), 0.4)])),
         ("masks 1 and 2 overlap on 100%",)),
    Case("masks: soft 0.9 and a faint 0.2 over the whole picture", "Train Concepts masks",
         lambda e: e.train(masks=torch.stack([torch.full((SIZE, SIZE), 0.9), torch.full((SIZE, SIZE), 0.2)])),
         ("masks 1 and 2 overlap on 100%",)),
    Case("masks: a faint 0.5 mask beside an object", "Train Concepts masks",
         lambda e: e.train(masks=torch.stack([e.masks()[0] * 0.5, e.masks()[1]])),
         ("mask 1 is too faint", "strongest value is 0.50", "paint the object white")),
    Case("masks: two faint 0.3 object masks", "Train Concepts masks", lambda e: e.train(masks=e.masks() * 0.3),
         ("mask 1 is too faint", "0.30")),
    # ----- prior images are named as prior images
    Case("prior image: NaN", "Train Concepts prior_images",
         lambda e: e.train(prior=[(_with(NAN)[0], "a photo of a cat")]),
         ("prior image 1 (prior_images) contains NaN or infinite", "reload")),
    Case("prior image: 32 px", "Train Concepts prior_images",
         lambda e: e.train(prior=[(torch.rand(32, 32, 3), "a photo of a cat")]),
         ("prior image 1 (prior_images) is 32x32 px", "at least 64 px")),
    Case("prior image: the second has 2 channels", "Train Concepts prior_images",
         lambda e: e.train(prior=[(e.image()[0], "a cat"), (torch.rand(SIZE, SIZE, 2), "a dog")]),
         ("prior image 2 (prior_images) has 2 channels",)),
    Case("prior image: inf through the node", "Train Concepts prior_images",
         lambda e: e.train_node(prior_images=_with(INF), prior_captions="a photo of a cat"),
         ("prior image 1 (prior_images) contains NaN or infinite",)),
    # ----- numbers the server's range check lets through (NaN) or library callers pass
    Case("attention_weight: NaN", "Train Concepts attention_weight", lambda e: e.train_node(attention_weight=NAN),
         ("'attention_weight' must be a finite number from 0 to 10, got nan",)),
    Case("attention_weight: inf", "Train Concepts attention_weight", lambda e: e.train_node(attention_weight=INF),
         ("'attention_weight' must be a finite number", "got inf")),
    Case("learning_rate: NaN through the node", "Train Concepts learning_rate",
         lambda e: e.train_node(learning_rate=NAN), ("'learning_rate' must be a finite number",)),
    # ----- triggers that cannot be file names, or hide characters
    Case("trigger: a Windows device name ('CON')", "Train Concepts concepts",
         lambda e: parse_concept_specs("CON: cat"), ("trigger 'CON' is a device name on Windows", "V1")),
    Case("trigger: 'com1'", "Train Concepts concepts", lambda e: parse_concept_specs("V1: cat\ncom1: dog"),
         ("trigger 'com1' is a device name on Windows",)),
    Case("trigger: 'LPT9' through the library call", "train_concepts specs",
         lambda e: e.train(specs=[ConceptSpec("LPT9", "cat")]), ("trigger 'LPT9' is a device name",)),
    Case("trigger: with a zero-width space", "Train Concepts concepts",
         lambda e: parse_concept_specs("V\u200b1: cat"), ("must be one word of letters",)),
    Case("class: with a bidi override", "Train Concepts concepts", lambda e: parse_concept_specs("V1: cat\u202e"),
         ("class phrase of 'V1' contains an invisible or control character (U+202E)",)),
    # ----- writing onto a folder
    Case("save_name: a folder of that name", "Train Concepts save_name",
         lambda e: e.train_node(save_name=TAKEN), ("is a folder, not a file", "another save_name")),
]

SAMPLING: list[Case] = [
    Case("latent: NaN (KSampler with Concepts)", "KSampler with Concepts latent_image",
         lambda e: e.sampler(latent=_nan_latent()), ("'latent_image' contains NaN or infinite", "re-encode")),
    Case("latent: inf (composition off)", "KSampler with Concepts latent_image",
         lambda e: e.sampler("off", latent={"samples": torch.full((1, 4, 8, 8), float("inf"))}),
         ("'latent_image' contains NaN or infinite",)),
    Case("latent: empty", "KSampler with Concepts latent_image",
         lambda e: e.sampler(latent={"samples": torch.zeros(0, 4, 8, 8)}), ("'latent_image' has samples",)),
    Case("latent: not a LATENT", "KSampler with Concepts latent_image",
         lambda e: e.sampler(latent=torch.zeros(1, 4, 8, 8)), ("'latent_image' is not a LATENT",)),
    Case("latent: NaN (KSampler with Attention Maps)", "KSampler with Attention Maps latent_image",
         lambda e: e.maps(latent=_nan_latent()), ("'latent_image' contains NaN",)),
    Case("regional: no masks", "KSampler with Concepts masks", lambda e: e.sampler("regional"),
         ("regional composition needs a MASK",)),
    Case("regional: wrong mask count", "KSampler with Concepts masks",
         lambda e: e.sampler("regional", masks=torch.ones(2, 64, 64)),
         ("1 concept sets are connected but 'masks' holds 2 masks",)),
    Case("regional: NaN mask", "KSampler with Concepts masks",
         lambda e: e.sampler("regional", masks=torch.full((1, 64, 64), float("nan"))),
         ("'masks' contains NaN or infinite",)),
    Case("regional_auto: no clip or text", "KSampler with Concepts clip/positive_text",
         lambda e: e.sampler("regional_auto"), ("regional_auto needs 'clip' and 'positive_text'",)),
    Case("regional_auto: text is not the positive", "KSampler with Concepts positive_text",
         lambda e: e.sampler("regional_auto", clip=e.b.clip, positive_text="a photo of a bird"),
         ("'positive_text' encoded with 'clip' does not give the 'positive'",)),
    Case("maps: word absent from the prompt", "KSampler with Attention Maps words",
         lambda e: e.maps(words="dog"), ("the word 'dog' does not occur in the prompt",)),
    Case("maps: no words", "KSampler with Attention Maps words", lambda e: e.maps(words=" , "),
         ("no words given",)),
    Case("maps: unknown layer", "KSampler with Attention Maps layers", lambda e: e.maps(layers="output:99:0"),
         ("layer selector 'output:99:0' matches no cross-attention layer",)),
    Case("nested: subject word absent", "Apply Nested Attention text",
         lambda e: ApplyNestedAttention.execute(e.b.model, e.b.clip, "a photo of a cat",
                                                SubjectSpec("dog", bank=torch.randn(4, 32))),
         ("the word 'dog' does not occur",)),
    Case("nested: bank of another architecture", "Apply Nested Attention subject_1",
         lambda e: ApplyNestedAttention.execute(e.b.model, e.b.clip, "a photo of a cat",
                                                SubjectSpec("cat", bank=torch.randn(4, 80))),
         ("token bank for 'cat' has width 80", "another model architecture")),
    Case("nested: concept without a bank", "Nested Subject (Concept Token Bank) concepts",
         lambda e: NestedSubjectFromConcepts.execute(e.set(), "V1", 1.0, 1.0),
         ("concept 'V1' has no token bank", "token_bank > 0")),
    Case("nested: unknown trigger", "Nested Subject (Concept Token Bank) trigger",
         lambda e: NestedSubjectFromConcepts.execute(e.set(), "V9", 1.0, 1.0), ("no concept 'V9'", "it has V1")),
    Case("concepts: SD1.5 set on an SDXL model", "Apply Concepts model",
         lambda e: apply_concepts(e.xl.model, e.xl.clip, e.set()),
         ("trained for a SD15 model", "MODEL given is SDXL", "load a base model")),
    Case("concepts: SDXL set on an SD1.5 model", "Apply Concepts model",
         lambda e: apply_concepts(e.b.model, e.b.clip, e.set(xl=True)),
         ("trained for a SDXL model", "MODEL given is SD15")),
    Case("concepts: SDXL set with an SD1.5 CLIP only", "Apply Concepts clip",
         lambda e: apply_concepts(None, e.b.clip, e.set(xl=True)), ("text encoders", "CLIP given has")),
    Case("concepts: SDXL set in the sampler on SD1.5", "KSampler with Concepts concepts_1",
         lambda e: e.sampler(concepts_1=e.set(xl=True)), ("trained for a SDXL model",)),
    Case("merge: triggers collide across sets", "Merge Concepts concepts_2",
         lambda e: MergeConcepts.execute(e.b.model, e.b.clip, e.set(["V1"], 1), e.set(["V1"], 2)),
         ("trigger words must be unique across the merged sets", "rename one")),
    Case("merge: triggers equal up to case", "Merge Concepts concepts_2",
         lambda e: MergeConcepts.execute(e.b.model, e.b.clip, e.set(["V1"], 1), e.set(["v1"], 2)),
         ("trigger words must be unique",)),
    Case("merge: an empty second set", "Merge Concepts concepts_2",
         lambda e: MergeConcepts.execute(e.b.model, e.b.clip, e.set(["V1"], 1), e.set([], 2)),
         ("concepts_2", "holds no concepts", "Train Concepts")),
    Case("merge: an empty first set", "Merge Concepts concepts_1",
         lambda e: MergeConcepts.execute(e.b.model, e.b.clip, e.set([], 1), e.set(["V2"], 2)),
         ("concepts_1", "holds no concepts")),
    Case("merge: save_name a folder", "Merge Concepts save_name",
         lambda e: MergeConcepts.execute(e.b.model, e.b.clip, e.set(["V1"], 1), e.set(["V2"], 2), save_name=TAKEN),
         ("is a folder, not a file",)),
    # ----- NaN, infinite or out-of-range numbers (ComfyUI's range check does not catch NaN)
    Case("strength: NaN (Apply Concepts)", "Apply Concepts strength",
         lambda e: ApplyConcepts.execute(e.b.model, e.b.clip, e.set(), NAN),
         ("'strength' must be a finite number from -2 to 2, got nan",)),
    Case("strength: inf (Apply Concepts)", "Apply Concepts strength",
         lambda e: ApplyConcepts.execute(e.b.model, e.b.clip, e.set(), INF), ("'strength'", "got inf")),
    Case("strength: 5 (Apply Concepts)", "Apply Concepts strength",
         lambda e: ApplyConcepts.execute(e.b.model, e.b.clip, e.set(), 5.0), ("from -2 to 2, got 5.0",)),
    Case("strength: NaN through the library call", "apply_concepts strength",
         lambda e: apply_concepts(e.b.model, e.b.clip, e.set(), NAN), ("'strength' must be a finite number",)),
    Case("strength: NaN (KSampler with Concepts)", "KSampler with Concepts strength",
         lambda e: e.sampler(strength=NAN), ("'strength' must be a finite number", "got nan")),
    Case("denoise: NaN (KSampler with Concepts)", "KSampler with Concepts denoise",
         lambda e: e.sampler(denoise=NAN), ("'denoise' must be a finite number from 0 to 1",)),
    Case("cfg: inf (KSampler with Concepts)", "KSampler with Concepts cfg", lambda e: e.sampler(cfg=INF),
         ("'cfg' must be a finite number from 0 to 100",)),
    Case("auto_steps: NaN", "KSampler with Concepts auto_steps",
         lambda e: e.sampler("regional_auto", clip=e.b.clip, positive_text=PROMPT, auto_steps=NAN),
         ("'auto_steps' must be a finite number from 0.05 to 0.95, got nan",)),
    Case("region_threshold: NaN", "KSampler with Concepts region_threshold",
         lambda e: e.sampler("regional_auto", clip=e.b.clip, positive_text=PROMPT, region_threshold=NAN),
         ("'region_threshold' must be a finite number",)),
    Case("denoise: 0 in regional_auto", "KSampler with Concepts denoise",
         lambda e: e.sampler("regional_auto", clip=e.b.clip, positive_text=PROMPT, denoise=0.0),
         ("'denoise' is 0", "regional_auto finds its regions while sampling", "above 0")),
    Case("steps: 1 in regional_auto", "KSampler with Concepts steps",
         lambda e: e.sampler("regional_auto", concepts_1=e.set(), clip=apply_concepts(None, e.b.clip, e.set())[1],
                             positive_text="a photo of V1 cat",
                             positive=_encode(apply_concepts(None, e.b.clip, e.set())[1], "a photo of V1 cat")),
         ("'steps' is 1", "at least 2 sampling steps")),
    Case("denoise: 0 (KSampler with Attention Maps)", "KSampler with Attention Maps denoise",
         lambda e: e.maps(denoise=0.0), ("'denoise' is 0", "no attention map can be recorded")),
    Case("denoise: NaN (KSampler with Attention Maps)", "KSampler with Attention Maps denoise",
         lambda e: e.maps(denoise=NAN), ("'denoise' must be a finite number",)),
    Case("step_start: NaN (KSampler with Attention Maps)", "KSampler with Attention Maps step_start",
         lambda e: e.maps(step_start=NAN), ("'step_start' must be a finite number from 0 to 1",)),
    Case("nested: strength NaN", "Nested Subject (Concept Token Bank) strength",
         lambda e: NestedSubjectFromConcepts.execute(e.set(), "V1", NAN, 1.0),
         ("'strength' must be a finite number from 0 to 4, got nan",)),
    Case("nested: token_weight inf", "Nested Subject (Concept Token Bank) token_weight",
         lambda e: NestedSubjectFromConcepts.execute(e.set(), "V1", 1.0, INF), ("'token_weight' must be a finite",)),
    Case("nested: image subject strength NaN", "Nested Subject (Image) strength",
         lambda e: NestedSubjectFromImage.execute(None, None, e.image(), "cat", NAN, 1.0),
         ("'strength' must be a finite number",)),
    Case("nested: start_percent NaN", "Apply Nested Attention start_percent",
         lambda e: ApplyNestedAttention.execute(e.b.model, e.b.clip, "a photo of a cat",
                                                SubjectSpec("cat", bank=torch.randn(4, 32)), start_percent=NAN),
         ("'start_percent' must be a finite number from 0 to 1",)),
    # ----- finite but absurd concept values (they sample black pictures)
    Case("concepts: K/V deltas 100 times the weights", "Apply Concepts concepts",
         lambda e: ApplyConcepts.execute(e.b.model, e.b.clip, e.scaled(kv=400.0), 1.0),
         ("times the size of the weight it changes", "train the concepts again")),
    Case("concepts: K/V deltas 1e30", "Apply Concepts concepts",
         lambda e: apply_concepts(e.b.model, e.b.clip, e.scaled(kv=2e31)),
         ("the K/V delta", "holds values up to", "e+3", "lower learning rate")),
    Case("concepts: token vectors 3e38", "Apply Concepts concepts",
         lambda e: apply_concepts(None, e.b.clip, e.scaled(embeddings=1e38)),
         ("token vector of 'V1' for clip_l holds values up to",)),
    Case("concepts: token vectors 100 times the CLIP's", "Apply Concepts concepts",
         lambda e: apply_concepts(None, e.b.clip, e.scaled(embeddings=40.0)),
         ("times longer than the CLIP's longest own token vector", "train the concepts again")),
    Case("concepts: a NaN K/V delta in memory", "KSampler with Concepts concepts_1",
         lambda e: e.sampler(concepts_1=e.scaled(kv=NAN)), ("contains", "NaN or infinite values")),
    Case("concepts: absurd deltas in KSampler with Concepts", "KSampler with Concepts concepts_2",
         lambda e: e.sampler(concepts_2=e.scaled(kv=400.0, triggers=("V2",))), ("times the size of the weight",)),
    Case("concepts: absurd deltas in Merge Concepts", "Merge Concepts concepts_1",
         lambda e: MergeConcepts.execute(e.b.model, e.b.clip, e.scaled(kv=400.0), e.set(["V2"], 2)),
         ("times the size of the weight",)),
    Case("concepts: a trigger 'a' in a file", "Load Concepts concept_name",
         lambda e: LoadConcepts.execute(e.bad_file("trigger_a.safetensors", lambda c: [{**c[0], "trigger": "a"}])),
         ("trigger_a.safetensors", "trigger 'a' is a common word", "made-up trigger word")),
    Case("concepts: a trigger 'CON' in a file", "Load Concepts concept_name",
         lambda e: LoadConcepts.execute(e.bad_file("trigger_con.safetensors",
                                                   lambda c: [{**c[0], "trigger": "CON"}])),
         ("trigger_con.safetensors", "device name on Windows")),
    # ----- what sampling gave: NaN everywhere is an error, not a black picture
    Case("sampling: a model patch giving NaN (KSampler with Concepts, off)", "KSampler with Concepts model",
         lambda e: e.sampler("off", model=e.nan_model()), ("sampling produced NaN or infinite values", "black")),
    Case("sampling: a model patch giving NaN (KSampler with Attention Maps)", "KSampler with Attention Maps model",
         lambda e: e.maps(model=e.nan_model()), ("KSampler with Attention Maps: sampling produced NaN",)),
]

TRAVERSAL_NAMES = ["../evil", "../../etc/passwd", "/etc/passwd", "a/b", "a\\b", "..", "sub/../x", ".hidden",
                   "", "x\x00y", "CON", "CONIN$", "COM\u00b9", "lpt\u00b2.v1", "evil\u202efdp", "zero\u200bwidth",
                   "bom\ufeff"]
FILE_NAMES: list[Case] = [
    *[Case(f"save_name: {name!r}", "Train Concepts save_name / Merge Concepts save_name",
           lambda e, n=name: concept_path(n), ("the save_name (a concept file name)", "no folders"))
      for name in TRAVERSAL_NAMES if name],
    *[Case(f"name: {name!r}", "Save Concepts name", lambda e, n=name: concept_path(n, "name"),
           ("cannot be used as the name (a concept file name)",)) for name in TRAVERSAL_NAMES],
    *[Case(f"export name: {name!r}", "Export Concepts name",
           lambda e, n=name: ExportConcepts.execute(e.set(), n, 0), ("the name (a LoRA file name)",))
      for name in TRAVERSAL_NAMES],
    *[Case(f"concept_name: {name!r}", "Load Concepts concept_name", lambda e, n=name: LoadConcepts.execute(n),
           ("is not a file in models/concepts", "choose one of the listed files"))
      for name in ["../evil.safetensors", "../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors"]],
    *[Case(f"concept_name: a link out of the folder ({name})", "Load Concepts concept_name",
           lambda e, n=name: LoadConcepts.execute(n), ("is a link to", "outside models/concepts", "copy the file"))
      for name in ["escape.safetensors", "linked_folder/inside.safetensors"]],
    Case("name: a folder of that name (Save Concepts)", "Save Concepts name",
         lambda e: SaveConcepts.execute(e.set(), TAKEN), ("is a folder, not a file", "another name")),
    Case("name: a folder of that name, overwrite on (Save Concepts)", "Save Concepts name",
         lambda e: SaveConcepts.execute(e.set(), TAKEN, overwrite=True), ("is a folder, not a file",)),
    Case("export name: a folder of that name", "Export Concepts name",
         lambda e: ExportConcepts.execute(e.set(), TAKEN, 0), ("is a folder, not a file",)),
]

CATALOGUE: list[Case] = TRAINING + SAMPLING + FILE_NAMES


@pytest.fixture(scope="module")
def env(sd15: Any, sdxl: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Inputs built on the session's tiny SD1.5 and SDXL bundles; ComfyUI's concepts, loras and
    embeddings folders point at temporary ones holding a folder named like each writer's file,
    and links in models/concepts that lead out of it."""
    import folder_paths

    from concept_attention.nodes import register_model_folders

    register_model_folders()
    models = tmp_path_factory.mktemp("bad_inputs_models")
    outside = tmp_path_factory.mktemp("outside_the_models")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("concepts", "loras", "embeddings"):
            (models / name / f"{TAKEN}.safetensors").mkdir(parents=True)
            _, extensions = folder_paths.folder_names_and_paths[name]
            patch.setitem(folder_paths.folder_names_and_paths, name, ([str(models / name)], extensions))
        write_concept_file(outside / "inside.safetensors", [("V1", "cat")])
        (models / "concepts" / "escape.safetensors").symlink_to(outside / "inside.safetensors")
        (models / "concepts" / "linked_folder").symlink_to(outside, target_is_directory=True)
        folder_paths.filename_list_cache.clear()
        yield Env(sd15, sdxl, models)
    folder_paths.filename_list_cache.clear()


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_bad_input_gives_a_clear_error(env: Env, case: Case) -> None:
    with pytest.raises(Exception) as caught:
        case.call(env)
    assert type(caught.value) is case.error or isinstance(caught.value, case.error), \
        f"{case.id}: {type(caught.value).__name__}: {caught.value}"
    text = str(caught.value)
    for words in case.expect:
        assert words in text, f"{case.id}: expected {words!r} in: {text}"


ACCEPTED: list[tuple[str, Callable[[Env], Any]]] = [
    ("image: RGBA (alpha dropped)", lambda e: prepare_image(torch.rand(1, SIZE, SIZE, 4)).shape == (SIZE, SIZE, 3)),
    ("image: greyscale (expanded to RGB)",
     lambda e: prepare_image(torch.rand(1, SIZE, SIZE, 1)).shape == (SIZE, SIZE, 3)),
    ("image: values beyond [0, 1] (clamped)", lambda e: float(prepare_image(_with(7.0)).max()) == 1.0),
    ("masks: touching objects (overlap under 50%)",
     lambda e: ConceptTrainer(e.b.model, e.b.clip, e.b.vae, e.image(), SPECS,
                              TrainSettings(steps=1, resolution=SIZE), masks=e.masks()) is not None),
    ("class: the same class for two concepts",
     lambda e: ConceptTrainer(e.b.model, e.b.clip, e.b.vae, e.image(),
                              [ConceptSpec("V1", "cat"), ConceptSpec("V2", "cat")],
                              TrainSettings(steps=1, resolution=SIZE)) is not None),
    ("caption: class word repeated elsewhere",
     lambda e: ConceptTrainer(e.b.model, e.b.clip, e.b.vae, e.image(), SPECS,
                              TrainSettings(steps=1, resolution=SIZE,
                                            caption="a cat: photo of a V1 cat and V2 dog")) is not None),
    ("clip: from Apply Concepts (triggers known)",
     lambda e: ConceptTrainer(e.b.model, apply_concepts(None, e.b.clip, e.set(["V1"]))[1], e.b.vae,
                              e.image(), SPECS, TrainSettings(steps=1, resolution=SIZE)) is not None),
    ("masks: soft masks fading into each other (overlap 50%)",
     lambda e: ConceptTrainer(e.b.model, e.b.clip, e.b.vae, e.image(), SPECS, TrainSettings(steps=1, resolution=SIZE),
                              masks=_ramps()) is not None),
    ("strength: -2 and 2, the ends of the range",
     lambda e: all(ApplyConcepts.execute(e.b.model, e.b.clip, e.set(), s) is not None for s in (-2.0, 2.0))),
    ("concepts: K/V deltas as large as the weights",
     lambda e: apply_concepts(e.b.model, e.b.clip, e.scaled(kv=4.0))[0] is not None),
]


def _ramps() -> torch.Tensor:
    """Two soft masks fading across the picture in opposite directions."""
    ramp = torch.linspace(0, 1, SIZE).expand(SIZE, SIZE)
    return torch.stack([ramp, 1 - ramp])


@pytest.mark.parametrize("case,check", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_accepted_inputs(env: Env, case: str, check: Callable[[Env], Any]) -> None:
    assert check(env) is True, case


def test_every_catalogue_row_is_in_the_reliability_document() -> None:
    text = DOC.read_text(encoding="utf-8")
    rows = [c.id for c in TRAINING + SAMPLING] + [a[0] for a in ACCEPTED]
    missing = [row for row in rows if f"`{row}`" not in text]
    assert not missing, f"docs/reliability.md does not list: {missing}"
    for group in ("save_name", "Save Concepts name", "Export Concepts name", "Load Concepts concept_name"):
        assert group in text
    assert re.search(r"test_bad_inputs\.py", text)


KNOWN = ["zebra", "sks", "pikachu", "eiffel"]
MADE_UP = ["V1", "Vxq7", "sks_cat"]


@pytest.mark.parametrize("trigger", KNOWN + MADE_UP)
def test_a_trigger_the_clip_already_knows_is_warned_about(env: Env, trigger: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ConceptTrainer(env.b.model, env.b.clip, env.b.vae, env.image(),
                       [ConceptSpec(trigger, "cat")], TrainSettings(steps=1, resolution=SIZE))
    warned = f"trigger {trigger!r} is a word this CLIP already knows" in caplog.text
    assert warned == (trigger in KNOWN), caplog.text
    if warned:
        assert "a made-up word such as V1 is safer" in caplog.text


def test_a_flat_sampled_latent_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    from concept_attention.nodes.common import check_sampled

    with caplog.at_level(logging.WARNING):
        check_sampled({"samples": torch.randn(1, 4, 8, 8)}, "KSampler with Concepts")
        assert caplog.text == ""
        check_sampled({"samples": torch.full((1, 4, 8, 8), 0.25)}, "KSampler with Concepts")
    assert "the sampled latent is one value everywhere (0.25)" in caplog.text
