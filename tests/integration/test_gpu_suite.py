"""Smoke test of benchmarks/gpu_suite.py: its CPU run (tiny models) writes every row of the
issue-21 table, with numbers that agree with each other, and the table rebuilds from its raw rows."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_suite.py"


def _load_suite() -> Any:
    """The script as a module (registered first: its dataclasses look their module up)."""
    if "gpu_suite" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_suite"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_suite"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict, str]:
    """One CPU run of the whole suite (about 25 s on one core): the module, raw result, table."""
    from concept_attention.training.objective import TrainingObjective

    module = _load_suite()
    out = tmp_path_factory.mktemp("gpu_suite")
    patched = (torch.Tensor.backward, TrainingObjective._map_losses)  # what the split times
    assert module.main(["--device", "cpu", "--threads", "1", "--out", str(out)]) == 0
    assert (torch.Tensor.backward, TrainingObjective._map_losses) == patched  # left as found
    return module, json.loads((out / "gpu_suite.json").read_text()), (out / "gpu_suite.md").read_text()


def _rows(result: dict, prefix: str) -> list[dict]:
    return [row for row in result["rows"] if row["figure"].startswith(prefix)]


def _one(result: dict, prefix: str) -> dict:
    found = _rows(result, prefix)
    assert len(found) == 1, (prefix, [row["figure"] for row in result["rows"]])
    return found[0]


def test_every_figure_of_the_issue_has_one_finite_row(suite):
    module, result, _ = suite
    expected = []
    for name in module.ARCHS.values():
        expected += [f"{name} training: wall time", f"{name} training: steps per second",
                     f"{name} training: peak memory"]
        expected += [f"{name} step split: {part}" for part in module.SPLIT]
    expected += ["sampling: stock KSampler"] + [f"sampling: {v} / stock" for v in module.SAMPLING_VARIANTS]
    assert len(result["rows"]) == len(expected)
    for prefix in expected:
        row = _one(result, prefix)
        assert row["value"] is not None and math.isfinite(row["value"]) and row["value"] >= 0, row
    for key in ("command", "device", "torch", "ComfyUI"):
        assert result["header"][key]
    assert result["header"]["ComfyUI"] != "unknown"
    assert "TINY" in result["header"]["models"] and result["full"] is False


def test_training_figures_agree_with_each_other(suite):
    module, result, _ = suite
    scale = module.TINY
    for arch, name in module.ARCHS.items():
        wall = _one(result, f"{name} training: wall time")
        rate = _one(result, f"{name} training: steps per second")["value"]
        # The steady rate excludes the warm-up steps; the wall covers at least the others.
        assert wall["value"] >= (scale.steps - scale.warmup) / rate * 0.999
        measured = re.search(r"(\d+) of (\d+) steps measured in ([\d.]+) s", wall["note"])
        if scale.max_steps[arch] < scale.steps:  # bounded: the rest is extrapolated, and it says so
            assert measured and int(measured[1]) == scale.max_steps[arch] and int(measured[2]) == scale.steps
            assert wall["value"] > float(measured[3])
        else:
            assert measured is None and wall["note"].startswith("measured")
        split = {part: _one(result, f"{name} step split: {part}") for part in module.SPLIT}
        for part in module.SPLIT[:4]:  # UNet forward, backward, calibration, optimizer
            assert split[part]["value"] > 0, part
        # Every part is a share of the same timed step, and with the rest they make it up.
        steps_ms = {float(re.search(r"of a (\d+) ms step", row["note"])[1]) for row in split.values()}
        assert len(steps_ms) == 1
        step_ms = steps_ms.pop()
        parts_ms = sum(split[part]["value"] for part in module.SPLIT[:4])
        assert sum(row["value"] for row in split.values()) == pytest.approx(max(step_ms, parts_ms), abs=0.6)
        assert 0.25 < step_ms / (1e3 / rate) < 4  # the timed step is one of the run's steps


def test_sampling_ratios_are_sane_and_the_recorders_change_nothing(suite):
    module, result, _ = suite
    stock = _one(result, "sampling: stock KSampler")
    assert 0 < stock["value"] < 60
    for variant in module.SAMPLING_VARIANTS:
        row = _one(result, f"sampling: {variant} / stock")
        assert 0.2 < row["value"] < 20, row
        median = float(re.search(r"median ([\d.]+) s", row["note"])[1])
        assert median / stock["value"] == pytest.approx(row["value"], rel=0.01, abs=0.002)
        identical = "latent identical to stock" in row["note"]
        assert identical == (variant in ("chain-idle", "recorder-l/4", "recorder-all")), row


def test_the_table_rebuilds_from_the_raw_rows_and_judges_no_tiny_target(suite):
    module, result, table = suite
    assert module.render(result) == table
    lines = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert len(lines) == len(result["rows"])
    targeted = [line for line in lines if "<= " in line]
    assert len(targeted) == 2 + len(module.SAMPLING_TARGETS)  # wall time per model, the ratios (no GPU peak)
    assert all("n/a (tiny models)" in line for line in targeted)
    assert not re.search(r"\| (yes|NO) \|", table)


def test_full_size_rows_are_judged_against_their_targets():
    module = _load_suite()
    rows = [dict(figure="SD1.5 training: wall time", value=61.0, unit="s", target=60.0, note=""),
            dict(figure="SD1.5 training: peak memory", value=11.9, unit="GB", target=12.0, note=""),
            dict(figure="sampling: regional / stock", value=1.1, unit="x", target=1.10, note=""),
            dict(figure="SDXL training", value=None, unit="", target=None, note="failed: boom")]
    table = module.render({"header": {"device": "GPU"}, "full": True, "rows": rows})
    met = [line.split(" | ")[3] for line in table.splitlines() if line.startswith("| S") or line.startswith("| s")]
    assert met == ["NO", "yes", "yes", ""]
    assert "| SDXL training | n/a |" in table and "failed: boom" in table


def test_the_shell_entry_parses_and_names_its_verbs():
    import subprocess

    scripts = SCRIPT.parents[1] / "scripts"
    for name in ("gpu_suite.sh", "gpu_carry.sh", "gpu_pretrain_smallworld.sh"):
        assert subprocess.run(["bash", "-n", str(scripts / name)]).returncode == 0, name
    usage = subprocess.run(["bash", str(scripts / "gpu_suite.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "prepare | run" in usage.stderr
