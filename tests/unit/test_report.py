"""Report helpers: per-seed value lists and the paired bootstrap (known differences and intervals)."""
from __future__ import annotations

import pytest

from smallworld_lab.report import add_values, paired_difference, pooled_means


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
