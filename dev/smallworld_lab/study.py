"""The verdict's protocol (issue 18): tune on dev scenes, freeze the settings, run held-out scenes once.

- **Splits.** ``dev`` is the benchmark's reference scenes with seed 0 (everything so far was tuned on
  them); ``heldout`` the same generator with a seed nothing else uses. The learnability gate's
  seed-1 scenes (``learnability.DEV_SEED``) are tuning scenes too, never held-out ones.
- **Settings.** A dev run may change any ``ExperimentSettings`` field (``--set name=value``); a
  held-out run takes its settings only from the frozen file (``FROZEN_SETTINGS``), written once
  the dev tuning is over, and refuses overrides, so the held-out rows cannot be tuned on.
- **Seeds.** Each run learns with several training seeds and samples 16 seeds; rows carry their
  ``train_seed`` and the paired bootstrap (``report.paired_difference``) resamples scenes, then
  training seeds, then sample seeds.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from concept_attention.smallworld import scenes as sw
from .experiment import ExperimentSettings

HELDOUT_SEED = 1207  # never used by any other scene generator of the project
SPLITS: dict[str, int] = {"dev": 0, "heldout": HELDOUT_SEED}
FROZEN_SETTINGS = Path(__file__).resolve().parents[2] / "docs" / "verdict_settings.json"
STUDY_SAMPLE_SEEDS = 16
# ExperimentSettings fields a study may set; the others are objects or define the protocol itself.
TUNABLE = ("steps", "learning_rate", "attention_weight", "micro_batch", "grad_accumulation", "map_layers",
           "iou_steps", "iou_denoise", "init", "loss_weighting", "cfg", "sample_steps")


def split_scenes(split: str, count: int) -> list[sw.Scene]:
    """The first ``count`` reference scenes of ``split`` ('dev' or 'heldout')."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return sw.reference_scenes(count, seed=SPLITS[split])


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """'name=value' strings to typed ExperimentSettings overrides; names and values checked."""
    defaults = ExperimentSettings()
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or name not in TUNABLE:
            raise ValueError(f"--set {item!r}: write name=value with name one of {', '.join(TUNABLE)}")
        kind = type(getattr(defaults, name))
        try:
            out[name] = kind(text) if kind is not str else text
        except ValueError as error:
            raise ValueError(f"--set {item!r}: {name} takes a {kind.__name__} ({error})") from None
    return out


def settings_with(overrides: Mapping[str, Any], sample_seeds: int | None = None) -> ExperimentSettings:
    """The default ExperimentSettings with ``overrides`` and, if given, seeds 11 .. 10 + sample_seeds."""
    unknown = sorted(set(overrides) - set(TUNABLE))
    if unknown:
        raise ValueError(f"settings {unknown} cannot be set by a study; tunable: {', '.join(TUNABLE)}")
    settings = dataclasses.replace(ExperimentSettings(), **overrides)
    if sample_seeds is not None:
        if sample_seeds < 1:
            raise ValueError(f"--sample-seeds must be at least 1, got {sample_seeds}")
        settings.sample_seeds = tuple(range(11, 11 + sample_seeds))
    return settings


def frozen_overrides(path: Path = FROZEN_SETTINGS) -> dict[str, Any]:
    """The overrides the dev tuning froze (``{"overrides": {...}, "why": ...}``); refuses a missing file."""
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: held-out scenes run only with the settings the dev "
                         "tuning froze; write that file when the tuning is over (see docs/toy_world.md)")
    record = json.loads(path.read_text())
    overrides = record.get("overrides")
    if not isinstance(overrides, dict):
        raise SystemExit(f"{path} must hold an object with 'overrides': {{field: value}}")
    return overrides


def run_settings(split: str, overrides: Iterable[str], sample_seeds: int | None,
                 frozen: Path = FROZEN_SETTINGS) -> tuple[ExperimentSettings, dict[str, Any]]:
    """(settings, the overrides they hold) for a run of ``split``; held-out runs take the frozen file only."""
    items = list(overrides)
    if split == "heldout":
        if items:
            raise SystemExit("held-out runs take their settings from the frozen file only; drop --set "
                             f"(tune on --split dev, then record the settings in {frozen})")
        chosen = frozen_overrides(frozen)
    else:
        chosen = parse_overrides(items)
    return settings_with(chosen, sample_seeds), chosen
