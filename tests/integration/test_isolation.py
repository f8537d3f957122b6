"""Isolation and release of patches, library mode (docs/reliability.md, "Isolation" and "Growth").

* After any of the pack's nodes, the MODEL and CLIP they were given are unchanged (options,
  patches, wrappers, weights, tokenizer) and stock sampling of the original model is
  bit-identical to before.
* Two workflows run back to back (and the same workflow with other concepts) never see each
  other's concepts, hooks or recorded maps: each result equals the one computed alone.
* 20 repeated runs of a workflow that uses every sampling node grow nothing: the original
  model's options, the number of hooks a run installs, live tensors, Python heap (tracemalloc)
  and RSS are measured, with thresholds.
"""
from __future__ import annotations

import gc
import logging
import os
import tracemalloc
from typing import Any

import pytest
import torch

from concept_attention.nodes.compose import ConceptSampler, MergeConcepts
from concept_attention.nodes.nested import ApplyNestedAttention, NestedSubjectFromConcepts
from concept_attention.nodes.preview import AttentionMapSampler
from concept_attention.concepts.apply import apply_concepts
from concept_attention.concepts.concept_set import Concept, ConceptSet
from concept_attention.concepts.specs import ConceptSpec
from concept_attention.training.loop import train_concepts
from concept_attention.training.settings import TrainSettings
from concept_attention.sampling.nested_subjects import SubjectSpec
from concept_attention.concepts.triggers import TriggerTokenizer
from support.synthetic_concepts import synthetic_set

log = logging.getLogger(__name__)

PROMPT = "a photo of V1 cat and V2 dog"
REPEATS = 20
TRACED_RUNS = 5  # the last runs of the 20, with tracemalloc on
# Thresholds for the 20 measured runs (after two warm-up runs); measured figures are in
# docs/reliability.md. Live tensors and model options must not grow at all.
MAX_TRACEMALLOC_GROWTH = 512 << 10  # bytes of Python heap over the traced runs (mostly ComfyUI weight patching)
MAX_RSS_GROWTH = 48 << 20  # bytes; allocator noise on a shared machine, a leak of one latent per run would be visible in tensors


pytestmark = pytest.mark.usefixtures("one_thread")


def _structure(value: Any) -> Any:
    """A comparable picture of nested options: dict keys, list lengths, object identities."""
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, len(value), [_structure(v) for v in value]]
    return (type(value).__name__, id(value))


def model_state(model: Any) -> dict[str, Any]:
    """Everything of a ModelPatcher a node could leak into."""
    return {
        "model_options": _structure(model.model_options),
        "patches": {k: len(v) for k, v in model.patches.items()},
        "object_patches": sorted(model.object_patches),
        "weight_wrappers": {k: len(v) for k, v in model.weight_wrapper_patches.items()},
        "hook_patches": len(model.hook_patches),
        "wrappers": _structure(model.wrappers),
        "callbacks": _structure(model.callbacks),
        "attachments": sorted(model.attachments),
    }


def weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def clip_state(clip: Any) -> dict[str, Any]:
    return {"tokenizer": id(clip.tokenizer), "type": type(clip.tokenizer).__name__,
            "patcher": model_state(clip.patcher)}


def latent(size: int = 8) -> dict:
    return {"samples": torch.zeros(1, 4, size, size)}


class Workflow:
    """The pack's sampling nodes on one tiny bundle, each call as a graph would make it."""

    def __init__(self, sd15: Any) -> None:
        self.sd15 = sd15
        self.b = sd15.bundle

    def encode(self, clip: Any, text: str) -> Any:
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    def stock(self, model: Any = None, seed: int = 3) -> torch.Tensor:
        from concept_attention.sampling.ksampler import run_ksampler

        return run_ksampler(model or self.b.model, seed, 2, 5.0, "euler", "normal",
                            self.encode(self.b.clip, "a photo of a cat and a dog"),
                            self.encode(self.b.clip, ""), latent(), 1.0)["samples"]

    def applied(self, concepts: ConceptSet, seed: int = 3) -> torch.Tensor:
        """Apply Concepts -> CLIPTextEncode -> KSampler."""
        from concept_attention.sampling.ksampler import run_ksampler

        model, clip = apply_concepts(self.b.model, self.b.clip, concepts)
        return run_ksampler(model, seed, 2, 5.0, "euler", "normal", self.encode(clip, PROMPT),
                            self.encode(clip, ""), latent(), 1.0)["samples"]

    def concept_sampler(self, composition: str, *sets: ConceptSet, clip: Any = None) -> torch.Tensor:
        clip = clip or apply_concepts(None, self.b.clip, sets[0])[1]
        extra: dict[str, Any] = {}
        if composition == "regional":
            masks = torch.zeros(len(sets), 64, 64)
            masks[0, :, :32] = 1
            if len(sets) > 1:
                masks[1, :, 32:] = 1
            extra["masks"] = masks
        if composition == "regional_auto":
            extra.update(clip=clip, positive_text=PROMPT, auto_steps=0.5)
        out = ConceptSampler.execute(
            model=self.b.model, concepts_1=sets[0], concepts_2=sets[1] if len(sets) > 1 else None,
            composition=composition, strength=1.0, seed=4, steps=2, cfg=5.0, sampler_name="euler",
            scheduler="normal", positive=self.encode(clip, PROMPT), negative=self.encode(clip, ""),
            latent_image=latent(), denoise=1.0, **extra)
        return out.result[0]["samples"]

    def maps(self, words: str) -> torch.Tensor:
        out = AttentionMapSampler.execute(
            self.b.model, self.b.clip, "a photo of a cat and a dog", words, seed=5, steps=2, cfg=5.0,
            sampler_name="euler", scheduler="normal", negative=self.encode(self.b.clip, ""),
            latent_image=latent(), denoise=1.0, layers="all", step_start=0.0, step_end=1.0)
        return out.result[2]

    def nested(self, bank: torch.Tensor) -> torch.Tensor:
        from concept_attention.sampling.ksampler import run_ksampler

        model, positive = ApplyNestedAttention.execute(self.b.model, self.b.clip, "a photo of a cat",
                                                       SubjectSpec("cat", bank=bank)).result
        return run_ksampler(model, 6, 2, 5.0, "euler", "normal", positive,
                            self.encode(self.b.clip, ""), latent(), 1.0)["samples"]


@pytest.fixture(scope="module")
def wf(sd15: Any) -> Workflow:
    return Workflow(sd15)


@pytest.fixture(scope="module")
def sets(sd15: Any) -> tuple[ConceptSet, ConceptSet]:
    """Two sets with the SAME trigger names and different vectors and deltas."""
    return (synthetic_set(sd15.bundle, ["V1", "V2"], 11, scale=0.3),
            synthetic_set(sd15.bundle, ["V1", "V2"], 12, scale=0.3))


def _bank_set(sd15: Any, base: ConceptSet) -> ConceptSet:
    width = sd15.encode("a")[0][0].shape[-1]
    bank = 3 * torch.randn(4, width, generator=torch.Generator().manual_seed(9))
    concepts = [Concept(c.trigger, c.class_phrase, c.embeddings, bank) for c in base.concepts]
    return ConceptSet(concepts, base.kv_deltas, base.architecture, base.metadata)


def test_every_node_leaves_its_inputs_alone_and_stock_sampling_bit_identical(wf, sets, sd15):
    before_model, before_clip = model_state(wf.b.model), clip_state(wf.b.clip)
    before_weights = weights(wf.b.model)
    reference = wf.stock()
    a, b = sets
    wf.applied(a)
    for composition in ("off", "combined", "regional", "regional_auto"):
        wf.concept_sampler(composition, a, b)
    wf.maps("cat, dog")
    wf.nested(torch.randn(4, sd15.encode("a")[0][0].shape[-1]))
    NestedSubjectFromConcepts.execute(_bank_set(sd15, a), "V1", 1.0, 1.0)
    MergeConcepts.execute(wf.b.model, wf.b.clip, a, synthetic_set(wf.b, ["V3"], 13))
    train_concepts(wf.b.model, wf.b.clip, wf.b.vae, torch.full((1, 64, 64, 3), 0.5),
                   [ConceptSpec("V1", "cat")], TrainSettings(steps=1, micro_batch=1, grad_accumulation=1,
                                                             resolution=64, pool_size=1, token_bank=2))
    assert model_state(wf.b.model) == before_model
    assert clip_state(wf.b.clip) == before_clip
    after = weights(wf.b.model)
    assert after.keys() == before_weights.keys()
    assert all(torch.equal(after[k], before_weights[k]) for k in after), "a weight of the input model changed"
    assert torch.equal(wf.stock(), reference), "stock sampling of the original model changed"


def test_back_to_back_workflows_never_see_each_others_concepts(wf, sets):
    a, b = sets
    alone_b = wf.applied(b)
    alone_b_sampler = wf.concept_sampler("combined", b)
    wf.applied(a)  # the first workflow
    wf.concept_sampler("combined", a)
    assert torch.equal(wf.applied(b), alone_b)  # the second, with the same trigger names
    assert torch.equal(wf.concept_sampler("combined", b), alone_b_sampler)
    assert not torch.equal(wf.applied(a), alone_b)  # and the sets really differ


def test_the_original_clip_never_learns_a_trigger(wf, sets):
    plain = wf.encode(wf.b.clip, PROMPT)[0][0]
    _, clip_a = apply_concepts(None, wf.b.clip, sets[0])
    with_a = wf.encode(clip_a, PROMPT)[0][0]
    assert not torch.equal(with_a, plain)
    assert torch.equal(wf.encode(wf.b.clip, PROMPT)[0][0], plain)
    assert not isinstance(wf.b.clip.tokenizer, TriggerTokenizer)


def test_applying_to_an_applied_clip_replaces_triggers_without_nesting(wf, sets):
    a, b = sets
    _, clip_b = apply_concepts(None, wf.b.clip, b)
    _, clip_ab = apply_concepts(None, apply_concepts(None, wf.b.clip, a)[1], b)
    assert torch.equal(wf.encode(clip_ab, PROMPT)[0][0], wf.encode(clip_b, PROMPT)[0][0])
    clip = wf.b.clip
    for i in range(REPEATS):
        clip = apply_concepts(None, clip, sets[i % 2])[1]
    assert isinstance(clip.tokenizer, TriggerTokenizer)
    assert not isinstance(clip.tokenizer.original, TriggerTokenizer)
    assert sorted(clip.tokenizer.vectors) == ["V1", "V2"]


def test_recorded_maps_belong_to_their_own_run(wf):
    dog = wf.maps("dog")
    wf.maps("cat")
    wf.maps("cat, dog")
    assert torch.equal(wf.maps("dog"), dog)


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc")
def test_twenty_repeated_runs_grow_nothing(wf, sets, sd15):
    a, b = sets
    bank = torch.randn(4, sd15.encode("a")[0][0].shape[-1], generator=torch.Generator().manual_seed(2))
    options_before = model_state(wf.b.model)
    hooks_per_run: list[int] = []

    def one_run() -> None:
        patched = ApplyNestedAttention.execute(wf.b.model, wf.b.clip, "a photo of a cat",
                                               SubjectSpec("cat", bank=bank)).result[0]
        hooks_per_run.append(len(repr(_structure(patched.model_options))))
        wf.concept_sampler("combined", a, b)
        wf.concept_sampler("regional", a, b)
        wf.maps("cat, dog")
        wf.nested(bank)

    for _ in range(2):  # warm-up: lazy imports, caches, allocator pools
        one_run()
    tensors0, rss0 = _live_tensors(), _rss()
    tensors, heap, heap0 = [], 0, 0
    try:
        for run in range(REPEATS):
            if run == REPEATS - TRACED_RUNS - 1:  # tracing triples the run time: only the last runs
                tracemalloc.start()
            one_run()
            assert model_state(wf.b.model) == options_before
            if run % 5 == 4:  # counting every object is slow: every fifth run
                tensors.append(_live_tensors())
            if run == REPEATS - TRACED_RUNS - 1:  # after one traced run: ComfyUI's load state is set
                gc.collect()  # ComfyUI makes cyclic garbage (a namedtuple type per weight backup)
                heap0 = tracemalloc.get_traced_memory()[0]
        gc.collect()
        heap = tracemalloc.get_traced_memory()[0] - heap0
    finally:
        tracemalloc.stop()
    rss_growth = _rss() - rss0
    log.warning("%d repeats: live tensors %d -> %s; tracemalloc growth over the last %d runs %.1f KiB; "
                "RSS growth %.1f MiB; option-structure size per run %s", REPEATS, tensors0, tensors,
                TRACED_RUNS, heap / 1024, rss_growth / 2 ** 20, sorted(set(hooks_per_run)))
    assert len(set(hooks_per_run)) == 1, "a run installs more hooks than the one before"
    assert max(tensors) <= tensors0, f"live tensors grew: {tensors0} -> {tensors}"
    assert heap < MAX_TRACEMALLOC_GROWTH, f"Python heap grew by {heap} bytes"
    assert rss_growth < MAX_RSS_GROWTH, f"RSS grew by {rss_growth / 2 ** 20:.1f} MiB"
