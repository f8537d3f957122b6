"""benchmarks/learnability_smallworld.py: its raw rows give back the rates the gate is judged on."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from smallworld_lab.learnability import LearnedSample

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "learnability_smallworld.py"


def test_rates_from_raw_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [LearnedSample(0, 0, 1, True, True, True, True, True, 1),     # learned, fully
            LearnedSample(1, 0, 1, True, True, True, False, True, 1),    # colour only
            LearnedSample(2, 0, 1, True, False, False, False, True, 2),  # pattern unreadable: colour counts only
            LearnedSample(0, 1, 1, True, True, False, False, True, 1)]   # a second object: not in the gate
    raw = tmp_path / "rows.json"
    raw.write_text(json.dumps({"rows": [dataclasses.asdict(r) for r in rows]}))
    spec = importlib.util.spec_from_file_location("learnability_smallworld", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--from-raw", str(raw), "--device", "cpu"]) == 0
    gate, every = capsys.readouterr().out.splitlines()[-2:]
    assert "'colour': 0.666" in gate and "'colour_pattern': 0.5" in gate and gate.endswith(
        "FAIL (colour >= 0.8, colour+pattern >= 0.7)")
    assert "'colour': 0.5," in every and "'colour_samples': 4" in every
