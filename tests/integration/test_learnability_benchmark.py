"""benchmarks/learnability_smallworld.py: its raw rows give back the rates the gate is judged on."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from smallworld_lab.learnability import LearnedSample
from support import toy_bases

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "learnability_smallworld.py"


def load_benchmark() -> Any:
    """The benchmark script as a module (it is not a package)."""
    spec = importlib.util.spec_from_file_location("learnability_smallworld", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rates_from_raw_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [LearnedSample(0, 0, 1, True, True, True, True, True, 1),     # learned, fully
            LearnedSample(1, 0, 1, True, True, True, False, True, 1),    # colour only
            LearnedSample(2, 0, 1, True, False, False, False, True, 2),  # pattern unreadable: colour counts only
            LearnedSample(0, 1, 1, True, True, False, False, True, 1)]   # a second object: not in the gate
    raw = tmp_path / "rows.json"
    raw.write_text(json.dumps({"rows": [dataclasses.asdict(r) for r in rows]}))
    module = load_benchmark()
    assert module.main(["--from-raw", str(raw), "--device", "cpu"]) == 0
    gate, every = capsys.readouterr().out.splitlines()[-2:]
    assert "'colour': 0.666" in gate and "'colour_pattern': 0.5" in gate and gate.endswith(
        "FAIL (colour >= 0.8, colour+pattern >= 0.7)")
    assert "'colour': 0.5," in every and "'colour_samples': 4" in every


def test_a_recipe_candidate_is_named_by_settings_fields(caplog: pytest.LogCaptureFixture) -> None:
    """--set takes ExperimentSettings fields only, typed; a bad one stops before any training."""
    module = load_benchmark()
    refused = {("--set", "steps=many"): "steps takes a whole number",
               ("--sample-seeds", "0"): "--sample-seeds must be at least 1",
               ("--train-seed", "-1"): "--train-seed must be a whole number of at least 0, got -1",
               ("--from-raw", "x.json", "--train-seed", "0"): "--train-seed choose what a run trains and samples",
               ("--set", "seed=3"): "cannot be set by a study; tunable: steps, learning_rate",
               ("--scenes", "6", "--scene-ids", "2,6"): "--scene-ids '2,6': each index once, from 0 to 5 (--scenes 6; "
                                                          "raise --scenes",
               ("--scene-ids", "1,1"): "--scene-ids '1,1': each index once",
               ("--scene-ids", "two"): "write whole numbers separated by commas",
               ("--from-raw", "x.json", "--freeze", "kv"): "--freeze choose what a run trains and samples; --from-raw "
                                                           "only prints saved rows"}
    for argv, message in refused.items():
        caplog.clear()
        assert module.main([*argv, "--device", "cpu"]) == 2, argv
        assert message in caplog.text, argv


def test_a_probe_run_records_its_scenes_and_what_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--scene-ids, --freeze and --train-seed reach each scene's run; the raw file keeps them, the scene indices and the digests."""
    from smallworld_lab import learnability
    from concept_attention.smallworld import model as toy

    calls = []

    def learn_scene(bundle, scene_id, scene, settings, what_trains):
        calls.append((scene_id, scene.objects, dict(what_trains), settings.seed))
        return [LearnedSample(scene_id, 0, 11, True, True, True, False, True, 1)]

    order, digests = [], toy.weights_sha256()
    monkeypatch.setattr(toy, "load_bundle", lambda weights: order.append("load") or "bundle")
    monkeypatch.setattr(toy, "weights_sha256", lambda weights=None: order.append("digest") or digests)
    monkeypatch.setattr(learnability, "learn_scene", learn_scene)
    module = load_benchmark()
    raw = tmp_path / "raw.json"
    argv = ["--scenes", "6", "--scene-ids", "5,3", "--freeze", "embeddings", "--train-seed", "1", "--raw", str(raw),
            "--device", "cpu"]
    assert module.main(argv) == 0
    scenes = learnability.dev_scenes(6)
    frozen = {"train_embeddings": False}
    assert calls == [(5, scenes[5].objects, frozen, 1), (3, scenes[3].objects, frozen, 1)]
    payload = json.loads(raw.read_text())
    assert payload["scene_ids"] == [5, 3] and payload["what_trains"] == frozen and payload["settings"]["seed"] == 1
    assert payload["unet_sha256"] == digests["unet"] and order == ["digest", "load"]  # the files the run loaded
    assert [row["scene"] for row in payload["rows"]] == [5, 3]


DOCS = Path(__file__).resolve().parents[2] / "docs"


def rate_pair(rates: dict) -> str:
    """'67 % / 60 %': colour / colour+pattern as the docs print them."""
    return f"{rates['colour']:.0%} / {rates['colour_pattern']:.0%}".replace("%", " %")


def gained_lost(before: dict, after: dict, key: str, first_only: bool) -> tuple[int, int]:
    """Samples (keyed by scene, object, seed) that ``after`` gets right and ``before`` not, and the reverse;
    ``key`` "colour" or "pattern" (colour and pattern), counted where the round trip reads it."""
    keys = [k for k in before if (k[1] == 0 or not first_only) and before[k][f"roundtrip_{key}"]]
    return (sum(after[k][key] and not before[k][key] for k in keys),
            sum(before[k][key] and not after[k][key] for k in keys))


def by_sample(payload: dict) -> dict:
    """A raw file's rows keyed by (scene, object, sample seed)."""
    return {(r["scene"], r["obj"], r["seed"]): r for r in payload["rows"]}


# docs/toy_world.md "The main run to step 20 000": row label -> (localisation raw rows, learnability raw rows)
MAIN_RUN_ROWS = {"first model": ("base_v1.json", "learn_v1.json"),
                 "step 6 000": ("base_v2_cpu6000.json", "learn_v2_cpu6000.json"),
                 "step 9 000": ("base_v2_cpu9000.json", "learn_v2_cpu9000.json"),
                 "step 14 000": ("base_v2_cpu14000.json", "learn_v2_cpu14000.json"),
                 "step 15 783 (the stop on the way)": ("base_v2_cpu15783.json", "learn_v2_cpu15783.json"),
                 "step 20 000": ("base_v2_cpu20000.json", "learn_v2_cpu20000.json"),
                 "step 23 612 (stopped at a session's end)": ("base_v2_cpu23612.json", "learn_v2_cpu23612.json"),
                 "step 26 000 (shipped until 2026-12-05)": ("base_v2_cpu26000.json", "learn_v2_cpu26000.json"),
                 "step 26 000, triggers at the mean row (the toy recipe's start since 2026-12-05)": (
                     "base_v2_cpu26000.json", "learn_v2_cpu26000_init_mean.json"),
                 "step 29 693": ("base_v2_cpu29693.json", "learn_v2_cpu29693.json"),
                 "step 29 000, twin scenes (from step 26 000, not shipped)": ("base_v2_twin29000.json",
                                                                             "learn_v2_twin29000.json"),
                 "step 31 450, twice the twins (from step 29 000, not shipped)": ("base_v2_twin31450.json",
                                                                                 "learn_v2_twin31450.json"),
                 "step 31 836, twins and hidden-word hints (from step 26 000; shipped since 2026-12-05)": (
                     "base_v2_hint31836.json", "learn_v2_hint31836.json"),
                 "step 31 836, triggers at the mean row": ("base_v2_hint31836.json", "learn_v2_hint31836_init_mean.json")}


def test_main_run_table_is_what_its_raw_rows_give() -> None:
    """The v2 status table in docs/toy_world.md: gates and learnability rebuilt from committed rows."""
    from smallworld_lab import learnability
    from smallworld_lab import localisation as loc
    from concept_attention.smallworld import model as toy

    text = (DOCS / "toy_world.md").read_text()
    table = text[text.index("### The main run to step 20 000"):]
    for label, (loc_file, learn_file) in MAIN_RUN_ROWS.items():
        cells = [c.strip() for c in next(line for line in table.splitlines()
                                         if line.startswith(f"| {label} |")).strip("|").split("|")]
        report = loc.LocalisationReport.from_json((DOCS / "localisation_raw" / loc_file).read_text())
        gates = report.gates(toy.CALIBRATION_LAYERS)
        assert cells[1:5] == [f"{gates['soft_low'][0]:.2f}", f"{gates['soft_uniform'][0]:.2f}",
                              f"{gates['thresholded_objects'][0]:.0%}".replace("%", " %"),
                              f"{gates['argmax'][0]:.0%}".replace("%", " %")], label
        payload = json.loads((DOCS / "learnability_raw" / learn_file).read_text())
        start = payload.get("settings", {}).get("init", "rare")  # the files before 2026-12-05 name none or "rare"
        assert start == ("mean" if "mean row" in label else "rare"), label
        rows = [learnability.LearnedSample(**r) for r in payload["rows"]]
        rates = learnability.rates(rows)
        assert cells[7] == (rate_pair(rates)
                            + f" ({rates['colour_samples']} / {rates['colour_pattern_samples']})"), label


# docs/toy_world.md "Where the step-9 000 model misses": row label -> learnability raw rows
RECIPE_ROWS = {"default (200 steps, lr 5e-4)": "learn_v2_cpu9000_6x8.json",
               "400 steps, lr 1e-3": "learn_v2_cpu9000_6x8_s400_lr1e3.json",
               "400 steps, lr 1e-3, step-14 000 model": "learn_v2_cpu14000_6x8_s400_lr1e3.json",
               "400 steps, lr 1e-3, plain eps loss, step-14 000 model": "learn_v2_cpu14000_6x8_s400_lr1e3_eps.json",
               "400 steps, lr 1e-3, step-15 783 model": "learn_v2_cpu15783_6x8_s400_lr1e3.json",
               "400 steps, lr 1e-3, step-20 000 model": "learn_v2_cpu20000_6x8_s400_lr1e3.json",
               "default (200 steps, lr 5e-4), step-26 000 model (shipped then)": "learn_v2_cpu26000_6x8.json",
               "default (200 steps, lr 5e-4), step-29 693 model": "learn_v2_cpu29693_6x8.json",
               "default (200 steps, lr 5e-4), twin-scene step-29 000 model": "learn_v2_twin29000_6x8.json",
               "default (200 steps, lr 5e-4), twins-and-hints step-31 836 model": "learn_v2_hint31836_6x8.json"}


def table_cells(section: str, label: str) -> list[str]:
    """The cells after the label of the row that ``label`` starts, in the section of docs/toy_world.md so titled."""
    text = (DOCS / "toy_world.md").read_text()
    table = text[text.index(section):]
    line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip().strip("|").split("|")][1:]


def recipe_cells(payload: dict) -> list[str]:
    """A recipe row from its raw rows: first objects, every hidden object, then colour/colour+pattern per scene."""
    from smallworld_lab import learnability

    def pct(value: float, count: int) -> str:
        return f"{value:.0%} ({count})".replace("%", " %")

    rows = [learnability.LearnedSample(**r) for r in payload["rows"]]
    first, every = learnability.rates(rows), learnability.rates(rows, first_only=False)
    firsts = [r for r in rows if r.obj == 0]
    per_scene = ", ".join(f"{sum(r.colour for r in firsts if r.scene == s and r.roundtrip_colour)}/"
                          f"{sum(r.pattern for r in firsts if r.scene == s and r.roundtrip_pattern)}"
                          for s in sorted({r.scene for r in rows}))
    return [pct(first["colour"], first["colour_samples"]),
            pct(first["colour_pattern"], first["colour_pattern_samples"]),
            pct(every["colour"], every["colour_samples"]),
            pct(every["colour_pattern"], every["colour_pattern_samples"]), per_scene]


def test_recipe_table_is_what_its_raw_rows_give() -> None:
    """The learnability recipe table: first objects, every hidden object and per scene, from the rows."""
    for label, name in RECIPE_ROWS.items():
        payload = json.loads((DOCS / "learnability_raw" / name).read_text())
        assert table_cells("### Where the step-9 000 model misses", label) == recipe_cells(payload), label
        assert payload["scenes"] == 6 and len(payload["settings"]["sample_seeds"]) == 8


# docs/toy_world.md "Recipes on the four dev scenes": row label -> (raw rows, --set overrides, what --freeze kept)
HARD_SCENE_ROWS = {
    "the default (200 steps, lr 5e-4, cfg 5)": ("hard4_default", {}, {}),
    "triggers start from the class word": ("hard4_class", {"init": "class"}, {}),
    "100 steps": ("hard4_s100", {"steps": 100}, {}),
    "400 steps": ("hard4_s400", {"steps": 400}, {}),
    "lr 2e-3": ("hard4_lr2e3", {"learning_rate": 2e-3}, {}),
    "effective batch 8 (accumulation 4)": ("hard4_ga4", {"grad_accumulation": 4}, {}),
    "sampled at cfg 3": ("hard4_cfg3", {"cfg": 3.0}, {}),
    "sampled with 40 steps": ("hard4_ss40", {"sample_steps": 40}, {}),
    "embeddings only (K/V frozen), lr 5e-3": ("hard4_freeze_kv", {"learning_rate": 5e-3}, {"train_kv": False}),
    "K/V only (embeddings frozen)": ("hard4_freeze_embeddings", {}, {"train_embeddings": False})}


def test_hard_scene_recipe_table_is_what_its_raw_rows_give() -> None:
    """The shipped base's recipe table on dev scenes 2-5: each row from its rows, run with the overrides it names
    on the recipe of the time (triggers at the rare rows)."""
    for label, (name, overrides, frozen) in HARD_SCENE_ROWS.items():
        payload = json.loads((DOCS / "learnability_raw" / f"learn_v2_cpu26000_{name}.json").read_text())
        assert table_cells("#### Recipes on the four dev scenes", label) == recipe_cells(payload), label
        assert payload["overrides"] == overrides and payload.get("what_trains", {}) == frozen, label
        assert payload["settings"]["init"] == overrides.get("init", "rare"), label  # the default of the time
        assert payload["scene_ids"] == [2, 3, 4, 5] and len(payload["settings"]["sample_seeds"]) == 8


def test_colour_misses_say_what_the_first_objects_were_drawn_with() -> None:
    """Only first objects whose colour was missed (and readable after the round trip) count; rows name the scene."""
    from smallworld_lab import learnability

    def obj(colour: str, pattern: str) -> SimpleNamespace:
        return SimpleNamespace(colour=colour, pattern=pattern)

    scenes = [SimpleNamespace(objects=[obj("purple", "stripes"), obj("yellow", "solid")]),
              SimpleNamespace(objects=[obj("green", "checks")])]
    rows = [LearnedSample(0, 0, 1, True, True, False, False, True, 1, "cyan", "stripes"),    # pattern kept
            LearnedSample(0, 0, 2, True, True, False, False, True, 1, "yellow", "dots"),     # the other object's
            LearnedSample(0, 0, 4, True, True, False, False, True, 1, "yellow", "stripes"),  # both
            LearnedSample(1, 0, 1, True, True, False, False, True, 1, "cyan", "checks"),     # pattern kept
            LearnedSample(1, 0, 2, True, True, True, True, True, 1, "green", "checks"),      # learned: no miss
            LearnedSample(1, 0, 3, False, False, False, False, True, 1, "red", "checks"),    # round trip lost it
            LearnedSample(0, 1, 1, True, True, False, False, True, 1, "red", "solid"),       # a second object
            LearnedSample(0, 0, 3, True, True, False, False, False, 0)]                      # nothing matched
    assert learnability.colour_misses(rows, scenes) == {
        "misses": 4, "unmatched": 1, "pattern_kept": 3, "another_object_colour": 2,
        "drawn_colours": {"cyan": 2, "yellow": 2}}
    assert list(learnability.colour_misses(rows, scenes)["drawn_colours"]) == ["cyan", "yellow"]  # ties by name


def test_saved_rows_that_keep_what_was_drawn_print_the_misses(capsys: pytest.CaptureFixture[str]) -> None:
    """--from-raw on the default recipe's rows of dev scenes 2-5 prints the colour misses from the file's scenes."""
    module = load_benchmark()
    raw = DOCS / "learnability_raw" / "learn_v2_cpu26000_hard4_default.json"
    assert module.main(["--from-raw", str(raw), "--device", "cpu"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == ("first objects' colour misses, as drawn: {'misses': 19, 'unmatched': 0, 'pattern_kept': 11, "
                    "'another_object_colour': 6, 'drawn_colours': {'blue': 5, 'cyan': 5, 'green': 4, 'yellow': 4, "
                    "'purple': 1}}")


def test_the_default_rows_misses_are_what_the_docs_say() -> None:
    """toy_world.md's account of the default recipe's colour misses on dev scenes 2-5 comes from its raw rows."""
    from smallworld_lab import learnability

    payload = json.loads((DOCS / "learnability_raw" / "learn_v2_cpu26000_hard4_default.json").read_text())
    rows = [LearnedSample(**r) for r in payload["rows"]]
    misses = learnability.colour_misses(rows, learnability.dev_scenes(payload["scenes"]))
    drawn = ", ".join(f"{colour} {count}" for colour, count in misses["drawn_colours"].items())
    sentence = (f"of its {misses['misses']} first-object colour misses, {misses['pattern_kept']} keep the trained "
                f"pattern and {misses['another_object_colour']} take the colour of another object of the scene; "
                f"drawn instead: {drawn} (")
    text = " ".join((DOCS / "toy_world.md").read_text().split())
    assert misses["misses"] == 19 and sentence in text


STEP_26000_UNET_SHA256, STEP_31836_UNET_SHA256 = toy_bases.STEP_26000["unet"], toy_bases.STEP_31836["unet"]

# docs/toy_world.md "Where a learned colour comes from": row label -> (the gate's 12, 6 x 8, where triggers
# start, the UNet they ran on; None: files older than the digests)
START_ROWS = {"step 26 000, triggers at the rare rows (the default until 2026-12-05)": (
                  "learn_v2_cpu26000.json", "learn_v2_cpu26000_6x8.json", "rare", None),
              "step 26 000, triggers at the mean row (the default since)": (
                  "learn_v2_cpu26000_init_mean.json", "learn_v2_cpu26000_init_mean_6x8.json", "mean",
                  STEP_26000_UNET_SHA256),
              "step 31 836 (shipped since 2026-12-05), triggers at the mean row": (
                  "learn_v2_hint31836_init_mean.json", "learn_v2_hint31836_init_mean_6x8.json", "mean",
                  STEP_31836_UNET_SHA256)}


def test_trigger_start_table_and_paired_counts_are_what_the_raw_rows_give() -> None:
    """The two starts: the gate's 12, the 6 x 8 rows, and the paired gains and losses the text states (step 26 000)."""
    from smallworld_lab import learnability
    from concept_attention.smallworld import model as toy

    payloads = {}
    for label, (gate_file, wide_file, init, unet) in START_ROWS.items():
        gate, wide = (json.loads((DOCS / "learnability_raw" / name).read_text()) for name in (gate_file, wide_file))
        assert gate["settings"]["init"] == wide["settings"]["init"] == init, label
        assert wide["scenes"] == 6 and len(wide["settings"]["sample_seeds"]) == 8
        assert gate.get("unet_sha256") == wide.get("unet_sha256") == unet, label

        wide_rows = [LearnedSample(**r) for r in wide["rows"]]
        first, every = learnability.rates(wide_rows), learnability.rates(wide_rows, first_only=False)
        rates = learnability.rates([LearnedSample(**r) for r in gate["rows"]])
        expected = [rate_pair(rates), f"{rate_pair(first)} ({first['colour_samples']})",
                    f"{rate_pair(every)} ({every['colour_samples']})", recipe_cells(wide)[4]]
        assert table_cells("#### Where a learned colour comes from", label) == expected, label
        if unet != STEP_31836_UNET_SHA256:
            payloads[init] = by_sample(wide)
        else:
            assert unet == toy.weights_sha256()["unet"]
            assert rates["colour"] >= learnability.COLOUR_GATE and rates["colour_pattern"] >= learnability.COLOUR_PATTERN_GATE

    text = " ".join((DOCS / "toy_world.md").read_text().split())
    (cg, cl), (pg, pl), (ag, al), (acg, acl) = (gained_lost(payloads["rare"], payloads["mean"], key, first_only)
                                                 for key, first_only in (("colour", True), ("pattern", True),
                                                                         ("pattern", False), ("colour", False)))
    assert (f"first objects' colour {cg} gained, {cl} lost; colour+pattern {pg} gained, {pl} lost; every hidden "
            f"object's colour+pattern {ag} gained, {al} lost (a sign test gives p ≈ 0.04), its colour {acg} gained, "
            f"{acl} lost (no change)") in text


def test_the_second_training_seed_sentence_is_what_its_raw_rows_give() -> None:
    """toy_world.md's training-seed-1 replicate of the two starts: rates, paired counts and cyan misses from the rows."""
    from smallworld_lab import learnability

    def load(name: str) -> dict:
        payload = json.loads((DOCS / "learnability_raw" / name).read_text())
        assert payload["settings"]["seed"] == 1 and payload["scenes"] == 6 and payload["unet_sha256"] == STEP_26000_UNET_SHA256
        return payload

    rare, mean = load("learn_v2_cpu26000_6x8_seed1.json"), load("learn_v2_cpu26000_init_mean_6x8_seed1.json")
    assert (rare["settings"]["init"], mean["settings"]["init"]) == ("rare", "mean")

    def paired(key: str, first_only: bool) -> str:
        return "{} gained, {} lost".format(*gained_lost(by_sample(rare), by_sample(mean), key, first_only))

    def first(payload: dict) -> str:
        return rate_pair(learnability.rates([LearnedSample(**r) for r in payload["rows"]]))

    def cyan(payload: dict) -> str:
        misses = learnability.colour_misses([LearnedSample(**r) for r in payload["rows"]], learnability.dev_scenes(6))
        return f"{misses['drawn_colours'].get('cyan', 0)} of {misses['misses']}"

    text = " ".join((DOCS / "toy_world.md").read_text().split())
    assert (f"first objects {first(rare)} with the rare rows, {first(mean)} with the mean row (48); paired, first "
            f"objects' colour {paired('colour', True)}; colour+pattern {paired('pattern', True)}; every hidden "
            f"object's colour+pattern {paired('pattern', False)}. With the rare rows {cyan(rare)} drawn first-object colour "
            f"misses are cyan, with the mean row {cyan(mean)}.") in text
