"""The DisenDiff training loop (``training/loop.py``) end to end on tiny SD1.5/SDXL models.

Training needs a fixture whose loss depends on the K/V weights and whose latents are finite and
unit-scale. The shared ``sd15``/``sdxl`` bundles are that now, but these tests pin the premise
down independently of later fixture changes: each architecture is built with the same classes
and seeds and then fixed (:func:`_trainable_bundle`: norm weights 1, fan-in scaled
UNet weights from our own generator, ``vae_scale`` 1 and unit-std latents), and
:func:`test_trainable_fixture_is_sensitive` guards that premise.

Every run is small (128 px, pool <= 4, <= 6 steps) and uses one CPU thread.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch

from concept_attention.attention.calibration import CalibrationSettings
from concept_attention.attention.chain import AttentionHook
from concept_attention.attention.patching import install_hook, model_layers, resolve_layers
from concept_attention.concepts.concept_set import ENCODER_KEYS
from concept_attention.concepts.specs import ConceptSpec
from concept_attention.training.loop import ConceptTrainer, train_concepts
from concept_attention.training.objective import TrainingObjective
from concept_attention.training.parameters import DetachStartToken
from concept_attention.training.settings import TrainResult, TrainSettings
from concept_attention.training.text_encoder import clip_layers_out_of_place, encode_prompts
from concept_attention.concepts.triggers import TriggerTokenizer, with_triggers
from devkit import tiny_models
from support.chains import chain_at

SIZE = 128
SPECS = [ConceptSpec("V1", "cat"), ConceptSpec("V2", "dog")]
CAPTION = "photo of a V1 cat and V2 dog"
PROMPT = "a photo of a cat and a dog"  # for stock sampling
INIT_ROWS = {"V1": 47629, "V2": 42170}  # docs/method.md §1: V1 <- 47629, V2 (last) <- 42170
KV_KEY = re.compile(r"^diffusion_model\..*\.attn2\.to_[kv]\.weight$")


def _picture() -> torch.Tensor:
    """Two coloured squares on grey, as a ComfyUI IMAGE batch of one."""
    image = torch.full((1, SIZE, SIZE, 3), 0.5)
    image[0, 20:60, 16:56] = torch.tensor([0.9, 0.1, 0.1])
    image[0, 70:110, 72:112] = torch.tensor([0.1, 0.2, 0.9])
    return image


def _masks() -> torch.Tensor:
    masks = torch.zeros(2, SIZE, SIZE)
    masks[0, 20:60, 16:56] = 1
    masks[1, 70:110, 72:112] = 1
    return masks


def _settings(**overrides: Any) -> TrainSettings:
    base = dict(steps=4, learning_rate=1e-2, micro_batch=2, grad_accumulation=1, resolution=SIZE,
                pool_size=4, seed=0)
    base.update(overrides)
    return TrainSettings(**base)


# ----- a trainable tiny bundle ----------------------------------------------------------------
def _trainable_bundle(arch: str) -> tiny_models.TinyBundle:
    bundle = tiny_models.build_bundle(arch, seed=0)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        unet = bundle.model.model.diffusion_model
        for module in unet.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
                module.weight.fill_(1.0)
        for param in unet.parameters():
            if param.ndim >= 2:  # LeCun scale, so cross-attention has a say in the output
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param[0].numel()))
        taesd = bundle.vae.first_stage_model
        taesd.vae_scale.fill_(1.0)
        taesd.vae_shift.fill_(0.0)
        last = taesd.taesd_encoder[-1]
        latent = bundle.model.model.process_latent_in(bundle.vae.encode(_picture()).float())
        scale = 1.0 / float(latent.std())
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    return bundle


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundles() -> dict[str, tiny_models.TinyBundle]:
    """Trainable bundles by architecture, built on first use."""
    return {}


@pytest.fixture(scope="module")
def stock(request) -> type:
    """``Conditioned`` from integration/conftest.py (stock CLIPTextEncode + KSampler)."""
    return next(p.Conditioned for p in request.config.pluginmanager.get_plugins()
                if hasattr(p, "Conditioned"))


def _bundle(bundles: dict, arch: str) -> tiny_models.TinyBundle:
    if arch not in bundles:
        bundles[arch] = _trainable_bundle(arch)
    return bundles[arch]


def _kv_keys(model: Any) -> list[str]:
    return [key for layer in model_layers(model) for key in layer.weight_keys]


def _init_vectors(clip: Any) -> dict[str, dict[str, torch.Tensor]]:
    """The rows the trainer must start each trigger from (DisenDiff's rare tokens)."""
    out = {}
    for trigger, row in INIT_ROWS.items():
        out[trigger] = {key: getattr(clip.cond_stage_model, key).transformer.get_input_embeddings()
                        .weight[[row]].detach().clone().float()
                        for key in ENCODER_KEYS if getattr(clip.cond_stage_model, key, None) is not None}
    return out


def _vectors(result: TrainResult) -> dict[str, dict[str, torch.Tensor]]:
    return {c.trigger: c.embeddings for c in result.concepts.concepts}


@torch.no_grad()
def _eval_loss(bundle: tiny_models.TinyBundle, deltas: dict[str, torch.Tensor] | None,
               vectors: dict[str, dict[str, torch.Tensor]], draws: int = 8) -> float:
    """Mean eps-MSE on a FIXED batch (picture, caption, timesteps, noise), independent of the trainer.

    The concepts are applied the way a user gets them: K/V deltas as stock ``diff`` weight patches
    on a clone, triggers through ``with_triggers``.
    """
    import comfy.model_management as mm

    model = bundle.model.clone()
    if deltas:
        assert len(model.add_patches({k: ("diff", (d,)) for k, d in deltas.items()}, 1.0)) == len(deltas)
    clip = with_triggers(bundle.clip, vectors)
    mm.load_models_gpu([model], force_full_load=True)
    base = model.model
    x0 = base.process_latent_in(bundle.vae.encode(_picture()).float())
    cond, pooled = clip.encode_from_tokens(clip.tokenize(CAPTION), return_pooled=True)
    generator = torch.Generator().manual_seed(1234)
    table = base.model_sampling.sigmas
    sigma = table[torch.randint(0, len(table), (draws,), generator=generator)]
    noise = torch.randn((draws, *x0.shape[1:]), generator=generator)
    xt = base.model_sampling.noise_scaling(sigma, noise, x0.expand(draws, -1, -1, -1))
    extra = {}
    if getattr(base, "adm_channels", 0):
        extra["y"] = base.encode_adm(pooled_output=pooled, width=SIZE, height=SIZE, target_width=SIZE,
                                     target_height=SIZE).expand(draws, -1)
    denoised = base.apply_model(xt, sigma, c_crossattn=cond.expand(draws, -1, -1), **extra)
    eps = (xt - denoised) / sigma.view(-1, 1, 1, 1)
    return float(((eps - noise) ** 2).mean())


def _train(bundle: tiny_models.TinyBundle, settings: TrainSettings, **kwargs: Any) -> TrainResult:
    return train_concepts(bundle.model, bundle.clip, bundle.vae, _picture(), SPECS, settings, **kwargs)


def _state(result: TrainResult) -> dict[str, torch.Tensor]:
    """Every trained tensor of a result, flat."""
    state = {f"kv:{k}": v for k, v in result.concepts.kv_deltas.items()}
    for concept in result.concepts.concepts:
        state.update({f"emb:{concept.trigger}:{k}": v for k, v in concept.embeddings.items()})
    return state


def _assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@dataclass
class Run:
    """One training run with snapshots of its inputs taken before and after."""

    bundle: tiny_models.TinyBundle
    settings: TrainSettings
    result: TrainResult
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)


def _snapshot(sampler: Any) -> dict[str, Any]:
    """Weights as they are now (whatever clone ComfyUI has loaded), then stock sampling/encoding."""
    bundle = sampler.bundle
    return {
        "model": {k: v.clone() for k, v in bundle.model.model.state_dict().items()},
        "clip": {k: v.clone() for k, v in bundle.clip.cond_stage_model.state_dict().items()},
        "sample": sampler.sample(prompt=PROMPT),
        "cond": sampler.encode(PROMPT)[0][0].clone(),
        "model_options": copy.deepcopy(bundle.model.model_options),
        "patches": dict(bundle.model.patches),
        "tokenizer": bundle.clip.tokenizer,
    }


@pytest.fixture(scope="module")
def runs(bundles, stock) -> dict[str, Any]:
    return {"stock": stock}


def _run(runs: dict, bundles: dict, arch: str) -> Run:
    """The reference run per architecture (6 steps, lr 1e-2, effective batch 4), made once."""
    if arch not in runs:
        import comfy.model_management as mm

        bundle = _bundle(bundles, arch)
        sampler = runs["stock"](bundle, arch)
        settings = _settings(steps=6, grad_accumulation=2)
        # Load the input model itself first: a loaded clone's weight patches live in the shared
        # tensors (ComfyUI patches in place), and earlier tests loaded patched clones.
        mm.load_models_gpu([bundle.model], force_full_load=True)
        bundle.clip.load_model()
        before = _snapshot(sampler)
        result = _train(bundle, settings)
        runs[arch] = Run(bundle, settings, result, before, _snapshot(sampler))  # trainer still loaded
    return runs[arch]


def test_trainable_fixture_is_sensitive(bundles):
    """The premise of every test here: latents are unit-scale and K/V weights move the output."""
    bundle = _bundle(bundles, "sd15")
    with torch.no_grad():
        latent = bundle.model.model.process_latent_in(bundle.vae.encode(_picture()).float())
    assert abs(float(latent.std()) - 1.0) < 1e-3
    init = _init_vectors(bundle.clip)
    plain = _eval_loss(bundle, None, init)
    weights = bundle.model.model.state_dict()
    generator = torch.Generator().manual_seed(5)
    for kind in ("to_k", "to_v"):
        # Random, not constant: the context rows are layer-normed to zero mean, so a constant K
        # delta shifts all logits of a query equally and softmax ignores it.
        nudge = {key: torch.randn(weights[key].shape, generator=generator) * 0.05
                 for key in _kv_keys(bundle.model) if f".{kind}." in key}
        assert abs(_eval_loss(bundle, nudge, init) - plain) > 1e-4 * plain, kind


# ----- 1. a few steps reduce the loss -----------------------------------------------------------
@pytest.mark.parametrize("arch, min_drop", [("sd15", 0.05), ("sdxl", 0.03)])  # measured: 11.7%, 8.9%
def test_few_steps_reduce_fixed_batch_loss(runs, bundles, arch, min_drop):
    run = _run(runs, bundles, arch)
    assert run.result.stopped == "complete" and len(run.result.history) == run.settings.steps
    init = _init_vectors(run.bundle.clip)
    before = _eval_loss(run.bundle, None, init)
    after = _eval_loss(run.bundle, run.result.concepts.kv_deltas, _vectors(run.result))
    # Control: the trained deltas with random signs (same magnitudes) must do worse than training.
    generator = torch.Generator().manual_seed(99)
    scrambled = {k: d * (torch.randint(0, 2, d.shape, generator=generator) * 2 - 1)
                 for k, d in run.result.concepts.kv_deltas.items()}
    control = _eval_loss(run.bundle, scrambled, init)
    assert after < before * (1 - min_drop), (before, after)
    assert after < control, (after, control)
    # The loss before training does not depend on when it is measured (nothing leaked).
    assert _eval_loss(run.bundle, None, init) == before


# ----- 2. only the K/V deltas and the new embeddings change ------------------------------------
def test_inputs_untouched_and_only_kv_and_embeddings_learned(runs, bundles):
    run = _run(runs, bundles, "sd15")
    before, after = run.before, run.after
    for part in ("model", "clip"):
        assert before[part].keys() == after[part].keys()
        changed = [k for k in before[part] if not torch.equal(before[part][k], after[part][k])]
        assert not changed, f"training changed the input {part}: {changed[:3]}"
    assert torch.equal(before["sample"], after["sample"]), "stock sampling changed after training"
    assert torch.equal(before["cond"], after["cond"]), "stock text encoding changed after training"
    assert after["patches"] == before["patches"] == {}
    assert after["model_options"] == before["model_options"]
    assert after["tokenizer"] is before["tokenizer"] and not isinstance(after["tokenizer"], TriggerTokenizer)

    deltas = run.result.concepts.kv_deltas
    expected = _kv_keys(run.bundle.model)
    assert len(expected) == 32 and all(KV_KEY.match(k) for k in expected)  # 16 SD1.5 attn2 layers
    assert sorted(deltas) == sorted(expected)
    zero = [k for k, d in deltas.items() if not torch.count_nonzero(d)]
    assert not zero, f"deltas that never moved: {zero}"
    weights = run.bundle.model.model.state_dict()
    assert all(deltas[k].shape == weights[k].shape and deltas[k].dtype == torch.float32 for k in deltas)

    init = _init_vectors(run.bundle.clip)
    learned = _vectors(run.result)
    assert list(learned) == ["V1", "V2"]
    for trigger in learned:
        assert set(learned[trigger]) == {"clip_l"}
        assert learned[trigger]["clip_l"].shape == (1, 32)
        assert not torch.equal(learned[trigger]["clip_l"], init[trigger]["clip_l"]), trigger
    # Non-vacuity: the sampler does see the learned deltas.
    patched = run.bundle.model.clone()
    patched.add_patches({k: ("diff", (d,)) for k, d in deltas.items()}, 1.0)
    assert not torch.equal(runs["stock"](run.bundle, "sd15").sample(patched, prompt=PROMPT), before["sample"])


def test_embeddings_start_from_rare_rows(bundles):
    bundle = _bundle(bundles, "sd15")
    with torch.inference_mode(False), torch.enable_grad():
        trainer = ConceptTrainer(bundle.model, bundle.clip, bundle.vae, _picture(), SPECS, _settings())
        trainer.install()
    init = _init_vectors(bundle.clip)
    for spec, vectors in zip(SPECS, trainer.parameters.embeddings):
        assert torch.equal(vectors["clip_l"].detach(), init[spec.trigger]["clip_l"]), spec.trigger
        assert vectors["clip_l"].requires_grad
    assert all(not torch.count_nonzero(d) and d.requires_grad for d in trainer.parameters.kv_deltas.values())


def test_embeddings_start_from_the_class_word_or_the_mean_row_when_asked(bundles):
    """``init="class"``: the class phrase's first token row; ``init="mean"``: the table's mean row, for every
    concept alike; any other value is refused by name."""
    from concept_attention.attention.tokens import phrase_ids
    from concept_attention.concepts.concept_set import token_tables

    bundle = _bundle(bundles, "sd15")
    table = token_tables(bundle.clip)["clip_l"]
    for init in ("class", "mean"):
        with torch.inference_mode(False), torch.enable_grad():
            trainer = ConceptTrainer(bundle.model, bundle.clip, bundle.vae, _picture(), SPECS, _settings(init=init))
            trainer.install()
        for spec, vectors in zip(SPECS, trainer.parameters.embeddings):
            expected = (table[phrase_ids(bundle.clip, spec.class_phrase)[:1]].float() if init == "class"
                        else (table.double().sum(0, keepdim=True) / table.shape[0]).float())  # summed in float64
            assert torch.allclose(vectors["clip_l"].detach().cpu(), expected.cpu(), atol=1e-6), (init, spec.trigger)
            assert vectors["clip_l"].requires_grad
    starts = [v["clip_l"].detach() for v in trainer.parameters.embeddings]
    assert torch.equal(starts[0], starts[1])  # one start for every concept
    with pytest.raises(ValueError, match=r"init must be one of \('rare', 'class', 'mean'\), got 'zero'"):
        TrainSettings(init="zero").validate()


@pytest.mark.parametrize("train_kv, train_embeddings", [(True, False), (False, True)])
def test_switching_a_part_off_freezes_it(bundles, train_kv, train_embeddings):
    bundle = _bundle(bundles, "sd15")
    result = _train(bundle, _settings(steps=2, train_kv=train_kv, train_embeddings=train_embeddings))
    deltas_moved = [bool(torch.count_nonzero(d)) for d in result.concepts.kv_deltas.values()]
    assert all(deltas_moved) if train_kv else not any(deltas_moved)
    init = _init_vectors(bundle.clip)
    for trigger, vectors in _vectors(result).items():
        assert torch.equal(vectors["clip_l"], init[trigger]["clip_l"]) != train_embeddings


def test_nothing_to_train_is_refused(bundles):
    bundle = _bundle(bundles, "sd15")
    with pytest.raises(ValueError, match="nothing to train"):
        _train(bundle, _settings(steps=1, train_kv=False, train_embeddings=False))


# ----- 3. gradient placement ------------------------------------------------------------------
def _set_up(bundle: tiny_models.TinyBundle, settings: TrainSettings, outer_hooks: tuple = ()):
    """A trainer built the way ``run`` builds it; ``outer_hooks`` sit before the trainer's own."""
    trainer = ConceptTrainer(bundle.model, bundle.clip, bundle.vae, _picture(), SPECS, settings)
    for hook in outer_hooks:
        install_hook(trainer.model, hook, "all")
    trainer.install()
    trainer.load_models()
    return trainer, trainer.pools()[0]


def _grads(loss: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d loss / d tensor for each tensor (zeros where the loss does not depend on it)."""
    names = list(tensors)
    grads = torch.autograd.grad(loss, [tensors[n] for n in names], retain_graph=True, allow_unused=True)
    return {n: torch.zeros_like(tensors[n]) if g is None else g for n, g in zip(names, grads)}


def _unreachable_by_maps(model: Any, selector: str) -> set[str]:
    """K/V keys the recorded maps cannot depend on: every K/V after the last recorded layer and
    that layer's V (layers run in ``model_layers`` order; a layer's map uses its own q and k)."""
    layers = model_layers(model)
    recorded = {layer.key for layer in resolve_layers(model, selector)}
    last = max(i for i, layer in enumerate(layers) if layer.key in recorded)
    keys = {key for layer in layers[last + 1:] for key in layer.weight_keys}
    keys |= {key for key in layers[last].weight_keys if ".to_v." in key}
    return keys


@pytest.fixture(scope="module")
def map_losses(bundles):
    """One target-sample forward with maps, and the gradients of L_bind and L_s&s separately."""
    bundle = _bundle(bundles, "sd15")
    settings = _settings(augment=False, flip=False, micro_batch=1, pool_size=1)
    with torch.inference_mode(False), torch.enable_grad():
        trainer, pool = _set_up(bundle, settings)
        with clip_layers_out_of_place(trainer.clip.cond_stage_model):
            tokens = trainer.clip.tokenize(pool[0][0].prompt)
            groups = trainer.parameters.token_groups(trainer.clip, tokens)
            losses = trainer.objective.losses([pool[0]], with_maps=True)
            maps = trainer.objective.store.layer_maps()
            inputs = {f"map{i}": m for i, m in enumerate(maps)}
            inputs.update({f"kv:{k}": d for k, d in trainer.parameters.kv_deltas.items()})
            inputs.update({f"emb:{s.trigger}": v["clip_l"] for s, v in zip(SPECS, trainer.parameters.embeddings)})
            grads = {name: _grads(losses[name], inputs) for name in ("bind", "separation")}
    return dict(trainer=trainer, pool=pool, groups=groups, losses=losses, maps=maps, grads=grads)


def test_map_tokens_are_triggers_then_classes(map_losses):
    assert map_losses["pool"][0][0].prompt == CAPTION
    # [SOT] photo of a V1 cat and V2 dog: trigger and class of each concept, in order.
    assert map_losses["groups"] == [[4], [5], [7], [8]]
    maps = map_losses["maps"]
    assert len(maps) == 5 and all(m.shape == (1, 4, 4, 4) and m.requires_grad for m in maps)
    losses = map_losses["losses"]
    assert 0 < float(losses["bind"].detach()) < 2 and 0 < float(losses["separation"].detach()) < 1
    assert torch.allclose(losses["calibration"], 0.01 * (losses["bind"] + losses["separation"]))


@pytest.mark.parametrize("term, flows, blocked", [("bind", 0, 1), ("separation", 1, 0)])
def test_map_loss_gradient_reaches_only_its_token_maps(map_losses, term, flows, blocked):
    """L_bind: modifier maps only (class map detached); L_s&s: class maps only."""
    grads = map_losses["grads"][term]
    for i in range(len(map_losses["maps"])):
        grad = grads[f"map{i}"]  # [1, T=4, h, w]: V1, cat, V2, dog
        for concept in range(2):
            assert torch.count_nonzero(grad[:, 2 * concept + flows]) > 0, (term, i, concept)
            assert torch.count_nonzero(grad[:, 2 * concept + blocked]) == 0, (term, i, concept)


@pytest.mark.parametrize("term", ["bind", "separation"])
def test_map_loss_gradient_reaches_exactly_the_upstream_parameters(map_losses, term):
    """Both terms reach every K/V delta that runs before the last 16x16 map (and that layer's K),
    none after it, and both trigger embeddings: L_bind through the trigger keys, L_s&s only via
    the causal text encoder (each class word's hidden state depends on the trigger before it)."""
    trainer, grads = map_losses["trainer"], map_losses["grads"][term]
    unreachable = _unreachable_by_maps(trainer.model, trainer.settings.map_layers)
    assert len(unreachable) == 13  # output blocks 6..11 (K and V) and output block 5's V
    for key in trainer.parameters.kv_deltas:
        nonzero = bool(torch.count_nonzero(grads[f"kv:{key}"]))
        assert nonzero == (key not in unreachable), (term, key)
    for spec in SPECS:
        assert torch.count_nonzero(grads[f"emb:{spec.trigger}"]) > 0, (term, spec.trigger)


@dataclass(frozen=True, eq=False)
class _StartTokenProbe(AttentionHook):
    """Adds zero-valued scalars to K and V at each chunk's start token only (a gradient probe)."""

    probe_k: torch.Tensor | None = None
    probe_v: torch.Tensor | None = None

    def apply(self, q, k, v, ctx, proceed):
        start = torch.zeros(k.shape[1], 1, device=k.device)
        start[::77] = 1
        return proceed(q, k + start * self.probe_k, v + start * self.probe_v)


@dataclass(frozen=True, eq=False)
class _ManualDetach(AttentionHook):
    def apply(self, q, k, v, ctx, proceed):
        return proceed(q, torch.cat([k[:, :1].detach(), k[:, 1:]], 1),
                       torch.cat([v[:, :1].detach(), v[:, 1:]], 1))


def _reconstruction_grads(bundle, detach: bool, extra_hook: AttentionHook | None = None):
    probe = _StartTokenProbe(probe_k=torch.zeros((), requires_grad=True),
                             probe_v=torch.zeros((), requires_grad=True))
    hooks = (probe,) + ((extra_hook,) if extra_hook is not None else ())
    settings = _settings(augment=False, flip=False, micro_batch=1, pool_size=1, detach_start_token=detach)
    with torch.inference_mode(False), torch.enable_grad():
        trainer, pool = _set_up(bundle, settings, hooks)
        chain = chain_at(trainer.model, model_layers(trainer.model)[0].key)
        assert chain.hooks[0] is probe  # outside (before) the trainer's own hooks
        assert any(isinstance(h, DetachStartToken) for h in chain.hooks) == detach
        with clip_layers_out_of_place(trainer.clip.cond_stage_model):
            loss = trainer.objective.losses([pool[0]], with_maps=False)["reconstruction"]
            context = encode_prompts(trainer.clip, [pool[0][0].prompt])[0][0].detach()
            inputs = {f"kv:{k}": d for k, d in trainer.parameters.kv_deltas.items()}
            inputs.update(probe_k=probe.probe_k, probe_v=probe.probe_v)
            grads = _grads(loss, inputs)
    return float(loss.detach()), grads, context


def _kv_names(grads: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in grads if k.startswith("kv:")]


def test_start_token_key_and_value_are_detached(bundles):
    bundle = _bundle(bundles, "sd15")
    loss_on, on, context = _reconstruction_grads(bundle, detach=True)
    loss_off, off, _ = _reconstruction_grads(bundle, detach=False)
    assert loss_on == loss_off  # the detach changes gradients, never values
    # With the detach, nothing that only touches the start token's K/V gets any gradient.
    assert torch.count_nonzero(on["probe_k"]) == 0 and torch.count_nonzero(on["probe_v"]) == 0
    assert torch.count_nonzero(off["probe_k"]) > 0 and torch.count_nonzero(off["probe_v"]) > 0
    # Without it, each K/V delta gets one extra term: (dL/dk_0) outer c_0, rank one along the start
    # token's context row c_0.
    sot = context[0] / context[0].norm()
    for key in _kv_names(on):
        diff = off[key] - on[key]
        assert torch.count_nonzero(diff) > 0, key
        residual = diff - (diff @ sot)[:, None] * sot[None]
        assert float(residual.norm()) <= 1e-4 * float(diff.norm()), key
    # The hook is exactly "detach row 0": same gradients as detaching it by hand.
    loss_manual, manual, _ = _reconstruction_grads(bundle, detach=False, extra_hook=_ManualDetach())
    assert loss_manual == loss_on
    for key in _kv_names(on):
        assert torch.allclose(manual[key], on[key], rtol=1e-5, atol=1e-12), key


# ----- 4. calibration off = Custom Diffusion ----------------------------------------------------
def test_calibration_off_is_custom_diffusion(bundles):
    bundle = _bundle(bundles, "sd15")
    off = _train(bundle, _settings(steps=3, calibration=CalibrationSettings(use_bind=False,
                                                                          use_separation=False)))
    zero_weight = _train(bundle, _settings(steps=3, calibration=CalibrationSettings(weight=0.0)))
    for result in (off, zero_weight):
        for entry in result.history:
            assert entry["loss"] == entry["reconstruction"] and entry["calibration"] == 0.0
    assert all(e["bind"] == 0.0 and e["separation"] == 0.0 for e in off.history)
    assert all(e["bind"] > 0 and e["separation"] > 0 for e in zero_weight.history)
    _assert_states_equal(_state(off), _state(zero_weight))
    assert [e["reconstruction"] for e in off.history] == [e["reconstruction"] for e in zero_weight.history]


def test_calibration_window_counts_only_rows_at_low_noise(bundles, monkeypatch):
    """max_t below every drawn timestep is Custom Diffusion; max_t 0.5 calibrates the low-noise rows only."""
    import concept_attention.training.objective as objective

    drawn, kept = [], []
    map_losses, terms = TrainingObjective._map_losses, objective.calibration_terms

    def record_t(self, batch, t):
        drawn.append((t.clone(), len(self.sigma_table)))
        return map_losses(self, batch, t)

    def record_rows(modifiers, classes, settings, rows=None):
        kept.append(rows)
        return terms(modifiers, classes, settings, rows)

    monkeypatch.setattr(TrainingObjective, "_map_losses", record_t)
    monkeypatch.setattr(objective, "calibration_terms", record_rows)
    bundle = _bundle(bundles, "sd15")
    baseline = _train(bundle, _settings(steps=3, calibration=CalibrationSettings(use_bind=False,
                                                                               use_separation=False)))
    closed = _train(bundle, _settings(steps=3, calibration=CalibrationSettings(max_t=1e-6)))
    drawn.clear()
    kept.clear()
    half = _train(bundle, _settings(steps=3, calibration=CalibrationSettings(max_t=0.5)))
    assert len(drawn) == len(kept) == 3
    for (t, count), rows in zip(drawn, kept):
        assert torch.equal(rows.cpu(), t <= 0.5 * (count - 1))  # low index = low noise
    full = _train(bundle, _settings(steps=3))
    assert all(e["calibration"] == 0.0 and e["bind"] == 0.0 for e in closed.history)
    _assert_states_equal(_state(closed), _state(baseline))
    assert any(e["calibration"] > 0 for e in half.history)
    assert [e["bind"] for e in half.history] != [e["bind"] for e in full.history]
    assert [e["reconstruction"] for e in closed.history] == [e["reconstruction"] for e in baseline.history]


def test_disendiff_differs_from_custom_diffusion_only_by_calibration(bundles):
    """After one step, only parameters the maps depend on may differ from the baseline's."""
    bundle = _bundle(bundles, "sd15")
    base = _train(bundle, _settings(steps=1, calibration=CalibrationSettings(use_bind=False,
                                                                           use_separation=False)))
    disen = _train(bundle, _settings(steps=1))
    first_base, first = base.history[0], disen.history[0]
    assert first["reconstruction"] == first_base["reconstruction"]
    assert first["calibration"] == pytest.approx(0.01 * (first["bind"] + first["separation"]), rel=1e-5)
    assert first["loss"] == pytest.approx(first["reconstruction"] + first["calibration"], rel=1e-6)
    unreachable = _unreachable_by_maps(bundle.model, "latent/4")
    for key, delta in disen.concepts.kv_deltas.items():
        same = torch.equal(delta, base.concepts.kv_deltas[key])
        assert same == (key in unreachable), key
    for a, b in zip(disen.concepts.concepts, base.concepts.concepts):
        assert not torch.equal(a.embeddings["clip_l"], b.embeddings["clip_l"]), a.trigger


# ----- 5. determinism -------------------------------------------------------------------------
def test_same_seed_same_result_other_seed_differs(bundles):
    bundle = _bundle(bundles, "sd15")
    first = _train(bundle, _settings(steps=2))
    again = _train(bundle, _settings(steps=2))
    other = _train(bundle, _settings(steps=2, seed=1))
    _assert_states_equal(_state(first), _state(again))
    assert first.history == again.history
    assert first.concepts.metadata == again.concepts.metadata
    different = [k for k, v in _state(first).items() if not torch.equal(v, _state(other)[k])]
    assert len(different) == len(_state(first))
    assert first.history != other.history


# ----- 6. masks and input errors ---------------------------------------------------------------
def test_masks_add_a_mask_loss(bundles):
    bundle = _bundle(bundles, "sd15")
    plain = _train(bundle, _settings(steps=2))
    masked = _train(bundle, _settings(steps=2), masks=_masks())
    assert all("mask" not in e for e in plain.history)
    assert all(0 < e["mask"] <= 0.01 * 2 * 2 for e in masked.history)  # 0.01 * sum of (2 - IoUs)
    for entry in masked.history:
        total = entry["reconstruction"] + entry["calibration"] + entry["mask"]
        assert entry["loss"] == pytest.approx(total, rel=1e-6)
    assert masked.history[0]["reconstruction"] != plain.history[0]["reconstruction"]  # region only


def test_maps_of_every_layer_train_at_the_finest_resolution(bundles):
    """map_layers='all' (offered by Train Concepts) mixes 2x2 ... 16x16 maps: they meet at the finest."""
    result = _train(_bundle(bundles, "sd15"), _settings(steps=1, map_layers="all"), masks=_masks())
    assert result.stopped == "complete"
    assert result.maps.shape[-2:] == (SIZE // 8, SIZE // 8)  # the finest attention level's map size
    assert all(torch.isfinite(torch.tensor(v)) for v in result.history[0].values())


def test_input_errors(bundles):
    bundle = _bundle(bundles, "sd15")
    with pytest.raises(ValueError, match="masks"):
        _train(bundle, _settings(steps=1), masks=_masks()[:1])
    two = torch.cat([_picture(), _picture()])
    with pytest.raises(ValueError, match="ONE picture"):
        train_concepts(bundle.model, bundle.clip, bundle.vae, two, SPECS, _settings(steps=1))
    with pytest.raises(ValueError, match="V2 bird"):
        train_concepts(bundle.model, bundle.clip, bundle.vae, _picture(),
                       [ConceptSpec("V1", "cat"), ConceptSpec("V2", "bird")],
                       _settings(steps=1, caption=CAPTION))
    with pytest.raises(ValueError, match="no concepts"):
        train_concepts(bundle.model, bundle.clip, bundle.vae, _picture(), [], _settings(steps=1))


def test_class_word_must_be_a_whole_word(bundles):
    """'V1 cats' contains the text 'V1 cat' but not the token 'cat': refuse it up front."""
    bundle = _bundle(bundles, "sd15")
    with pytest.raises(ValueError, match="V1 cat"):
        _train(bundle, _settings(steps=1, caption="photo of a V1 cats and V2 dog"))


# ----- 7. triggers encode like embedding files ----------------------------------------------------
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_trigger_encodes_like_embedding_file(runs, bundles, tmp_path, arch):
    from safetensors.torch import save_file

    run = _run(runs, bundles, arch)
    vectors = _vectors(run.result)["V1"]
    if arch == "sd15":
        save_file({"emb_params": vectors["clip_l"].contiguous()}, str(tmp_path / "V1.safetensors"))
    else:
        save_file({k: v.contiguous() for k, v in vectors.items()}, str(tmp_path / "V1.safetensors"))
    from_file = tiny_models.build_clip(arch, seed=0, embedding_directory=[str(tmp_path)])
    reference = run.bundle.clip.cond_stage_model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in from_file.cond_stage_model.state_dict().items())

    def encode(clip, text):
        return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)

    triggered = with_triggers(run.bundle.clip, {"V1": vectors})
    cond, pooled = encode(triggered, "a photo of V1 cat")
    file_cond, file_pooled = encode(from_file, "a photo of embedding:V1 cat")
    assert torch.equal(cond, file_cond) and torch.equal(pooled, file_pooled)
    # Non-vacuity: the vector matters, and the trigger word is not encoded as plain text.
    init_cond, _ = encode(with_triggers(run.bundle.clip, {"V1": _init_vectors(run.bundle.clip)["V1"]}),
                          "a photo of V1 cat")
    assert not torch.equal(cond, init_cond)
    assert not torch.equal(cond, encode(run.bundle.clip, "a photo of V1 cat")[0])


# ----- 8. non-finite loss ------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_step_keeps_last_good_state(bundles, monkeypatch, where):
    bundle = _bundle(bundles, "sd15")
    settings = _settings(steps=4, micro_batch=2, pool_size=2)
    reference = _train(bundle, replace(settings, steps=1))  # same pool: min(pool_size, steps * batch)
    original = TrainingObjective.losses
    calls = []

    def poisoned(self, batch, with_maps):
        losses = original(self, batch, with_maps)
        calls.append(1)
        if len(calls) == 2:
            if where == "loss":
                losses["reconstruction"] = losses["reconstruction"] * float("nan")
            else:  # finite value, NaN gradient: d sqrt(u)/du = inf at u = 0, times du/dx = 0
                delta = next(iter(self.parameters.kv_deltas.values()))
                losses["reconstruction"] = losses["reconstruction"] + torch.sqrt(delta.sum() * 0)
        return losses

    monkeypatch.setattr(TrainingObjective, "losses", poisoned)
    result = _train(bundle, settings)
    assert len(calls) == 2
    assert result.stopped == "non-finite loss"
    assert len(result.history) == 1
    assert result.concepts.metadata["complete"] is False
    assert result.concepts.metadata["steps_done"] == 1
    assert result.concepts.metadata["stopped"] == "non-finite loss"
    _assert_states_equal(_state(result), _state(reference))
    assert all(torch.isfinite(t).all() for t in _state(result).values())


# ----- 9. interrupt ------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def test_interrupt_propagates_after_checkpoint(bundles):
    bundle = _bundle(bundles, "sd15")
    settings = _settings(steps=5, micro_batch=2, pool_size=2)  # pool size as in the 2-step reference
    reference = _train(bundle, replace(settings, steps=2))
    seen, checkpoints = [], []

    def progress(step, total, totals, maps):
        seen.append((step, total, sorted(totals)))
        if step == 2:
            raise _Stop("user pressed cancel")

    with pytest.raises(_Stop, match="cancel"):
        _train(bundle, settings, progress=progress, on_checkpoint=checkpoints.append)
    keys = ["bind", "calibration", "loss", "reconstruction", "separation", "step"]
    assert seen == [(1, 5, keys), (2, 5, keys)]
    assert len(checkpoints) == 1
    concepts = checkpoints[0]
    assert concepts.metadata["complete"] is False
    assert concepts.metadata["steps_done"] == 2
    assert concepts.metadata["stopped"] == "interrupted"
    assert concepts.triggers == ["V1", "V2"]
    _assert_states_equal(_state(TrainResult(concepts, [], None, "interrupted")), _state(reference))


def test_gradient_checkpointing_gives_the_same_training(bundles):
    bundle = _bundle(bundles, "sd15")
    plain = _train(bundle, _settings(steps=2))
    checkpointed = _train(bundle, _settings(steps=2, gradient_checkpointing=True))
    assert checkpointed.stopped == "complete"
    for key, delta in plain.concepts.kv_deltas.items():
        torch.testing.assert_close(checkpointed.concepts.kv_deltas[key], delta, rtol=1e-4, atol=1e-6)
    # the UNet blocks got their own forward back
    unet = bundle.model.model.diffusion_model
    assert all("forward" not in vars(block) for block in unet.input_blocks)


def test_bf16_autocast_trains_with_finite_losses(bundles):
    result = _train(_bundle(bundles, "sd15"), _settings(steps=2, autocast="bf16"))
    assert result.stopped == "complete"
    assert all(math.isfinite(h["loss"]) for h in result.history)
    plain = _train(_bundle(bundles, "sd15"), _settings(steps=2))
    key = next(iter(plain.concepts.kv_deltas))
    assert not torch.equal(result.concepts.kv_deltas[key], plain.concepts.kv_deltas[key])


def test_eps_x0_loss_weighting_adds_the_clean_latent_error(bundles):
    """loss_weighting="eps+x0": the same draw's error times 1 + sigma^2 / mean(sigma^2) of the schedule."""
    bundle = _bundle(bundles, "sd15")
    losses, sigmas = {}, {}
    for weighting in ("eps", "eps+x0"):
        settings = _settings(augment=False, flip=False, micro_batch=1, pool_size=1, loss_weighting=weighting)
        with torch.inference_mode(False), torch.enable_grad():
            trainer, pool = _set_up(bundle, settings)
            table = trainer.model.model.model_sampling.sigmas.float()
            state = trainer.generator.get_state()
            sigmas[weighting] = table[torch.randint(0, len(table), (1,), generator=trainer.generator)]
            trainer.generator.set_state(state)
            with clip_layers_out_of_place(trainer.clip.cond_stage_model):
                losses[weighting] = float(trainer.objective.losses([pool[0]], with_maps=False)["reconstruction"])
    assert sigmas["eps"] == sigmas["eps+x0"]
    expected = losses["eps"] * (1 + float(sigmas["eps"] ** 2 / (table ** 2).mean()))
    assert losses["eps+x0"] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="loss_weighting"):
        TrainSettings(loss_weighting="v").validate()


# ----- 10. speed knobs: the same results on the CPU -----------------------------------------------
def test_auto_precision_is_fp32_on_the_cpu_and_bf16_on_gpus_with_bf16_units(monkeypatch):
    from concept_attention.training.objective import autocast_kind

    assert TrainSettings().autocast == "auto"
    assert autocast_kind("auto", torch.device("cpu")) == "none"
    assert autocast_kind("fp16", torch.device("cpu")) == "fp16"
    for capability, expected in (((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "none")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert autocast_kind("auto", torch.device("cuda", 0)) == expected


@pytest.mark.parametrize("train_embeddings", [False, True])
def test_text_encoder_runs_once_per_prompt_when_token_vectors_are_frozen(bundles, monkeypatch, train_embeddings):
    from concept_attention.training import text_encoder

    bundle = _bundle(bundles, "sd15")
    prompts: list[str] = []
    original = text_encoder.encode_prompts

    def counted(clip, batch):
        prompts.extend(batch)
        return original(clip, batch)

    monkeypatch.setattr(text_encoder, "encode_prompts", counted)
    settings = _settings(steps=3, grad_accumulation=2, pool_size=4, train_embeddings=train_embeddings)
    result = _train(bundle, settings)
    assert result.stopped == "complete"
    drawn = settings.steps * settings.grad_accumulation * settings.micro_batch
    if train_embeddings:
        assert len(prompts) == drawn
    else:
        assert len(prompts) == len(set(prompts)) < drawn  # each distinct prompt once
        # and the reused features train exactly as features encoded afresh for every batch
        encoder_init = text_encoder.PromptEncoder.__init__
        monkeypatch.setattr(text_encoder.PromptEncoder, "__init__",
                            lambda self, clip, device, trains_text: encoder_init(self, clip, device, True))
        fresh = _train(bundle, settings)
        assert len(prompts) == len(set(prompts)) + drawn
        _assert_states_equal(_state(fresh), _state(result))


def test_optimizer_is_multi_tensor_and_results_come_back_on_the_cpu(bundles):
    bundle = _bundle(bundles, "sd15")
    with torch.inference_mode(False), torch.enable_grad():
        trainer = ConceptTrainer(bundle.model, bundle.clip, bundle.vae, _picture(), SPECS, _settings(steps=1))
        _, _, params, optimizer = trainer.prepare()
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults.get("fused")
    assert all(p.device == bundle.model.load_device for p in params)
    result = trainer.result("complete")
    assert all(t.device.type == "cpu" for t in _state(result).values())
