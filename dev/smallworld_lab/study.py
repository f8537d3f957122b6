"""The verdict's protocol (issue 18): tune on dev scenes, freeze the settings, run held-out scenes once.

- **Splits.** ``dev`` is the benchmark's reference scenes with seed 0 (everything so far was tuned on
  them); ``heldout`` the same generator with a seed nothing else uses. The learnability gate's
  seed-1 scenes (``learnability.DEV_SEED``) are tuning scenes too, never held-out ones.
- **Settings.** A dev run may change the tunable ``ExperimentSettings`` fields (``--set
  name=value``); a held-out run takes its settings, training seeds, sample seeds and scene count
  only from the frozen file (``FROZEN_SETTINGS``, written once the dev tuning is over) and refuses
  every flag that would change them; its raw rows record the file's sha256 and the weights.
- **Seeds.** Each run learns with several training seeds and samples 16 seeds; rows carry their
  ``train_seed`` and the paired bootstrap (``report.paired_difference``) resamples scenes, then
  training seeds, then sample seeds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from concept_attention.smallworld import scenes as sw
from concept_attention.training.settings import INITS, LOSS_WEIGHTINGS
from .experiment import ExperimentSettings

HELDOUT_SEED = 1207  # never used by any other scene generator of the project
SPLITS: dict[str, int] = {"dev": 0, "heldout": HELDOUT_SEED}
FROZEN_SETTINGS = Path(__file__).resolve().parents[2] / "docs" / "verdict_settings.json"
# ExperimentSettings fields a study may set; the others are objects or define the protocol itself.
TUNABLE = ("steps", "learning_rate", "attention_weight", "calibration_max_t", "micro_batch", "grad_accumulation",
           "map_layers", "iou_steps", "iou_denoise", "init", "loss_weighting", "cfg", "sample_steps")
WHOLE_AT_LEAST_ONE = ("steps", "micro_batch", "grad_accumulation", "iou_steps", "sample_steps")
CHOICES = {"init": INITS, "loss_weighting": LOSS_WEIGHTINGS}


@dataclass(frozen=True)
class Protocol:
    """What a run measures besides the settings: the training seeds, the sample seeds and the scenes."""

    train_seeds: tuple[int, ...] = (0,)
    sample_seeds: int | None = None  # None: the settings' own seeds
    scenes: int = 8


def split_scenes(split: str, count: int) -> list[sw.Scene]:
    """The first ``count`` reference scenes of ``split`` ('dev' or 'heldout')."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return sw.reference_scenes(count, seed=SPLITS[split])


def typed_value(name: str, value: Any) -> Any:
    """``value`` (text from --set, or JSON) as ExperimentSettings field ``name`` needs it; checked."""
    if name not in TUNABLE:
        raise ValueError(f"{name!r} cannot be set by a study; tunable: {', '.join(TUNABLE)}")
    kind = type(getattr(ExperimentSettings(), name))
    if kind is str:
        typed = str(value)
    else:
        try:
            typed = kind(value) if not isinstance(value, bool) else None
            if kind is int and isinstance(value, float) and value != int(value):
                typed = None
        except (TypeError, ValueError):
            typed = None
        if typed is None or (kind is float and not math.isfinite(typed)):
            what = "a whole number" if kind is int else "a finite number"
            raise ValueError(f"{name} takes {what}, got {value!r}")
    if name in WHOLE_AT_LEAST_ONE and typed < 1:
        raise ValueError(f"{name} must be at least 1, got {typed}")
    if name in ("learning_rate", "cfg") and typed <= 0 or name == "attention_weight" and typed < 0:
        raise ValueError(f"{name} must be {'positive' if name != 'attention_weight' else 'at least 0'}, got {typed}")
    if name in ("iou_denoise", "calibration_max_t") and not 0 < typed <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {typed}")
    if name in CHOICES and typed not in CHOICES[name]:
        raise ValueError(f"{name} must be one of {', '.join(CHOICES[name])}, got {typed!r}")
    return typed


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """'name=value' strings to typed, checked ExperimentSettings overrides."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: write name=value with name one of {', '.join(TUNABLE)}")
        out[name.strip()] = typed_value(name.strip(), text)
    return out


def settings_with(overrides: Mapping[str, Any], sample_seeds: int | None = None) -> ExperimentSettings:
    """The default ExperimentSettings with ``overrides`` and, if given, seeds 11 .. 10 + sample_seeds."""
    settings = dataclasses.replace(ExperimentSettings(), **{k: typed_value(k, v) for k, v in overrides.items()})
    if sample_seeds is not None:
        if sample_seeds < 1:
            raise ValueError(f"--sample-seeds must be at least 1, got {sample_seeds}")
        settings.sample_seeds = tuple(range(11, 11 + sample_seeds))
    return settings


def frozen_protocol(path: Path = FROZEN_SETTINGS) -> tuple[dict[str, Any], Protocol, str]:
    """(overrides, protocol, sha256 of the file) that the dev tuning froze; refuses a missing file.

    The file: ``{"overrides": {field: value}, "train_seeds": [...], "sample_seeds": N, "scenes": N,
    "why": "..."}``.
    """
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: held-out scenes run only with the settings the dev "
                         "tuning froze; write that file when the tuning is over (see docs/toy_world.md)")
    text = path.read_bytes()
    record = json.loads(text)
    try:
        overrides = {name: typed_value(name, value) for name, value in record["overrides"].items()}
        protocol = Protocol(tuple(int(s) for s in record["train_seeds"]), int(record["sample_seeds"]),
                            int(record["scenes"]))
        if not protocol.train_seeds or protocol.sample_seeds < 1 or protocol.scenes < 1:
            raise ValueError("a study needs at least one training seed, sample seed and scene")
    except (KeyError, AttributeError, TypeError, ValueError) as error:
        raise SystemExit(f"{path}: {error}; it needs 'overrides' (an object), 'train_seeds' (a list), "
                         "'sample_seeds' and 'scenes' (whole numbers)") from None
    return overrides, protocol, hashlib.sha256(text).hexdigest()


def run_settings(split: str, overrides: Iterable[str], protocol: Protocol
                 ) -> tuple[ExperimentSettings, dict[str, Any], Protocol, str]:
    """(settings, their overrides, protocol, frozen file's sha256 or '') for a run of ``split``.

    A held-out run takes overrides and protocol from ``FROZEN_SETTINGS`` only: any override or a
    protocol other than the default is refused, so nothing of a held-out run can be tuned.
    """
    items = list(overrides)
    if split != "heldout":
        chosen = parse_overrides(items)
        return settings_with(chosen, protocol.sample_seeds), chosen, protocol, ""
    if items or protocol != Protocol():
        raise SystemExit("held-out runs take their settings, seeds and scene count from "
                         f"{FROZEN_SETTINGS.name} only: drop --set, --steps, --train-seeds, --sample-seeds "
                         "and --scenes (tune on --split dev, then record the choice in that file)")
    chosen, frozen, digest = frozen_protocol(FROZEN_SETTINGS)
    return settings_with(chosen, frozen.sample_seeds), chosen, frozen, digest
