"""Report helpers: per-seed value lists, the paired bootstrap (known differences and intervals), chart labels."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from smallworld_lab.report import add_values, draw_words, paired_difference, pooled_means


# paired_difference(a, b, "leak", draws=300) of the test below, computed by the code before training seeds
OLD_INTERVAL = (0.38888888888888884, -0.2541666666666666, 0.8888888888888888)


def rows(per_scene: list[list[list[float]]]) -> list[dict]:
    return [{"scene": s, "per_seed": {"leak": seeds}} for s, seeds in enumerate(per_scene)]


def test_a_constant_gap_has_a_zero_width_interval():
    a = rows([[[1.0], [1.0, 1.0]], [[1.0]]])
    b = rows([[[0.0], [0.0, 0.0]], [[0.0]]])
    assert paired_difference(a, b, "leak", draws=200) == (1.0, 1.0, 1.0)
    assert paired_difference(b, b, "leak", draws=200) == (0.0, 0.0, 0.0)


def test_scenes_weigh_equally_and_the_interval_covers_the_difference():
    a = rows([[[1.0, 0.0], [1.0]], [[0.0], [1.0]], [[1.0], [0.0]]])
    b = rows([[[0.0, 0.0], [0.0]], [[0.0], [0.0]], [[0.0], [0.0]]])
    difference, low, high = paired_difference(a, b, "leak", draws=500)
    assert difference == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)  # per-scene means, then their mean
    assert 0.0 <= low < difference < high <= 1.0
    assert paired_difference(a, b, "leak", draws=500) == (difference, low, high)  # seeded: repeatable


def test_scenes_missing_from_either_side_are_an_error():
    with pytest.raises(ValueError, match="no scene"):
        paired_difference(rows([[[1.0]]]), [], "leak")


def test_per_seed_values_stay_aligned_with_seeds_and_pool_into_means():
    per_seed: dict = {}
    add_values(per_seed, 0, {"leak": [1.0, 0.0], "drawn": [1.0]}, "_combined")
    add_values(per_seed, 1, {"leak": [], "drawn": [0.0]}, "_combined")  # nothing drawn: no leakage value
    add_values(per_seed, 1, {"leak": [1.0]}, "_combined")  # a second picture of the same seed
    assert per_seed == {"leak_combined": [[1.0, 0.0], [1.0]], "drawn_combined": [[1.0], [0.0]]}
    assert pooled_means(per_seed) == {"leak_combined": pytest.approx(2 / 3), "drawn_combined": 0.5}
    assert pooled_means({"leak": [[], []]}) == {}  # no value: left out, never a made-up 0
    a, b = rows([[[1.0, 0.0], [1.0]]]), [{"scene": 0, "per_seed": {"leak": [[0.0], []]}}]
    assert paired_difference(a, b, "leak", draws=50)[0] == pytest.approx(2 / 3)


def test_training_seeds_pool_into_their_scene_and_pair_by_seed():
    """Rows of one scene with several training seeds: one scene mean, pairs matched by training seed."""
    def run(scene: int, train_seed: int, value: float, seeds: int = 8) -> dict:
        return {"scene": scene, "train_seed": train_seed, "per_seed": {"leak": [[value]] * seeds}}

    a = [run(0, 0, 1.0), run(0, 1, 0.0), run(1, 0, 1.0)]
    b = [run(0, 1, 0.0), run(0, 0, 0.0), run(1, 0, 0.0)]
    difference, low, high = paired_difference(a, b, "leak", draws=400)
    assert difference == pytest.approx((0.5 + 1.0) / 2)  # scene 0 pools its two runs: 0.5
    assert high == pytest.approx(1.0)
    # runs pair by training seed, not by position: A equals B run for run, so every draw gives 0
    same = [run(0, 1, 0.0), run(0, 0, 1.0), run(1, 0, 1.0)]
    assert paired_difference(a, same, "leak", draws=200) == (0.0, 0.0, 0.0)
    # the training seeds are resampled (scene 0 gives 0, 0.5 or 1): a wider interval than the same
    # values as one run of 16 seeds, where resampling seeds rarely moves scene 0 far from 0.5
    as_one_run = [{"scene": 0, "per_seed": {"leak": [[1.0]] * 8 + [[0.0]] * 8}}, run(1, 0, 1.0)]
    zeros = [{"scene": 0, "per_seed": {"leak": [[0.0]] * 16}}, run(1, 0, 0.0)]
    one_run_low = paired_difference(as_one_run, zeros, "leak", draws=400)[1]
    assert low == pytest.approx(0.25) and one_run_low > 0.35
    with pytest.raises(ValueError, match="no scene"):
        paired_difference(a, [dict(r, train_seed=5) for r in b], "leak")


def test_a_single_training_seed_gives_the_interval_of_rows_without_one():
    """Rows written before training seeds existed keep their intervals exactly (same random draws):
    the literal is what the bootstrap gave before training seeds existed."""
    a = rows([[[1.0, 0.0], [1.0]], [[0.0], [1.0]], [[1.0], [0.0]]])
    b = rows([[[0.0, 0.0], [0.0]], [[0.0], [0.0]], [[0.0], [1.0]]])
    tagged = [[dict(r, train_seed=3) for r in side] for side in (a, b)]
    assert paired_difference(*tagged, "leak", draws=300) == paired_difference(a, b, "leak", draws=300) == OLD_INTERVAL


def widest_blank_run(image: Image.Image) -> int:
    """The most consecutive pixel columns without a dark pixel between the first and last inked column."""
    inked = (np.asarray(image.convert("L")) < 128).any(axis=0).nonzero()[0]
    return int(np.diff(inked).max()) - 1 if len(inked) > 1 else 0


def test_chart_labels_keep_a_visible_gap_between_words():
    label = Image.new("RGB", (200, 20), "white")
    draw_words(ImageDraw.Draw(label), (2, 2), "swap single")  # Pillow's default font alone: 2 blank columns
    assert widest_blank_run(label) >= 4
