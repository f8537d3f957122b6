"""Per-concept nested-attention token banks learned by the DisenDiff loop (``token_bank`` > 0).

Library mode on the shared tiny models; every run is a few steps at 64 px on one CPU thread.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from concept_attention.attention.nested_hook import NestedContextPatch
from concept_attention.attention.patching import nested_subjects
from concept_attention.nodes.nested import ApplyNestedAttention, NestedSubjectFromConcepts
from concept_attention.concepts.apply import apply_concepts
from concept_attention.concepts.concept_file import load_concepts, save_concepts
from concept_attention.concepts.specs import ConceptSpec
from concept_attention.training.loop import ConceptTrainer, train_concepts
from concept_attention.training.objective import TrainingObjective
from concept_attention.training.parameters import BANK_INIT_NOISE
from concept_attention.training.settings import TrainSettings
from concept_attention.training.text_encoder import clip_layers_out_of_place, encode_prompts

SIZE = 64
SPECS = [ConceptSpec("V1", "cat"), ConceptSpec("V2", "dog")]
CAPTION = "photo of a V1 cat and V2 dog"
PROMPT = "a photo of V1 cat"
TRIGGER_ROWS = [4, 7]  # [SOT] photo of a V1 cat and V2 dog


pytestmark = pytest.mark.usefixtures("one_thread")


def _picture() -> torch.Tensor:
    image = torch.full((1, SIZE, SIZE, 3), 0.5)
    image[0, 8:30, 6:28] = torch.tensor([0.9, 0.1, 0.1])
    image[0, 34:58, 36:60] = torch.tensor([0.1, 0.2, 0.9])
    return image


def _settings(**overrides: Any) -> TrainSettings:
    base = dict(steps=3, learning_rate=1e-2, micro_batch=2, grad_accumulation=1, resolution=SIZE,
                pool_size=2, seed=0, token_bank=4, bank_learning_rate=5e-2)
    base.update(overrides)
    return TrainSettings(**base)


def _train(bundle: Any, settings: TrainSettings) -> Any:
    return train_concepts(bundle.model, bundle.clip, bundle.vae, _picture(), SPECS, settings)


def _prepared(bundle: Any, settings: TrainSettings) -> tuple[ConceptTrainer, list]:
    trainer = ConceptTrainer(bundle.model, bundle.clip, bundle.vae, _picture(), SPECS, settings)
    pool, _, _, _ = trainer.prepare()
    return trainer, pool


@pytest.fixture(scope="module")
def trained(sd15) -> dict[str, Any]:
    """A 3-step run with banks of 4 tokens, and the banks it started from."""
    settings = _settings()
    with torch.inference_mode(False), torch.enable_grad():
        start, _ = _prepared(sd15.bundle, settings)
    initial = [b.detach().clone() for b in start.parameters.banks]
    return dict(settings=settings, initial=initial, result=_train(sd15.bundle, settings))


def _state(result: Any) -> dict[str, torch.Tensor]:
    state = {f"kv:{k}": v for k, v in result.concepts.kv_deltas.items()}
    for c in result.concepts.concepts:
        state.update({f"emb:{c.trigger}:{k}": v for k, v in c.embeddings.items()})
    return state


def test_no_bank_by_default_and_bank_settings_then_ignored(sd15):
    plain = _train(sd15.bundle, _settings(token_bank=0, steps=2))
    other_lr = _train(sd15.bundle, _settings(token_bank=0, steps=2, bank_learning_rate=1.0))
    assert TrainSettings().token_bank == 0 and TrainSettings().bank_learning_rate == 5e-3
    assert all(c.bank is None for c in plain.concepts.concepts)
    a, b = _state(plain), _state(other_lr)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert plain.history == other_lr.history
    with torch.inference_mode(False), torch.enable_grad():
        trainer, _ = _prepared(sd15.bundle, _settings(token_bank=0))
    assert trainer.parameters.banks == [] and nested_subjects(trainer.model) == ()
    assert len(trainer.parameters.optimizer(trainer.settings).param_groups) == 1


def test_banks_start_at_the_trigger_features_with_distinct_tokens(sd15):
    with torch.inference_mode(False), torch.enable_grad():
        trainer, _ = _prepared(sd15.bundle, _settings())
        cond, _, tokens = encode_prompts(trainer.clip, [CAPTION])
    assert trainer.parameters.trigger_rows(tokens[0]) == TRIGGER_ROWS
    features = cond[0].detach()
    width = features.shape[-1]
    assert width == 32
    for bank, row in zip(trainer.parameters.banks, TRIGGER_ROWS):
        assert bank.shape == (4, width) and bank.requires_grad
        offset = bank.detach() - features[row]
        noise = BANK_INIT_NOISE * float(features.std())
        assert 0.5 * noise < float(offset.std()) < 1.5 * noise
        assert float(torch.cdist(bank.detach(), bank.detach()).triu(1).max()) > 0  # tokens differ
    subjects = nested_subjects(trainer.model)
    assert [s.name for s in subjects] == ["V1", "V2"]
    assert all(s.bank is b for s, b in zip(subjects, trainer.parameters.banks))
    groups = trainer.parameters.optimizer(trainer.settings).param_groups
    assert [g["lr"] for g in groups] == [1e-2, 5e-2] and groups[1]["params"] == trainer.parameters.banks


def test_gradient_reaches_each_bank_only_through_its_trigger(sd15):
    with torch.inference_mode(False), torch.enable_grad():
        trainer, pool = _prepared(sd15.bundle, _settings(augment=False, flip=False))
        with clip_layers_out_of_place(trainer.clip.cond_stage_model):
            sample = pool[0]
            loss = trainer.objective.losses([sample, sample], with_maps=True)
            total = loss["reconstruction"] + loss["calibration"]
            grads = torch.autograd.grad(total, trainer.parameters.banks, retain_graph=True)
            assert trainer.parameters.bank_index.tolist() == [[4, 4], [7, 7]]
            assert all(float(g.abs().sum()) > 0 for g in grads)
            # a row without the triggers (a prior image's caption) gives the banks no gradient
            prior = replace(sample[0], prompt="photo of a cat and dog")
            no_trigger = trainer.objective.losses([(prior, sample[1])] * 2, with_maps=False)["reconstruction"]
            assert trainer.parameters.bank_index.tolist() == [[-1, -1], [-1, -1]]
            unused = torch.autograd.grad(no_trigger, trainer.parameters.banks, allow_unused=True)
    assert all(g is None or not torch.count_nonzero(g) for g in unused)


def test_banks_are_trained_and_round_trip_through_the_file(trained, tmp_path):
    result = trained["result"]
    assert result.stopped == "complete" and len(result.history) == 3
    for concept, start in zip(result.concepts.concepts, trained["initial"]):
        assert concept.bank.shape == (4, 32)
        moved = float((concept.bank - start).abs().max())
        assert moved > 0.05, (concept.trigger, moved)  # ~ 3 Adam steps of lr 5e-2
    assert result.concepts.metadata["settings"]["token_bank"] == 4
    path = tmp_path / "banked.safetensors"
    save_concepts(path, result.concepts)
    loaded = load_concepts(path)
    for a, b in zip(result.concepts.concepts, loaded.concepts):
        assert torch.equal(a.bank, b.bank)


def _sample(sd15: Any, model: Any, positive: list) -> torch.Tensor:
    import comfy.sample

    latent = torch.zeros(1, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 5)
    return comfy.sample.sample(model, noise, 3, 5.0, "euler", "normal", positive, sd15.encode(""),
                               latent, seed=5, disable_pbar=True)


def test_trained_bank_through_the_nodes_changes_sampling_and_strength_zero_is_stock(trained, sd15):
    concepts = trained["result"].concepts
    model, clip = apply_concepts(sd15.bundle.model, sd15.bundle.clip, concepts)

    def nested(strength: float) -> tuple[Any, list]:
        (subject,) = NestedSubjectFromConcepts.execute(concepts, "V1", strength, 1.0).result
        assert torch.equal(subject.bank, concepts.find("V1").bank)
        return ApplyNestedAttention.execute(model, clip, PROMPT, subject).result

    stock_positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    stock = _sample(sd15, model, stock_positive)
    on_model, positive = nested(1.0)
    assert torch.equal(positive[0][0], stock_positive[0][0])
    (patch,) = [p for p in on_model.model_options["transformer_options"]["patches"]["attn2_patch"]
                if isinstance(p, NestedContextPatch)]
    assert patch.subjects[0].position == 4  # [SOT] a photo of V1: the trigger's spliced vector
    changed = float((_sample(sd15, on_model, positive) - stock).abs().max())
    assert changed > 1e-3, changed
    off_model, positive = nested(0.0)
    assert torch.equal(_sample(sd15, off_model, positive), stock)


def test_sdxl_bank_is_as_wide_as_both_text_encoders(sdxl, tmp_path):
    result = _train(sdxl.bundle, _settings(steps=1, micro_batch=1, token_bank=2))
    banks = [c.bank for c in result.concepts.concepts]
    assert [tuple(b.shape) for b in banks] == [(2, 80), (2, 80)]  # clip_l 32 + clip_g 48
    save_concepts(tmp_path / "xl.safetensors", result.concepts)
    loaded = load_concepts(tmp_path / "xl.safetensors")
    assert all(torch.equal(a, c.bank) for a, c in zip(banks, loaded.concepts))


def test_merge_keeps_each_bank_and_export_drops_banks_with_a_warning(trained, sd15, tmp_path, caplog):
    from concept_attention.concepts.export import save_embeddings
    from concept_attention.concepts.merge import merge_concept_sets
    from support.synthetic_concepts import synthetic_set

    concepts = trained["result"].concepts
    other = synthetic_set(sd15.bundle, ["V3"], seed=3)
    merged = merge_concept_sets(sd15.bundle.model, sd15.bundle.clip, [concepts, other])
    assert merged.triggers == ["V1", "V2", "V3"]
    for trigger in ("V1", "V2"):
        assert torch.equal(merged.find(trigger).bank, concepts.find(trigger).bank)
    assert merged.find("V3").bank is None
    save_concepts(tmp_path / "merged.safetensors", merged)
    assert torch.equal(load_concepts(tmp_path / "merged.safetensors").find("V2").bank,
                       concepts.find("V2").bank)

    with caplog.at_level("WARNING", logger="concept_attention.concepts.export"):
        written = save_embeddings(tmp_path / "emb", merged)
    assert [p.name for p in written] == ["V1.safetensors", "V2.safetensors", "V3.safetensors"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "token banks of V1, V2 cannot be exported" in warnings[0]
    from safetensors.torch import load_file
    assert set(load_file(str(written[0]))) == {"emb_params"}


class _Stop(Exception):
    pass


def test_interrupt_and_non_finite_loss_keep_the_banks(sd15, monkeypatch):
    settings = _settings(steps=3, micro_batch=1, pool_size=1)  # same pool as the 1-step reference
    reference = _train(sd15.bundle, replace(settings, steps=1))
    checkpoints = []

    def progress(step, total, totals, maps):
        raise _Stop("cancel")

    with pytest.raises(_Stop):
        train_concepts(sd15.bundle.model, sd15.bundle.clip, sd15.bundle.vae, _picture(), SPECS, settings,
                       progress=progress, on_checkpoint=checkpoints.append)
    (partial,) = checkpoints
    assert partial.metadata["stopped"] == "interrupted"
    for a, b in zip(partial.concepts, reference.concepts.concepts):
        assert torch.equal(a.bank, b.bank)

    original, calls = TrainingObjective.losses, []

    def poisoned(self, batch, with_maps):
        losses = original(self, batch, with_maps)
        calls.append(1)
        if len(calls) == 2:  # finite loss, NaN gradient on the banks only
            losses["reconstruction"] = losses["reconstruction"] + torch.sqrt(self.parameters.banks[0].sum() * 0)
        return losses

    monkeypatch.setattr(TrainingObjective, "losses", poisoned)
    result = _train(sd15.bundle, settings)
    assert result.stopped == "non-finite loss" and len(result.history) == 1
    for a, b in zip(result.concepts.concepts, reference.concepts.concepts):
        assert torch.equal(a.bank, b.bank) and bool(torch.isfinite(a.bank).all())
