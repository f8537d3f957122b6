"""benchmarks/pretrain_smallworld.py --gates DIR: every gate of a weights directory, training nothing."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pretrain_smallworld.py"


def load_script() -> ModuleType:
    """The pretraining script as a module (it is not a package)."""
    spec = importlib.util.spec_from_file_location("pretrain_smallworld", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gates_prints_each_table_of_the_named_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from smallworld_lab import pretrain, quality

    asked = []

    def report(name: str):
        def run(weights_dir: Path, seeds: int | None = None) -> SimpleNamespace:
            asked.append((name, weights_dir, seeds))
            return SimpleNamespace(table=lambda: f"table of {name}")
        return run

    for name in ("roundtrip_report", "quality_gate", "pattern_adherence", "two_object_gate", "hidden_words"):
        monkeypatch.setattr(quality, name, report(name))
    monkeypatch.setattr(pretrain, "train_unet", lambda *a, **k: pytest.fail("--gates must not train"))
    module = load_script()
    weights = tmp_path / "candidate"
    assert module.main(["--gates", str(weights), "--gate-samples", "2", "--two-object-samples", "1",
                        "--work-dir", str(tmp_path / "work")]) == 0
    assert capsys.readouterr().out.splitlines()[-4:] == [
        "table of roundtrip_report", "table of quality_gate", "table of pattern_adherence", "table of two_object_gate"]
    assert asked == [("roundtrip_report", weights, None), ("quality_gate", weights, 2),
                     ("pattern_adherence", weights, 2), ("two_object_gate", weights, 1)]
    asked.clear()
    assert module.main(["--gates", str(weights), "--gate-samples", "0", "--two-object-samples", "0",
                        "--hidden-word-samples", "3", "--work-dir", str(tmp_path / "work")]) == 0
    assert capsys.readouterr().out.splitlines()[-1:] == ["table of hidden_words"]
    assert asked == [("hidden_words", weights, 3)]
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("flag", ["--twin-rate", "--hidden-hint-rate"])
def test_rates_outside_zero_to_one_are_refused_before_anything_runs(flag: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    module = load_script()
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args([flag, "1.5"])
    assert exit_info.value.code == 2 and f"{flag}: must lie in [0, 1], got 1.5" in capsys.readouterr().err
    assert module.parse_args([flag, "0.5"]).__dict__[flag[2:].replace("-", "_")] == 0.5
