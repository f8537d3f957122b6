"""Unit tests for smallworld/evaluate.py and readout.py: read-out accuracy and metrics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from concept_attention.smallworld import evaluate as ev
from concept_attention.smallworld import readout
from concept_attention.smallworld import scenes as sw


@pytest.fixture(scope="module")
def fresh_scenes() -> list:
    # Seeds disjoint from the classifiers' fitting scenes (readout._FIT_SEED).
    return [sw.random_scene(np.random.default_rng([20261122, i])) for i in range(300)]


def _report(capsys, name: str, acc: dict) -> None:
    line = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in acc.items())
    with capsys.disabled():
        print(f"\n[smallworld read-out] {name}: {line}")


def test_accuracy_on_generator_ground_truth(fresh_scenes, capsys) -> None:
    acc = ev.ground_truth_accuracy(fresh_scenes)
    _report(capsys, "clean 128 px", acc)
    assert acc["scenes"] == 300 and acc["objects"] >= 500
    for key in ("shape", "colour", "pattern", "count", "position", "background"):
        assert acc[key] >= 0.95, (key, acc)


def test_accuracy_after_simulated_vae_is_recorded(fresh_scenes, capsys) -> None:
    # 8x average pool + bilinear upsample; shift=4 puts the pool grid half a cell off the
    # pattern grid (the worst case). Recorded, not gated: only a loose sanity floor.
    aligned = ev.ground_truth_accuracy(fresh_scenes, ev.simulate_vae)
    _report(capsys, "simulated 8x VAE, grid-aligned", aligned)
    shifted = ev.ground_truth_accuracy(fresh_scenes[:150], lambda im: ev.simulate_vae(im, shift=4))
    _report(capsys, "simulated 8x VAE, grid shifted 4 px", shifted)
    assert aligned["count"] > 0.5 and aligned["colour"] > 0.5


def test_labelling_fallback_matches_scipy() -> None:
    pytest.importorskip("scipy")
    mask = np.random.default_rng(0).random((40, 50)) > 0.55
    ours, n_ours = readout._label_numpy(mask)
    ref, n_ref = readout.label_components(mask)
    assert n_ours == n_ref
    # same partition up to relabelling
    pairs = set(zip(ours[mask].tolist(), ref[mask].tolist()))
    assert len(pairs) == n_ref


def test_input_formats_and_specks() -> None:
    scene = sw.random_scene(np.random.default_rng(77), n_objects=2)
    base = [r.attributes() for r in ev.read_scene(scene.image)]
    as_float = scene.image.astype(np.float32) / 255.0
    assert [r.attributes() for r in ev.read_scene(as_float)] == base
    assert [r.attributes() for r in ev.read_scene(torch.from_numpy(as_float))] == base
    noisy = scene.image.copy()
    rng = np.random.default_rng(1)
    for y, x in rng.integers(0, 128, size=(12, 2)):
        if not scene.masks[:, y, x].any():
            noisy[y, x] = (0, 0, 0)
    assert [r.attributes() for r in ev.read_scene(noisy)] == base
    assert ev.read_background(scene.image) == scene.background
    blank = sw.draw_scene([], "light green", 128, caption="")
    assert ev.read_scene(blank.image) == [] and ev.read_background(blank.image) == "light green"
    with pytest.raises(ValueError):
        ev.read_scene(np.zeros((8, 8)))


def _obj(shape: str, colour: str, pattern: str, position: str = "center",
         area: int = 100) -> ev.ObjectReadout:
    return ev.ObjectReadout(shape, colour, pattern, position, (0.0, 0.0), area,
                            np.zeros((4, 4), dtype=bool))


def test_fidelity_and_leakage() -> None:
    a = {"shape": "circle", "colour": "purple", "pattern": "stripes"}
    b = {"shape": "square", "colour": "orange", "pattern": "dots"}
    good = [_obj("circle", "purple", "stripes"), _obj("square", "orange", "dots")]
    assert ev.concept_fidelity(good, a) == 1.0 and ev.concept_fidelity(good, b) == 1.0
    assert ev.leakage(good, a, b) == 0.0 and ev.leakage(good, b, a) == 0.0
    leaky = [_obj("circle", "purple", "stripes"), _obj("square", "purple", "dots")]
    assert ev.leakage(leaky, b, a) == 0.5
    assert ev.concept_fidelity(leaky, b) == pytest.approx(2 / 3)
    assert ev.concept_fidelity([], a) == 0.0 and ev.leakage([], a, b) == 0.0
    assert ev.concept_fidelity([_obj("star", "red", "solid")], a) == 0.0
    assert ev.extra_object_rate([good, good[:1], [], leaky + good]) == 0.5


def test_chance_leakage_is_the_share_of_one_unused_value() -> None:
    a = {"shape": "circle", "colour": "purple", "pattern": "stripes"}
    b = {"shape": "square", "colour": "orange", "pattern": "dots"}
    used = {"colour": {"purple", "orange"}, "pattern": {"stripes", "dots"}}  # 6 colours, 2 patterns unused
    right = [_obj("circle", "purple", "stripes")]
    assert ev.chance_leakage(right, a, b, used) == 0.0
    unasked = [_obj("circle", "red", "checks")]  # both attributes wrong, neither b's
    assert ev.leakage(unasked, a, b) == 0.0
    assert ev.chance_leakage(unasked, a, b, used) == pytest.approx((1 / 6 + 1 / 2) / 2)
    leaked = [_obj("circle", "orange", "stripes")]  # b's colour: leakage, not chance
    assert ev.leakage(leaked, a, b) == 0.5 and ev.chance_leakage(leaked, a, b, used) == 0.0
    same_pattern = {**b, "pattern": "stripes"}  # only colour differs, so only colour counts
    assert ev.chance_leakage(unasked, a, same_pattern, used) == pytest.approx(1 / 6)
    assert ev.chance_leakage([], a, b, used) == 0.0


def test_text_alignment() -> None:
    got = [_obj("circle", "purple", "stripes", "left"), _obj("square", "red", "solid", "right")]
    prompt = [{"shape": "square", "colour": "red", "position": "right"},
              {"shape": "circle", "position": "left"}]
    assert ev.text_alignment(got, prompt) == 1.0
    assert ev.text_alignment(got, prompt, "grey", "beige") == pytest.approx(5 / 6)
    assert ev.text_alignment(got[:1], prompt) == pytest.approx(2 / 5)
    assert ev.text_alignment(got, [{"shape": "star"}]) == 0.0


def test_mask_iou() -> None:
    mask = np.zeros((64, 64), dtype=bool)
    mask[:32] = True
    exact = mask.astype(np.float32)
    assert ev.mask_iou(exact, mask) == pytest.approx(1.0)
    assert ev.mask_iou(1.0 - exact, mask) == pytest.approx(0.0)
    low = torch.zeros(8, 8)
    low[:4] = 5.0  # coarse map, resized bilinearly to the mask
    assert 0.8 < ev.mask_iou(low, mask) < 1.0
    assert ev.mask_iou(low, mask, threshold=0.5) == pytest.approx(1.0)
    assert ev.mask_iou(np.ones((8, 8)), mask) == 0.0  # constant map carries no location
    with pytest.raises(ValueError):
        ev.mask_iou(np.ones((2, 2, 2)), mask)


def test_reference_scene_maps_match_their_masks() -> None:
    scene = sw.reference_scenes(1, seed=3)[0]
    readouts = ev.read_scene(scene.image)
    for obj, got in zip(scene.objects, ev.match_masks(readouts, scene.masks)):
        assert got is not None and got.attributes() == obj.attributes(scene.size)
        assert ev.concept_fidelity(readouts, obj.attributes(scene.size)) == 1.0
    assert ev.mask_iou(scene.masks[0].astype(float), scene.masks[0]) == pytest.approx(1.0)
