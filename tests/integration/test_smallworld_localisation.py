"""Localisation report, attention supervision and widening of the toy base model (random weights)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from smallworld_lab import fresh
from smallworld_lab import localisation as loc
from concept_attention.smallworld import model as toy
from concept_attention.smallworld import scenes as sw
from smallworld_lab import supervision as sup
from smallworld_lab import widen


@pytest.fixture(scope="module")
def random_toy():
    return fresh.random_bundle(3)


def test_held_out_scenes_name_each_shape_once_and_are_not_pretraining_scenes():
    scenes = loc.held_out_scenes(12)
    assert all(len({o.shape for o in s.objects}) == len(s.objects) for s in scenes)
    assert sum(len(s.objects) > 1 for s in scenes) >= 6  # mostly several objects
    assert scenes[0].caption == sw.caption_for(scenes[0].objects, scenes[0].background)
    from smallworld_lab.pretrain import PretrainConfig, pretrain_scene

    cfg = PretrainConfig(work_dir=None)
    first = {tuple(o.cx for o in pretrain_scene(cfg, i).objects) for i in range(200)}
    assert not first & {tuple(o.cx for o in s.objects) for s in scenes}


def test_word_positions_follow_the_objects_in_order(random_toy):
    objects = (sw.ObjectSpec("circle", "purple", "stripes", 30, 30, 30),  # hidden: shape word only
               sw.ObjectSpec("star", "cyan", "checks", 90, 30, 30),
               sw.ObjectSpec("circle", "red", "solid", 60, 90, 30))
    caption = sw.caption_for(objects, "light blue")
    assert caption == "a circle, a cyan checkered star and a red circle on a light blue background"
    stream = [t for t, _ in random_toy.clip.tokenize(caption)["l"][0]]
    found = loc.object_word_positions(random_toy.clip, caption, objects)
    assert found[0] == {"shape": [2], "colour": [], "pattern": []}
    assert [stream[i] for i in found[1]["colour"]] == [1470, 550]  # "cyan" is two tokens
    assert len(found[1]["pattern"]) == 2 and found[1]["shape"] == [found[1]["pattern"][-1] + 1]
    assert found[2]["shape"][0] > found[1]["shape"][0] and len(found[2]["colour"]) == 1
    assert "blue" not in caption.split(" on ")[0] and found[2]["colour"][0] < found[2]["shape"][0]


def _scene_rows(scene, maps):
    return loc.measure_scene(0, scene, torch.as_tensor(maps, dtype=torch.float32), "latent/1", 0.05, {})


def test_perfect_maps_reach_the_ceiling_and_flat_maps_do_not():
    scene = next(s for s in loc.held_out_scenes(8) if len(s.objects) == 3)
    perfect = np.stack([loc.pooled_mask(m, 16) for m in scene.masks])
    rows, choice = _scene_rows(scene, perfect)
    for row in rows:
        assert row.soft == pytest.approx(row.ceiling) and row.thresholded == pytest.approx(row.ceiling_thresholded)
        assert row.own > 0.6 and row.other == 0 and row.own + row.other + row.background == pytest.approx(1.0)
        assert 0.5 < row.ceiling < 0.95
    assert choice.right / choice.pixels > 0.97 and choice.chance / choice.pixels < 0.5
    flat, _ = _scene_rows(scene, np.ones((3, 16, 16)))
    for row, mask in zip(flat, scene.masks):
        assert row.soft == 0.0 and row.own == pytest.approx(mask.mean(), abs=0.01)  # min-max of a flat map is 0
    swapped, choice = _scene_rows(scene, perfect[[1, 2, 0]])
    assert choice.right == 0 and all(r.own < 0.2 for r in swapped)


def test_report_rows_tables_gates_and_raw_round_trip(random_toy):
    scenes = loc.held_out_scenes(3)
    report = loc.localisation_report(random_toy, scenes, levels=(0.05, 0.55), seeds=1)
    objects = sum(len(s.objects) for s in scenes)
    assert report.groups() == ["latent/1", "latent/2", "latent/4"]
    assert len(report.objects) == objects * 3 * 2
    assert len(report.argmax) == sum(len(s.objects) > 1 for s in scenes) * 3 * 2
    again = loc.LocalisationReport.from_json(report.to_json())
    assert again.table() == report.table()
    gates = report.gates("latent/1")
    assert set(gates) == set(loc.GATES) and all(not ok for _, _, ok in gates.values())  # random weights
    low = report.summary("latent/1", low_only=True)
    assert low["ceiling"] == pytest.approx(np.mean([r.ceiling for r in report.objects
                                                    if r.group == "latent/1" and r.t == 0.05]), abs=1e-9)
    ceilings = {g: report.summary(g)["ceiling"] for g in report.groups()}
    assert ceilings["latent/1"] > ceilings["latent/2"] > ceilings["latent/4"]  # coarser maps, lower ceiling


def test_supervision_targets_and_loss():
    objects = [(sw.ObjectSpec("circle", "red", "stripes", 40, 40, 40), sw.ObjectSpec("star", "orange", "dots", 90, 90, 40))]
    captions = ["a red striped circle and a star on a grey background"]  # the orange dotted star is hidden
    ids = {"circle": [7117], "star": [1565], "red": [736], "striped": [22192], "orange": [4287], "dotted": [47950]}
    stream = [49406, 320, 736, 22192, 7117, 537, 320, 1565, 525, 320, 5046, 5994, 49407]
    masks = torch.zeros(1, 3, 16, 16)
    masks[0, 0, 2:8, 2:8] = 1
    masks[0, 1, 9:14, 9:14] = 1
    targets = sup.word_targets([stream], objects, masks, torch.tensor([True]), sup.WordPositions(ids.get),
                               ("shape", "colour", "pattern"))
    assert targets.valid.tolist() == [[True, True, True, True]]  # circle, red, striped; the star's shape word
    assert targets.token_index[0].tolist() == [4, 2, 3, 7]
    assert torch.equal(targets.masks[0, 3], masks[0, 1]) and torch.equal(targets.masks[0, 0], masks[0, 0])
    off = sup.word_targets([stream], objects, masks, torch.tensor([False]), sup.WordPositions(ids.get), ("shape",))
    assert not off.valid.any()
    good = targets.masks * 0.9 + 0.01
    flat = torch.full_like(good, 0.05)
    assert sup.map_loss(good, targets.masks, targets.valid) < 0.5 * sup.map_loss(flat, targets.masks, targets.valid)
    maps = flat.clone().requires_grad_(True)
    sup.map_loss(maps, targets.masks, targets.valid).backward()
    inside = maps.grad[0, 0][masks[0, 0] > 0].mean()
    assert inside < 0 < maps.grad[0, 0][masks[0, 0] == 0].mean()  # mass moves onto the object


def test_widened_unet_predicts_what_the_narrow_one_did(random_toy):
    narrow = fresh.random_model(7, model_channels=32)
    shapes = {k: v.shape for k, v in random_toy.model.model.diffusion_model.state_dict().items()}
    wide = toy.build_model(widen.widen_state_dict(narrow.model.diffusion_model.state_dict(), shapes))
    assert toy.width_of(wide.model.diffusion_model.state_dict()) == 2 * 32
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, 16, generator=generator)
    context = torch.randn(3, 77, 64, generator=generator)
    sigma = narrow.model.model_sampling.sigmas[torch.tensor([5, 400, 990])]
    with torch.no_grad():
        before = narrow.model.apply_model(x, sigma, c_crossattn=context)
        after = wide.model.apply_model(x, sigma, c_crossattn=context)
    assert (before - after).abs().max() < 1e-4 * before.abs().max()
    with pytest.raises(ValueError, match="cannot widen"):
        widen.widen_tensor("out.2.weight", torch.zeros(4, 32, 3, 3), torch.Size([4, 48, 3, 3]))


def test_word_maps_read_the_model_given_not_the_clone_sampled_last(random_toy):
    """Clones share one UNet; a clone's weight patch left in it by sampling must not reach the base's maps."""
    from concept_attention.sampling.ksampler import empty_latent, run_ksampler

    model = random_toy.model
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = random_toy.clip.encode_from_tokens(random_toy.clip.tokenize("a red circle"))
    sigma, index = loc.sigma_at(model, 0.3), torch.tensor([[1, 2, 3]] * 2)

    def maps() -> dict:
        return loc.word_maps(model, latents, context.expand(2, -1, -1), sigma, index, torch.Generator().manual_seed(1))

    before = maps()
    patched = model.clone()
    keys = [k for k in patched.model_state_dict() if k.endswith("attn2.to_k.weight")]
    original = patched.model_state_dict()[keys[0]].clone()
    patched.add_patches({k: (torch.randn_like(patched.model_state_dict()[k]) * 3.0,) for k in keys}, 1.0)
    cond = [[context, {"pooled_output": None}]]
    run_ksampler(patched, 0, 1, 1.0, "euler", "normal", cond, cond, empty_latent(128))
    assert not torch.equal(model.model_state_dict()[keys[0]], original)  # the shared UNet holds the clone's patch
    after = maps()
    assert torch.equal(model.model_state_dict()[keys[0]], original)
    for group in before:
        assert torch.equal(before[group], after[group]), group
