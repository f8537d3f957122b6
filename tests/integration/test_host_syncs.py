"""Host synchronisations made by the pack's own code in a training step and in sampling steps.

Counted with ``devkit.syncs.SyncCounter`` (what it counts and why: its docstring): value reads of
tensors, blocking host-device copies and tensors built from Python data, made from pack code.
Each count is taken after one untimed warm-up call, so caches filled once per run are not
counted. Budgets:

- sampling with a map recorder, regional K/V deltas (with region texts, soft masks) or automatic
  regions: nothing at all per model evaluation;
- nested attention: one value read per model evaluation (which batch rows hold each subject:
  found once from the text features, then shared by every layer of that evaluation);
- a hook with a sigma window: one read of sigma per model evaluation;
- one DisenDiff optimizer step (two micro-batches, calibration on, masks): one value read (the
  finiteness flags and the logged losses, together), no blocking copy, no tensor from Python data;
  per micro-batch two non-blocking uploads (timesteps and noise come from the run's CPU generator,
  so a run draws the same numbers on every device). With trainable token vectors the text encoder
  runs per micro-batch, and ComfyUI's CLIP reads its tokens and returns features through the CPU
  (its own synchronisations, not counted here); with frozen ones each prompt is encoded once.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from concept_attention.attention.chain import AttentionHook
from concept_attention.attention.nested_hook import NestedSource
from concept_attention.attention.patching import install_hook, install_nested, install_regional
from concept_attention.attention.recorder import AttentionRecorder, MapStore
from concept_attention.concepts.concept_set import kv_weight_shapes
from concept_attention.concepts.specs import ConceptSpec
from concept_attention.sampling.ksampler import run_ksampler
from concept_attention.sampling.nested_subjects import encode_prompt
from concept_attention.training.loop import ConceptTrainer
from concept_attention.training.settings import TrainSettings
from concept_attention.training.text_encoder import clip_layers_out_of_place
from devkit.syncs import SyncCounter

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a photo of a cat and a dog"
LATENT, STEPS = 8, 2


def _sampler(sd15: Any) -> Any:
    positive, _ = encode_prompt(sd15.bundle.clip, PROMPT)
    negative, _ = encode_prompt(sd15.bundle.clip, "")

    def sample(model: Any) -> torch.Tensor:
        latent = {"samples": torch.zeros(1, 4, LATENT, LATENT)}
        return run_ksampler(model, 0, STEPS, 5.0, "euler", "normal", positive, negative, latent)["samples"]
    return sample


def _count(run: Any, warmups: int = 1) -> SyncCounter:
    for _ in range(warmups):  # caches are filled once per run (or per distinct prompt)
        run()
    with SyncCounter() as counter:
        run()
    print(counter.report())
    return counter


def _recorded(model: Any) -> Any:
    store = MapStore()
    store.set_words([[5], [8]])
    install_hook(model, AttentionRecorder(store=store), "all")
    return model


def _regional(model: Any, soft: bool = False) -> Any:
    generator = torch.Generator().manual_seed(1)
    sets = [{k: 0.05 * torch.randn(s, generator=generator) for k, s in kv_weight_shapes(model).items()}
            for _ in range(2)]
    masks = torch.zeros(2, LATENT, LATENT)
    masks[0, :, : LATENT // 2], masks[1, :, LATENT // 2:] = 1, 1
    if soft:
        masks[:, :, LATENT // 2 - 1: LATENT // 2 + 1] = 0.5
    texts = [torch.randn(1, 77, 32, generator=generator) for _ in range(2)]
    install_regional(model, sets, masks, texts)
    return model


def _nested(model: Any, clip: Any) -> Any:
    _, features = encode_prompt(clip, PROMPT)
    generator = torch.Generator().manual_seed(2)
    region = torch.zeros(LATENT, LATENT)
    region[:, : LATENT // 2] = 1
    subjects = [NestedSource(name=word, position=pos, signature=features[pos].clone(),
                             bank=torch.randn(4, features.shape[-1], generator=generator),
                             region=region if word == "dog" else None)
                for word, pos in (("cat", 5), ("dog", 8))]
    install_nested(model, subjects, "all", exclusive=True)
    return model


@pytest.mark.parametrize("kind", ["stock", "recorder", "regional", "regional_soft"])
def test_sampling_makes_no_host_sync(sd15, kind):
    sample = _sampler(sd15)
    model = sd15.bundle.model.clone()
    if kind == "recorder":
        _recorded(model)
    elif kind.startswith("regional"):
        _regional(model, soft=kind == "regional_soft")
    counter = _count(lambda: sample(model))
    assert counter.blocking == 0, counter.report()
    assert counter.counts["async_copy"] == 0


def test_nested_attention_reads_once_per_model_evaluation(sd15):
    sample = _sampler(sd15)
    model = _nested(sd15.bundle.model.clone(), sd15.bundle.clip)
    counter = _count(lambda: sample(model))
    assert counter.counts["read"] <= STEPS, counter.report()
    assert counter.counts["copy"] == counter.counts["build"] == 0, counter.report()


def test_sigma_window_reads_sigma_once_per_model_evaluation(sd15):
    sample = _sampler(sd15)
    model = _recorded(sd15.bundle.model.clone())
    install_hook(model, AttentionHook(sigma_max=5.0), "all")  # in the window for some steps only
    counter = _count(lambda: sample(model))
    assert counter.counts["read"] == STEPS, counter.report()
    assert counter.counts["copy"] == counter.counts["build"] == 0, counter.report()


@pytest.mark.parametrize("train_embeddings", [True, False])
def test_training_step_reads_once(sd15, train_embeddings):
    bundle = sd15.bundle
    settings = TrainSettings(steps=3, micro_batch=2, grad_accumulation=2, resolution=64, pool_size=2,
                             train_embeddings=train_embeddings)
    picture = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32], masks[1, :, 32:] = 1, 1
    with torch.inference_mode(False), torch.enable_grad():
        trainer = ConceptTrainer(bundle.model, bundle.clip, bundle.vae, picture,
                                 [ConceptSpec("V1", "cat"), ConceptSpec("V2", "dog")], settings, masks)
        pool, prior, params, optimizer = trainer.prepare()
        with clip_layers_out_of_place(trainer.clip.cond_stage_model):
            counter = _count(lambda: trainer.step(optimizer, params, pool, prior), warmups=3)
    assert counter.counts["read"] == 1, counter.report()
    assert counter.counts["copy"] == counter.counts["build"] == 0, counter.report()
    # timesteps and noise, drawn from the run's CPU generator: pinned, non-blocking uploads
    assert counter.counts["async_copy"] == 2 * settings.grad_accumulation, counter.report()
