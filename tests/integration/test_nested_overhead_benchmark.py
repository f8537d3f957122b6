"""Smoke test of benchmarks/nested_overhead.py: a --quick run prints parseable ratio lines."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "nested_overhead.py"


def test_quick_run_prints_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    """The quick benchmark runs every variant and reports a finite ratio for each nested one."""
    spec = importlib.util.spec_from_file_location("nested_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--size", "64", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    ratios = dict(re.findall(r"^ratio (nested-\d)/stock: (\d+\.\d+)x$", out, flags=re.M))
    assert set(ratios) == {"nested-1", "nested-2"}
    assert all(0 < float(r) < 100 for r in ratios.values())
    assert "did not act" not in out
