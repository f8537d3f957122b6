"""The verdict's protocol: splits, tunable settings, and held-out runs that take only frozen settings."""
from __future__ import annotations

import hashlib
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
    assert study.parse_overrides(["attention_weight=0.2", "steps=300", "map_layers=latent/1",
                                  "calibration_max_t=0.5"]) == {
        "attention_weight": 0.2, "steps": 300, "map_layers": "latent/1", "calibration_max_t": 0.5}
    bad = {"steps=many": "steps takes a whole number", "steps=0": "at least 1", "learning_rate=-1": "positive",
           "learning_rate=nan": "finite number", "init=clas": "init must be one of rare, class, mean",
           "loss_weighting=x0": "loss_weighting must be one of eps, eps\\+x0",
           "iou_denoise=1.5": "iou_denoise must be in", "calibration_max_t=0": "calibration_max_t must be in",
           "augmentation=none": "cannot be set by a study",
           "steps": "name=value"}
    for item, message in bad.items():
        with pytest.raises(ValueError, match=message):
            study.parse_overrides([item])
    assert study.typed_value("steps", 300.0) == 300  # a JSON number that is whole
    with pytest.raises(ValueError, match="whole number"):
        study.typed_value("steps", 2.5)
    settings = study.settings_with({"steps": 300}, sample_seeds=16)
    assert settings.steps == 300 and settings.sample_seeds == tuple(range(11, 27))
    assert study.settings_with({}) == ExperimentSettings()


def test_heldout_runs_take_only_the_frozen_protocol(tmp_path, monkeypatch):
    frozen = tmp_path / "verdict_settings.json"
    monkeypatch.setattr(study, "FROZEN_SETTINGS", frozen)
    default = study.Protocol()
    with pytest.raises(SystemExit, match="does not exist"):
        study.run_settings("heldout", [], default)
    frozen.write_text(json.dumps({"overrides": {"attention_weight": 0.3}, "train_seeds": [0, 1, 2],
                                  "sample_seeds": 16, "scenes": 16, "why": "dev rows"}))
    settings, chosen, protocol, digest = study.run_settings("heldout", [], default)
    assert chosen == {"attention_weight": 0.3} and settings.attention_weight == 0.3
    assert protocol == study.Protocol((0, 1, 2), 16, 16) and len(settings.sample_seeds) == 16
    assert digest == hashlib.sha256(frozen.read_bytes()).hexdigest()
    with pytest.raises(SystemExit, match="drop --set"):
        study.run_settings("heldout", ["attention_weight=0.5"], default)
    with pytest.raises(SystemExit, match="drop --set"):
        study.run_settings("heldout", [], study.Protocol(scenes=4))
    settings, chosen, protocol, digest = study.run_settings("dev", ["attention_weight=0.5"], study.Protocol(scenes=4))
    assert settings.attention_weight == 0.5 and protocol.scenes == 4 and digest == ""
    assert settings.sample_seeds == ExperimentSettings().sample_seeds
    frozen.write_text(json.dumps({"overrides": {"augmentation": "none"}, "train_seeds": [0], "sample_seeds": 4,
                                  "scenes": 8}))
    with pytest.raises(SystemExit, match="cannot be set by a study"):
        study.run_settings("heldout", [], default)
    frozen.write_text(json.dumps({"overrides": {}}))
    with pytest.raises(SystemExit, match="it needs 'overrides'"):
        study.run_settings("heldout", [], default)
    frozen.write_text(json.dumps({"overrides": {}, "train_seeds": [], "sample_seeds": 16, "scenes": 16}))
    with pytest.raises(SystemExit, match="at least one training seed"):
        study.run_settings("heldout", [], default)
