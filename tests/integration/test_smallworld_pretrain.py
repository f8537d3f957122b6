"""Toy-world pretraining: seeded, resumable, and its output loads through ComfyUI's own classes."""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from concept_attention.smallworld import model as toy
from concept_attention.smallworld import scenes as sw
from smallworld_lab import fresh
from smallworld_lab import pretrain


def tiny_config(work_dir: Path) -> pretrain.PretrainConfig:
    """A few steps of each stage, at toy batch sizes."""
    return pretrain.PretrainConfig(work_dir=work_dir, vae_steps=3, vae_batch=2, vae_full_steps=2,
                                   vae_full_batch=1, scenes=6, steps=4,
                                   batch=2, warmup=2, checkpoint_every=100, scale_scenes=2,
                                   decoder_steps=2, decoder_batch=1)


def run_all(cfg: pretrain.PretrainConfig, stop_after: int | None = None) -> tuple:
    """Run every stage; ``stop_after`` calls of should_stop() answer True from then on."""
    calls = [0]

    def should_stop() -> bool:
        calls[0] += 1
        return stop_after is not None and calls[0] > stop_after

    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    taesd = pretrain.train_vae(cfg, should_stop)
    data = pretrain.encode_latents(cfg, taesd, should_stop)
    if data is None or pretrain.train_decoder(cfg, taesd, data, should_stop) < cfg.decoder_steps:
        return taesd, None, None, 0
    patcher, clip, step = pretrain.train_unet(cfg, data, should_stop)
    return taesd, patcher, clip, step


def state(taesd, patcher, clip) -> dict[str, torch.Tensor]:
    """Every weight of the three models, by prefixed name."""
    out = {f"vae.{k}": v for k, v in taesd.state_dict().items()}
    out.update({f"unet.{k}": v for k, v in patcher.model.diffusion_model.state_dict().items()})
    out.update({f"clip.{k}": v for k, v in clip.cond_stage_model.clip_l.state_dict().items()})
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> dict[str, torch.Tensor]:
    taesd, patcher, clip, step = run_all(tiny_config(tmp_path_factory.mktemp("full")))
    assert step == 4
    return state(taesd, patcher, clip)


def test_pretraining_is_seeded(full_run, tmp_path):
    again = state(*run_all(tiny_config(tmp_path))[:3])
    assert again.keys() == full_run.keys()
    for key, value in full_run.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)


def test_pretraining_changes_the_weights(full_run):
    fresh_vae = fresh.new_taesd(0).state_dict()
    changed = [k for k, v in fresh_vae.items() if not torch.equal(v, full_run[f"vae.{k}"])]
    assert len(changed) > len(fresh_vae) // 2
    assert float(full_run["vae.vae_scale"]) != 1.0  # latent scale was fitted


@pytest.mark.parametrize("stop_after", [2, 10])  # inside the VAE stage / inside the UNet stage
def test_interrupted_pretraining_resumes_to_the_same_weights(full_run, tmp_path, stop_after):
    cfg = tiny_config(tmp_path)
    first = run_all(cfg, stop_after=stop_after)
    assert first[3] < cfg.steps  # really stopped early
    resumed = state(*run_all(dataclasses.replace(cfg))[:3])
    for key, value in full_run.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


def test_exported_weights_load_through_comfyui(full_run, tmp_path):
    taesd, patcher, clip, _ = run_all(tiny_config(tmp_path))
    out = tmp_path / "weights"
    pretrain.export_weights(patcher, clip, taesd, out, {"note": "test"})
    sizes = sum(p.stat().st_size for p in out.iterdir())
    assert toy.weights_present(out) and sizes < 32 * 2**20
    bundle = toy.load_bundle(out)
    unet = load_file(str(out / toy.UNET_FILE))
    loaded = bundle.model.model.diffusion_model.state_dict()
    for key, value in unet.items():
        torch.testing.assert_close(loaded[key], value.float())
    with torch.inference_mode():
        tokens = bundle.clip.tokenize("a red circle on a grey background")
        cond = bundle.clip.encode_from_tokens(tokens)
        pixels = bundle.vae.decode(torch.zeros(1, 4, 16, 16))
    assert cond.shape == (1, 77, toy.CLIP_CONFIG["hidden_size"])
    assert pixels.shape[-3:] == (128, 128, 3)


def test_learning_rate_schedule_and_rewarm():
    cfg = pretrain.PretrainConfig(work_dir=Path("unused"), lr=1e-3, warmup=10, steps=110)
    assert pretrain.lr_at(cfg, 0) == pytest.approx(1e-4)
    assert pretrain.lr_at(cfg, 10) == pytest.approx(1e-3)
    assert pretrain.lr_at(cfg, 60) == pytest.approx(1e-3 * (0.1 + 0.45))  # half way down the cosine
    assert pretrain.lr_at(cfg, 200) == pytest.approx(1e-4)  # floor after the end
    assert pretrain.lr_at(cfg, 60, rewarm_from=60) == pytest.approx(1e-3 * 0.55 / 10)
    assert pretrain.lr_at(cfg, 69, rewarm_from=60) == pytest.approx(pretrain.lr_at(cfg, 69))


def test_a_slim_copy_resumes_from_the_ema_with_a_fresh_warmed_up_optimizer(tmp_path):
    cfg = tiny_config(tmp_path / "work")
    assert run_all(cfg, stop_after=10)[3] == 2  # stopped inside the UNet stage
    saved = torch.load(cfg.work_dir / "unet.pt", weights_only=True)
    pretrain.slim_checkpoint(cfg.work_dir, tmp_path / "slim")
    slim = torch.load(tmp_path / "slim" / "unet.pt", weights_only=True)
    assert set(slim) == {"model", "step"} and slim["step"] == 2
    for key, value in saved["ema"].items():
        assert torch.equal(slim["model"][key], value), key
    assert "opt" not in torch.load(tmp_path / "slim" / "vae.pt", weights_only=True)
    assert not (tmp_path / "slim" / "latents.pt").exists()  # re-encoded on the other machine

    slim_cfg = dataclasses.replace(cfg, work_dir=tmp_path / "slim")
    taesd, patcher, clip, step = run_all(slim_cfg)
    assert step == cfg.steps
    resumed = torch.load(slim_cfg.work_dir / "unet.pt", weights_only=True)
    assert resumed["rewarm_from"] == 2 and "opt" in resumed
    assert not torch.equal(resumed["model"]["unet.out.2.weight"], slim["model"]["unet.out.2.weight"])
    vae_before = torch.load(cfg.work_dir / "vae.pt", weights_only=True)["model"]
    for key, value in taesd.state_dict().items():  # finished VAE stage: not trained again
        if not key.startswith("taesd_decoder"):
            assert torch.equal(value, vae_before[key]), key


def test_supervised_pretraining_is_seeded_resumable_and_moves_the_weights(full_run, tmp_path):
    cfg = dataclasses.replace(tiny_config(tmp_path / "a"), supervision_weight=0.5, batch=3)
    supervised = state(*run_all(cfg)[:3])
    resumed_cfg = dataclasses.replace(cfg, work_dir=tmp_path / "b")
    assert run_all(resumed_cfg, stop_after=10)[3] < cfg.steps
    resumed = state(*run_all(dataclasses.replace(resumed_cfg))[:3])
    for key, value in supervised.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
    plain = state(*run_all(dataclasses.replace(cfg, work_dir=tmp_path / "c", supervision_weight=0.0))[:3])
    attn = "unet.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert not torch.equal(plain[attn], supervised[attn])


def test_a_work_dir_seeded_from_narrow_weights_starts_from_the_same_predictions(tmp_path):
    narrow = fresh.random_model(4, model_channels=32)
    clip, taesd = fresh.random_clip(4), fresh.new_taesd(4)
    pretrain.export_weights(narrow, clip, taesd, tmp_path / "v1", {"note": "test"})
    cfg = dataclasses.replace(tiny_config(tmp_path / "work"), steps=0)
    assert pretrain.seed_from_weights(cfg, tmp_path / "v1")
    assert not pretrain.seed_from_weights(cfg, tmp_path / "v1")  # never overwrites a started run
    vae, _, _, _ = run_all(dataclasses.replace(cfg, steps=-1))  # VAE and decoder count as done
    shipped = load_file(str(tmp_path / "v1" / toy.VAE_FILE))
    for key, value in vae.state_dict().items():
        assert torch.equal(value, shipped[key].float()), key
    _, wide, wide_clip, step = run_all(cfg)
    assert step == 0 and toy.width_of(wide.model.diffusion_model.state_dict()) == toy.MODEL_CHANNELS
    loaded = toy.build_model(load_file(str(tmp_path / "v1" / toy.UNET_FILE)))
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 64)
    sigma = narrow.model.model_sampling.sigmas[torch.tensor([30, 700])]
    with torch.no_grad():
        before = loaded.model.apply_model(x, sigma, c_crossattn=context)
        after = wide.model.apply_model(x, sigma, c_crossattn=context)
    assert (before - after).abs().max() < 1e-4 * before.abs().max()
    for key, value in wide_clip.cond_stage_model.clip_l.state_dict().items():
        if "logit_scale" not in key:
            torch.testing.assert_close(value, clip.cond_stage_model.clip_l.state_dict()[key].half().float())



# sha256 of the objects of the default pretraining set's first 40 scenes (the shipped base's data)
PRETRAINING_SET_DIGEST = "21e314bd5a0b328a1e5bc950b0a69caff8ffb9d395fcecb39230f51b45ca0f95"


def test_twin_scenes_share_one_look_and_the_other_scenes_stay_those_of_the_default_set(tmp_path):
    """--twin-rate replaces some multi-object scenes by twins; the rest are the default set's scenes."""
    def objects(cfg: pretrain.PretrainConfig, count: int) -> list:
        return [[dataclasses.asdict(o) for o in pretrain.pretrain_scene(cfg, i).objects] for i in range(count)]

    default = objects(pretrain.PretrainConfig(work_dir=tmp_path), 400)
    assert hashlib.sha256(json.dumps(default[:40]).encode()).hexdigest() == PRETRAINING_SET_DIGEST
    twins = pretrain.PretrainConfig(work_dir=tmp_path, twin_rate=1.0)
    several = [s for s in (pretrain.pretrain_scene(twins, i) for i in range(40)) if len(s.objects) > 1]
    assert len(several) > 20  # PRETRAIN_COUNTS: three scenes in four have several objects
    for scene in several:
        shapes = [o.shape for o in scene.objects]
        assert len({(o.colour, o.pattern) for o in scene.objects}) == 1 and len(set(shapes)) == len(shapes), scene.objects
    half = objects(pretrain.PretrainConfig(work_dir=tmp_path, twin_rate=0.5), 400)
    kept = [h == d for h, d in zip(half, default)]
    replaced = [len(d) for d, same in zip(default, kept) if not same]
    assert 1 not in replaced  # single objects are never replaced
    assert 0.4 < len(replaced) / sum(len(d) > 1 for d in default) < 0.6


def test_hidden_hints_add_words_to_the_default_captions_and_change_nothing_else(tmp_path):
    """--hidden-hint-rate draws from its own generator: the same captions, plus one word for some hidden objects."""
    cfg = pretrain.PretrainConfig(work_dir=tmp_path)
    scenes = [pretrain.pretrain_scene(cfg, i) for i in range(300)]
    data = {"objects": [json.dumps([dataclasses.asdict(o) for o in s.objects]) for s in scenes],
            "backgrounds": [s.background for s in scenes]}
    indices = np.arange(300)

    def captions(rate: float) -> list[str]:
        return pretrain._captions(data, indices, np.random.default_rng([0, 3, 7]), 0.1, rate,
                                  np.random.default_rng([0, 6, 7]))

    plain, hinted = captions(0.0), captions(0.5)
    added = 0
    for before, after in zip(plain, hinted):
        words, more = ([("a" if w == "an" else w) for w in c.split()] for c in (before, after))
        edits = difflib.SequenceMatcher(a=words, b=more, autojunk=False).get_opcodes()
        extra = [w for op, _, _, j1, j2 in edits if op == "insert" for w in more[j1:j2]]
        assert all(op in ("equal", "insert") for op, *_ in edits), (before, after)
        assert set(extra) <= set(sw.COLOURS) | set(sw.PATTERN_WORDS.values()), (before, after)
        added += len(extra)
    hidden = sum(o.hidden for s in scenes for o in s.objects)
    assert 0.2 * hidden < added < 0.5 * hidden, (added, hidden)  # half of them, less the dropped words and empties
    with pytest.raises(ValueError, match="needs a hint generator"):
        pretrain._captions(data, indices, np.random.default_rng(0), 0.1, 0.5)
    with pytest.raises(ValueError, match="hidden_hint_rate must lie in"):
        pretrain.PretrainConfig(work_dir=tmp_path, hidden_hint_rate=-0.1)


def test_twin_scenes_append_to_a_latent_cache_and_leave_its_scenes_alone(tmp_path, monkeypatch):
    """With --scenes above the cached count, only the new scenes are twins; decoder targets are the cache's."""
    cfg = tiny_config(tmp_path)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    taesd = pretrain.train_vae(cfg, lambda: False)
    first = pretrain.encode_latents(cfg, taesd, lambda: False)
    more = dataclasses.replace(cfg, scenes=cfg.scenes + 12, twin_rate=1.0)
    data = pretrain.encode_latents(more, taesd, lambda: False)
    assert data["objects"][:cfg.scenes] == first["objects"]
    assert torch.equal(data["latents"][:cfg.scenes], first["latents"])
    appended = [pretrain.cached_objects(data, i) for i in range(cfg.scenes, more.scenes)]
    assert all(len({(o.colour, o.pattern) for o in objs}) == 1 for objs in appended if len(objs) > 1)
    assert sum(len(objs) > 1 for objs in appended) >= 6

    def redraw(*_):
        raise AssertionError("the decoder drew a scene anew instead of from the cache")

    monkeypatch.setattr(pretrain, "pretrain_scene", redraw)
    assert pretrain.train_decoder(more, taesd, data, lambda: False) == more.decoder_steps
