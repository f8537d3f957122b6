"""The verdict's protocol: splits, tunable settings, and held-out runs that take only frozen settings."""
from __future__ import annotations

import json

import pytest

from smallworld_lab import learnability, study
from smallworld_lab.experiment import ExperimentSettings


def test_the_heldout_split_is_its_own_scenes():
    dev, heldout = study.split_scenes("dev", 4), study.split_scenes("heldout", 4)
    from concept_attention.smallworld import scenes as sw
    assert [s.image.tobytes() for s in dev] == [s.image.tobytes() for s in sw.reference_scenes(4)]
    assert study.HELDOUT_SEED not in (study.SPLITS["dev"], learnability.DEV_SEED)
    assert not {s.image.tobytes() for s in dev} & {s.image.tobytes() for s in heldout}
    with pytest.raises(ValueError, match="split must be one of"):
        study.split_scenes("test", 1)


def test_overrides_are_typed_and_checked():
    assert study.parse_overrides(["attention_weight=0.2", "steps=300", "map_layers=latent/1"]) == {
        "attention_weight": 0.2, "steps": 300, "map_layers": "latent/1"}
    with pytest.raises(ValueError, match="takes a int"):
        study.parse_overrides(["steps=many"])
    with pytest.raises(ValueError, match="name one of"):
        study.parse_overrides(["augmentation=none"])  # not tunable from the command line
    with pytest.raises(ValueError, match="name=value"):
        study.parse_overrides(["steps"])
    settings = study.settings_with({"steps": 300}, sample_seeds=16)
    assert settings.steps == 300 and settings.sample_seeds == tuple(range(11, 27))
    assert study.settings_with({}) == ExperimentSettings()


def test_heldout_runs_take_only_the_frozen_settings(tmp_path):
    frozen = tmp_path / "verdict_settings.json"
    with pytest.raises(SystemExit, match="does not exist"):
        study.run_settings("heldout", [], 16, frozen)
    frozen.write_text(json.dumps({"overrides": {"attention_weight": 0.3}, "why": "dev rows"}))
    settings, chosen = study.run_settings("heldout", [], 16, frozen)
    assert chosen == {"attention_weight": 0.3} and settings.attention_weight == 0.3
    with pytest.raises(SystemExit, match="frozen file only"):
        study.run_settings("heldout", ["attention_weight=0.5"], 16, frozen)
    settings, chosen = study.run_settings("dev", ["attention_weight=0.5"], None, frozen)
    assert settings.attention_weight == 0.5 and settings.sample_seeds == ExperimentSettings().sample_seeds
    frozen.write_text(json.dumps({"overrides": {"augmentation": "none"}}))
    with pytest.raises(ValueError, match="cannot be set by a study"):
        study.run_settings("heldout", [], 16, frozen)
