"""The toy-world experiment's plumbing on a random toy model (numbers come from the shipped one)."""
from __future__ import annotations

import re

import pytest
import torch

from smallworld_lab import fresh
from smallworld_lab import composition
from smallworld_lab import experiment as exp
from concept_attention.smallworld import model as toy
from concept_attention.smallworld import scenes as sw
from support import toy_bases

TINY = exp.ExperimentSettings(steps=2, micro_batch=1, grad_accumulation=1, sample_seeds=(1,),
                              sample_steps=2, iou_steps=2)


@pytest.fixture(scope="module")
def random_toy():
    return fresh.random_bundle(1)


def test_token_bank_variant_trains_banks_and_samples_with_them(random_toy):
    scene = sw.reference_scenes(1)[0]
    result = exp.train_variant(random_toy, scene, "DisenDiff + token bank", TINY)
    banks = [c.bank for c in result.concepts.concepts]
    assert all(b is not None and b.shape == (16, 64) for b in banks)
    plain = exp.train_variant(random_toy, scene, "DisenDiff", TINY)
    assert all(c.bank is None for c in plain.concepts.concepts)
    metrics, images = exp.generation_metrics(random_toy, scene, result.concepts, TINY)
    per_seed = metrics.pop("per_seed")
    assert {"fidelity_cp_single", "fidelity_cp_combined", "not_drawn_single", "not_drawn_combined",
            "extra_rate_single", "extra_rate_combined", "shape_right_single", "text_alignment"} <= set(metrics)
    assert set(metrics) <= set(per_seed) and all(len(v) == len(TINY.sample_seeds) for v in per_seed.values())
    assert len(per_seed["not_drawn_single"][0]) == len(scene.objects)  # one per concept alone
    assert len(per_seed["extra_rate_combined"][0]) == 1  # one combined picture per seed
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert len(images) == 2 * len(scene.objects) + 1
    maps = exp.concept_maps(random_toy, scene, result.concepts, TINY)
    assert maps.shape[0] == 2 * len(scene.objects)


def test_bank_changes_samples_only_for_prompts_with_its_trigger(random_toy):
    import torch

    from concept_attention.concepts.apply import apply_concepts
    from concept_attention.sampling.nested_subjects import with_concept_banks

    scene = sw.reference_scenes(1)[0]
    concepts = exp.train_variant(random_toy, scene, "DisenDiff + token bank", TINY).concepts
    model, clip = apply_concepts(random_toy.model, random_toy.clip, concepts)
    with torch.inference_mode():
        without = with_concept_banks(model, clip, "a square on a grey background", concepts)
        with_v1 = with_concept_banks(model, clip, "a V1 square on a grey background", concepts)
    assert "attn2_patch" not in without.model_options.get("transformer_options", {}).get("patches", {})
    patches = with_v1.model_options["transformer_options"]["patches"]["attn2_patch"]
    assert [s.name for s in patches[-1].subjects] == ["V1"]


def test_composition_trains_one_set_per_object_and_scores_every_mode(random_toy):
    from smallworld_lab import composition

    scene = sw.reference_scenes(1)[0]
    sets = composition.train_separately(random_toy, scene, TINY)
    assert [s.triggers for s in sets] == [[f"V{i + 1}"] for i in range(len(scene.objects))]
    assert [s.concepts[0].class_phrase for s in sets] == [o.shape for o in scene.objects]
    results = composition.composition_metrics(random_toy, scene, TINY, sets=sets)
    assert set(results) == set(composition.MODES)
    for values in results.values():
        assert {"fidelity_cp", "shape_right", "not_drawn", "extra_rate", "seeds", "per_seed"} <= set(values)
        assert values["seeds"] == len(TINY.sample_seeds)
        assert all(0.0 <= v <= 1.0 for k, v in values.items() if k not in ("seeds", "per_seed"))
        per_seed = values["per_seed"]["not_drawn"]
        assert len(per_seed) == len(TINY.sample_seeds)
        pooled = [v for image in per_seed for v in image]
        assert len(pooled) == len(scene.objects) * len(TINY.sample_seeds)
        assert sum(pooled) / len(pooled) == pytest.approx(values["not_drawn"])
    caption = exp.caption_for(scene)
    pictures = {mode: composition.sample_mode(random_toy, sets, caption, mode, 1, TINY,
                                              torch.from_numpy(scene.masks.astype("float32")))
                for mode in composition.SAMPLING_MODES}
    assert all(p.shape == (128, 128, 3) for p in pictures.values())
    assert abs(pictures["combined"] - pictures["regional_auto"]).max() > 1e-4  # regions change the picture
    assert abs(pictures["regional_auto"] - pictures["regional_auto_shared"]).max() > 1e-4  # and region texts
    assert abs(pictures["regional_auto"] - pictures["regional_auto_restart"]).max() > 1e-4  # restarting
    only = composition.composition_metrics(random_toy, scene, TINY, sets=sets, modes=("regional_auto_restart",))
    assert list(only) == ["regional_auto_restart"]
    assert only["regional_auto_restart"] == results["regional_auto_restart"]  # seeded: the same numbers


@pytest.mark.parametrize("mode", composition.SAMPLING_MODES)
def test_benchmark_composition_is_the_node_bit_for_bit(random_toy, mode):
    """Each composition row of the benchmark is KSampler with Concepts with the row's inputs."""
    from concept_attention.concepts.apply import apply_concepts
    from concept_attention.nodes.compose import ConceptSampler
    from concept_attention.sampling.ksampler import empty_latent
    from support.synthetic_concepts import synthetic_set

    scene = sw.reference_scenes(1)[0]
    first, second = scene.objects[:2]
    sets = [synthetic_set(random_toy, ["V1"], 1, classes=(first.shape,)),
            synthetic_set(random_toy, ["V2"], 2, classes=(second.shape,))]
    prompt = f"a V1 {first.shape} and a V2 {second.shape} on a grey background"
    masks = torch.from_numpy(scene.masks[:2].astype("float32"))
    benchmark = composition.sample_latent(random_toy, sets, prompt, mode, 3, TINY, masks)

    how = composition.COMPOSITIONS[mode]
    clip = random_toy.clip
    for concepts in sets:
        _, clip = apply_concepts(None, clip, concepts)
    with torch.inference_mode():
        encode = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))  # noqa: E731
        node = ConceptSampler.execute(
            random_toy.model, sets[0], how.mode, how.strength, 3, TINY.sample_steps, TINY.cfg, "euler",
            "normal", encode(prompt), encode(""), empty_latent(toy.IMAGE_SIZE), 1.0, concepts_2=sets[1],
            masks=masks if how.mode == "regional" else None, clip=clip, positive_text=prompt,
            auto_steps=how.auto_steps, region_threshold=how.region_threshold, region_texts=how.region_texts,
            auto_restart=how.auto_restart)
    assert torch.equal(node[0]["samples"], benchmark["samples"])


def test_single_mode_reads_each_concept_from_a_picture_of_it_alone(random_toy, monkeypatch):
    import numpy as np

    scene = sw.reference_scenes(1)[0]
    sets = composition.train_separately(random_toy, scene, TINY)
    calls = []

    def fake_sample(bundle, chosen, prompt, mode, seed, settings, masks=None):
        calls.append(([c.triggers for c in chosen], prompt, mode))
        return np.full((128, 128, 3), 0.5, dtype=np.float32)

    monkeypatch.setattr(composition, "sample_mode", fake_sample)
    results = composition.composition_metrics(random_toy, scene, TINY, sets=sets, modes=("single",))
    assert calls == [([[f"V{i + 1}"]], f"a V{i + 1} {obj.shape} on a grey background", "combined")
                     for i, obj in enumerate(scene.objects)]
    assert results["single"]["fidelity_cp"] == 0.0  # a blank picture shows no object
    assert results["single"]["not_drawn"] == 1.0 and "colour_leak" not in results["single"]  # never leakage


def _benchmark_module():
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "smallworld_disendiff.py"
    sys.path.insert(0, str(script.parent))
    spec = importlib.util.spec_from_file_location("smallworld_disendiff", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_composition_section_has_a_row_per_mode(random_toy):
    from smallworld_lab.report import paired_difference

    module = _benchmark_module()
    scene = sw.reference_scenes(1)[0]
    per_mode = {mode: [{**values, "scene": 0}]
                for mode, values in composition.composition_metrics(random_toy, scene, TINY).items()}
    section = module.v2.composition_section(per_mode, paired_difference)
    named = [line for line in section.splitlines() if line.startswith(("| combined", "| regional", "| single"))]
    rows = [row for row in named if row.split("|")[-2].strip() == f"1 × {len(TINY.sample_seeds)}"]
    assert [row.split("|")[1].strip() for row in rows] == list(composition.MODES)
    fidelity = rows[0].split("|")[2].strip().strip("*")
    assert float(fidelity) == round(per_mode["combined"][0]["fidelity_cp"], 2)
    differences = [row for row in named if row not in rows]  # each mode against combined
    assert [row.split("|")[1].strip() for row in differences] == list(composition.MODES[1:])


def test_sharded_raw_records_merge_in_scene_order(tmp_path):
    module = _benchmark_module()
    shards = [{"rows": {"DisenDiff": [{"scene": s, "fidelity_single": float(s)} for s in scenes]},
               "composition": {"combined": [{"scene": s, "fidelity_combined": 0.5, "leakage_combined": 0.1}
                                            for s in scenes]},
               "minutes": minutes, "machine": "GPU", "settings": "steps=200"}
              for scenes, minutes in (([0, 2], 3.0), ([1, 3], 5.0))]
    paths = []
    for i, shard in enumerate(shards):
        paths.append(tmp_path / f"shard{i}.json")
        module.write_raw(paths[-1], shard)
    merged = module.merge_raw(paths)
    assert [r["scene"] for r in merged["rows"]["DisenDiff"]] == [0, 1, 2, 3]
    assert [r["scene"] for r in merged["composition"]["combined"]] == [0, 1, 2, 3]
    assert merged["minutes"] == 5.0  # side by side: the longest shard
    assert module.v2.scene_means(merged["rows"]["DisenDiff"])["fidelity_single"] == 1.5


def test_report_from_raw_files_lists_composition_modes_in_table_order(tmp_path):
    module = _benchmark_module()
    row = {"scene": 0, "fidelity_combined": 0.5, "leakage_combined": 0.1, "seeds": 16}
    paths = [tmp_path / "floor.json", tmp_path / "modes.json"]
    module.write_raw(paths[0], {"rows": {"DisenDiff": [{"scene": 0, "fidelity_single": 1.0}]},
                                "composition": {"single": [row]}, "minutes": 1.0, "machine": "CPU",
                                "settings": "steps=200"})
    module.write_raw(paths[1], {"rows": {}, "composition": {"regional_auto_restart": [row], "combined": [row]},
                                "minutes": 1.0, "machine": "CPU", "settings": "steps=200"})
    out = tmp_path / "results.md"
    assert module.main(["--from-raw", *map(str, paths), "--out", str(out), "--chart", str(tmp_path / "c.png")]) == 0
    names = [line.split("|")[1].strip() for line in out.read_text().splitlines()
             if line.startswith(("| combined", "| regional", "| single"))]
    assert names == ["combined", "regional_auto_restart", "single"]
    assert "(1 reference scenes)" in out.read_text()
    module.write_raw(paths[1], {"rows": {}, "composition": {"combined": [{**row, "scene": 1}]},
                                "minutes": 1.0, "machine": "CPU", "settings": "steps=200"})
    module.main(["--from-raw", *map(str, paths), "--out", str(out), "--chart", str(tmp_path / "c.png")])
    assert "(1 reference scenes, 2 in the composition table)" in out.read_text()


@pytest.mark.parametrize("report, raw_glob", [("results.md", "verdict_raw/shipped_v2_*.json"),
                                               ("results_v1.md", "results_raw/*.json"),
                                               ("verdict_dev.md", "verdict_raw/dev_*.json")])
def test_committed_results_are_what_the_committed_raw_rows_give(tmp_path, report, raw_glob):
    """docs/results.md (and the earlier reports) are rebuilt from their raw rows, never edited by hand."""
    from pathlib import Path

    module = _benchmark_module()
    docs = Path(__file__).resolve().parents[2] / "docs"
    raw_files = sorted(str(p) for p in docs.glob(raw_glob))
    assert raw_files, f"docs/{raw_glob} holds no raw file"
    out = tmp_path / report
    module.main(["--from-raw", *raw_files, "--out", str(out), "--chart", str(tmp_path / "chart.png")])
    committed = (docs / report).read_text().split("\nSettings:", 1)[1]
    assert out.read_text().split("\nSettings:", 1)[1] == committed.replace(Path(report).stem + ".png", "chart.png")


def test_heldout_rows_cover_the_frozen_protocol_with_the_committed_file_and_the_step_26000_weights():
    """docs/results.md's held-out rows: the frozen file as committed, the step-26 000 UNet, every run of the
    frozen protocol exactly once, with its settings and sample seeds; the composition table too (every
    mode of every scene once, the first training seed)."""
    import collections
    import json
    from pathlib import Path

    from smallworld_lab import composition, study

    docs = Path(__file__).resolve().parents[2] / "docs"
    raws = [json.loads(p.read_text()) for p in sorted(docs.glob("verdict_raw/shipped_v2_heldout_*.json"))]
    assert raws, "docs/verdict_raw holds no held-out file"
    overrides, protocol, frozen = study.frozen_protocol()
    settings = str(study.settings_with(overrides, protocol.sample_seeds))
    verdict_base = toy_bases.STEP_26000  # the base the held-out rows ran on (shipped until 2026-12-05)
    compared = ("DisenDiff", "Custom Diffusion")
    runs = collections.Counter()
    for raw in raws:
        assert raw["split"] == "heldout"
        assert raw["frozen_settings_sha256"] == frozen, "docs/verdict_settings.json changed after the held-out run"
        assert raw["overrides"] == overrides and raw["settings"] == settings
        ran_on = {key: raw.get(f"{key}_sha256", digest) for key, digest in verdict_base.items()}  # older files: UNet only
        assert "unet_sha256" in raw and ran_on == verdict_base, (
            "the held-out rows are not of the base this test pins: pin the base they ran on here and say so in "
            "toy_world.md")
        for variant in compared:
            for row in raw["rows"].get(variant, []):
                assert len(row["per_seed"]["fidelity_cp_single"]) == protocol.sample_seeds
                runs[(variant, row["scene"], row["train_seed"])] += 1
        for mode, rows in raw["composition"].items():
            for row in rows:
                assert len(row["per_seed"]["fidelity_cp"]) == protocol.sample_seeds == row["seeds"]
                runs[(mode, row["scene"], row["train_seed"])] += 1
    expected = {(v, s, t) for v in compared for s in range(protocol.scenes) for t in protocol.train_seeds}
    expected |= {(m, s, protocol.train_seeds[0]) for m in composition.MODES for s in range(protocol.scenes)}
    assert set(runs) == expected and set(runs.values()) == {1}


def test_calibration_window_tables_are_what_their_raw_rows_give():
    """docs/toy_world.md "Calibration only at low noise": means and paired differences from the raw rows."""
    import json
    from pathlib import Path

    from smallworld_lab import report
    from smallworld_lab import results_v2 as rv

    docs = Path(__file__).resolve().parents[2] / "docs"
    raw = json.loads((docs / "verdict_raw" / "dev_cpu9000_s400_lr1e3_latent1.json").read_text())
    window = json.loads((docs / "verdict_raw" / "window05_dev_cpu9000_s400_lr1e3_latent1.json").read_text())
    assert window["overrides"] == {**raw["overrides"], "calibration_max_t": 0.5}  # the one change
    assert list(window["rows"]) == ["DisenDiff"]
    full = raw["rows"]
    rows = {"DisenDiff, t ≤ 0.5": window["rows"]["DisenDiff"], "DisenDiff": full["DisenDiff"],
            "Custom Diffusion": full["Custom Diffusion"]}
    keys = [c for c in rv.ATTENTION + rv.LEAKAGE + rv.PICTURES if c[0] in dict(rv.CHART)]
    text = (docs / "toy_world.md").read_text()
    section = text[text.index("#### Calibration only at low noise"):text.index("## Results")]
    means = rv.table({name: rv.scene_means(r) for name, r in rows.items()}, keys)
    differences = rv.differences(rows, "DisenDiff, t ≤ 0.5", keys, report.paired_difference, "metric", True)
    assert means.count("\n") == 4 and means in section
    assert differences.count("\n") == len(keys) + 1 and differences in section


def test_merging_refuses_other_settings_and_repeated_scenes(tmp_path):
    module = _benchmark_module()
    base = {"rows": {"DisenDiff": [{"scene": 0, "fidelity_single": 1.0}]}, "composition": {},
            "minutes": 1.0, "machine": "CPU", "settings": "steps=200"}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    module.write_raw(paths[0], base)
    module.write_raw(paths[1], {**base, "settings": "steps=100",
                                "rows": {"DisenDiff": [{"scene": 1, "fidelity_single": 0.0}]}})
    with pytest.raises(SystemExit, match="other settings"):
        module.merge_raw(paths)
    module.write_raw(paths[1], base)
    with pytest.raises(SystemExit, match="repeats 'DisenDiff' on scene"):
        module.merge_raw(paths)


def test_targets_table_compares_disendiff_with_the_targets_and_the_baseline():
    module = _benchmark_module()
    summary = {"DisenDiff": {"iou_trigger_own": 0.6, "iou_trigger_other": 0.2, "leakage_combined": 0.05},
               "Custom Diffusion": {"leakage_combined": 0.2}}
    table = module.v1.targets_table(summary)
    assert "| trigger IoU own ↑ >= 0.5 | 0.60 | yes |" in table
    assert "| trigger IoU other ↓ <= 0.1 | 0.20 | no |" in table
    assert "half of Custom Diffusion's (0.20) | 0.05 | yes |" in table


def _v2_row(scene: int, leak: list[list[float]], share: float) -> dict:
    per_seed = {"colour_leak_combined": leak, "colour_leak_chance_combined": [[0.1] * len(s) for s in leak],
                "iou_trigger_own_share": [[share]]}
    pooled = [v for s in leak for v in s]
    return {"scene": scene, "colour_leak_combined": sum(pooled) / len(pooled), "colour_leak_chance_combined": 0.1,
            "iou_trigger_own_share": share, "per_seed": per_seed}


def test_v2_report_shows_chance_levels_paired_differences_and_targets(tmp_path):
    module = _benchmark_module()
    ours = [_v2_row(s, [[0.0, 0.0], [0.0]], 0.9) for s in range(3)]
    theirs = [_v2_row(s, [[1.0, 0.0], [1.0]], 0.5) for s in range(3)]
    path = tmp_path / "v2.json"
    module.write_raw(path, {"format": 2, "rows": {"DisenDiff": ours, "Custom Diffusion": theirs},
                            "composition": {}, "minutes": 1.0, "machine": "CPU", "settings": "steps=2"})
    out = tmp_path / "results.md"
    assert module.main(["--from-raw", str(path), "--out", str(out), "--chart", str(tmp_path / "c.png")]) == 0
    text = out.read_text()
    assert "(evaluation v2)" in text.splitlines()[0] and "Evaluation v2" in text
    assert "| DisenDiff | **0.00** (0.10) |" in text  # leakage next to its chance level
    assert "| Custom Diffusion | 0.67 (0.10) |" in text  # per-scene pooled mean: 2 of 3 values
    assert "| trigger IoU own / ceiling ↑ | +0.400 [+0.400, +0.400] |" in text  # DisenDiff − Custom Diffusion
    cell = next(line for line in text.splitlines() if line.startswith("| colour leakage combined ↓ | "))
    difference, low, high = (float(x) for x in re.findall(r"[-+]\d\.\d+", cell))
    assert difference == -0.667 and low < difference < high < 0  # seeds resampled within scenes
    assert "| trigger IoU own ≥ 0.8 × ceiling | 0.90 | yes |" in text
    assert f"interval excluding zero | 0.00, {cell.split('| ', 2)[2].rstrip(' |')} | yes |" in text
    half = float(re.search(r"narrower than ±0\.05 \| ±(\d\.\d+) \| no \|", text).group(1))
    assert half == pytest.approx((high - low) / 2, abs=1e-3) and half > 0.05  # 3 scenes x 2 seeds: too few


def test_training_seeds_merge_as_runs_and_splits_report_in_their_own_sections(tmp_path):
    """Rows of several training seeds merge (a repeated scene and seed is refused); dev and held-out
    files never merge into one table: each split gets its section and the chart shows held-out."""
    module = _benchmark_module()

    def record(split: str, seeds: list[int], leak: float) -> dict:
        rows = {name: [{**_v2_row(s, [[value]] * 2, 0.9), "train_seed": seed} for s in range(2) for seed in seeds]
                for name, value in (("DisenDiff", 0.0), ("Custom Diffusion", leak))}
        return {"format": 2, "rows": rows, "composition": {}, "minutes": 1.0, "machine": "CPU",
                "settings": "steps=2", "split": split, "overrides": {"attention_weight": 0.2}}

    paths = {name: tmp_path / f"{name}.json" for name in ("dev0", "dev1", "held", "held_other")}
    module.write_raw(paths["dev0"], record("dev", [0], 1.0))
    module.write_raw(paths["dev1"], record("dev", [1], 1.0))
    merged = module.merge_raw([paths["dev0"], paths["dev1"]])
    assert [module.run_key(r) for r in merged["rows"]["DisenDiff"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with pytest.raises(SystemExit, match=r"repeats 'DisenDiff' on scene\(s\) \[0, 1\] \(training seeds \[1, 1\]\)"):
        module.merge_raw([paths["dev1"], paths["dev1"]])
    module.write_raw(paths["held"], {**record("heldout", [0, 1, 2], 0.5), "frozen_settings_sha256": "ab" * 32})
    with pytest.raises(SystemExit, match="holds heldout rows, the others dev"):
        module.merge_raw([paths["dev0"], paths["held"]])
    module.write_raw(paths["held_other"], {**record("heldout", [3], 0.5), "frozen_settings_sha256": "cd" * 32})
    with pytest.raises(SystemExit, match="another frozen settings file"):
        module.merge_raw([paths["held"], paths["held_other"]])
    del paths["held_other"]

    out, chart = tmp_path / "results.md", tmp_path / "c.png"
    assert module.main(["--from-raw", *map(str, paths.values()), "--out", str(out), "--chart", str(chart)]) == 0
    text = out.read_text()
    dev_at, held_at = text.index("## Dev scenes"), text.index("## Held-out scenes")
    assert dev_at < held_at and "Changed from the defaults: `{'attention_weight': 0.2}`" in text[:held_at]
    assert "Set by docs/verdict_settings.json (sha256 abababababab…): `{'attention_weight': 0.2}`" in text[held_at:]
    assert "2 reference scenes, training seeds 0, 1, 2." in text[held_at:]
    assert "### Leakage" in text and "\n## Leakage" not in text  # tables nest under their split
    leak = [line for line in text.splitlines() if line.startswith("| Custom Diffusion | ")
            and "(0.10)" in line]
    assert [line.split("|")[2].strip() for line in leak] == ["1.00 (0.10)", "0.50 (0.10)"]  # dev, held-out


def test_bad_study_options_stop_before_any_training(tmp_path, monkeypatch):
    """A typo in --set or --train-seeds, or a held-out run that could be tuned, names the problem."""
    import json

    from smallworld_lab import study

    module = _benchmark_module()
    with pytest.raises(SystemExit, match="steps takes a whole number"):
        module.main(["--set", "steps=many", "--scenes", "1"])
    with pytest.raises(SystemExit, match="init must be one of rare, class"):
        module.main(["--set", "init=clas", "--scenes", "1"])
    monkeypatch.setattr(study, "FROZEN_SETTINGS", tmp_path / "verdict_settings.json")
    with pytest.raises(SystemExit, match="does not exist"):
        module.main(["--split", "heldout"])
    for flags in (["--steps", "10"], ["--set", "cfg=7"]):
        with pytest.raises(SystemExit, match="drop --set, --steps"):
            module.main(["--split", "heldout", *flags])
    for flag, value in (("--scenes", "4"), ("--train-seeds", "0"), ("--sample-seeds", "16")):
        with pytest.raises(SystemExit, match=f"held-out runs take {flag} from verdict_settings.json only"):
            module.main(["--split", "heldout", flag, value])
    study.FROZEN_SETTINGS.write_text(json.dumps({"overrides": {"steps": "many"}, "train_seeds": [0],
                                                 "sample_seeds": 16, "scenes": 8}))
    with pytest.raises(SystemExit, match="steps takes a whole number"):
        module.main(["--split", "heldout"])
    for bad in ("0,one", "0,0"):
        with pytest.raises(SystemExit):
            module.parse_args(["--train-seeds", bad])
    assert module.parse_args(["--train-seeds", "0,1,2"]).train_seeds == [0, 1, 2]


def test_merging_refuses_to_mix_evaluation_formats(tmp_path):
    module = _benchmark_module()
    base = {"rows": {"DisenDiff": [{"scene": 0, "fidelity_single": 1.0}]}, "composition": {},
            "minutes": 1.0, "machine": "CPU", "settings": "steps=200"}
    paths = [tmp_path / "v1.json", tmp_path / "v2.json"]
    module.write_raw(paths[0], base)
    module.write_raw(paths[1], {**base, "format": 2, "rows": {"DisenDiff": [{"scene": 1}]}})
    with pytest.raises(SystemExit, match="evaluation v2 rows, the others v1"):
        module.merge_raw(paths)


def test_separately_learned_sets_are_cached_and_reused(random_toy, tmp_path, monkeypatch):
    scene = sw.reference_scenes(1)[0]
    first = composition.train_separately(random_toy, scene, TINY, cache=tmp_path / "scene0")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"scene0_V{i + 1}.safetensors" for i in range(len(scene.objects))]

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the sets were cached")

    monkeypatch.setattr(composition, "train_concepts", no_training)
    again = composition.train_separately(random_toy, scene, TINY, cache=tmp_path / "scene0")
    for a, b in zip(first, again):
        assert a.triggers == b.triggers
        for key, delta in a.kv_deltas.items():
            assert torch.equal(delta.float(), b.kv_deltas[key].float()), key


def test_gate_report_counts_a_sample_only_when_exactly_one_object_is_read():
    from types import SimpleNamespace

    from smallworld_lab import quality

    def obj(shape, colour):
        return SimpleNamespace(shape=shape, colour=colour, attributes=lambda: {"shape": shape, "colour": colour})

    report = quality.GateReport()
    report.add("right", [obj("circle", "red")], "circle", "red")
    report.add("wrong colour", [obj("circle", "blue")], "circle", "red")
    report.add("two objects", [obj("circle", "red"), obj("square", "red")], "circle", "red")
    report.add("nothing", [], "circle", "red")
    assert (report.samples, report.count, report.shape, report.colour) == (4, 2, 2, 1)
    assert report.rate("colour") == 0.25 and not report.passed
    assert report.rows[1] == ("wrong colour", [{"shape": "circle", "colour": "blue"}])


def test_toy_world_runs_train_on_the_toy_world_data_settings(random_toy):
    """No prefix words the toy text model never saw, no views shrunk below the VAE's 8 px cell."""
    scene = sw.reference_scenes(1)[0]
    result = exp.train_variant(random_toy, scene, "Custom Diffusion", TINY)
    augmentation = result.concepts.metadata["settings"]["augmentation"]
    assert augmentation == {"far_prefixes": (), "zoom_prefixes": (), "canvas": "border", "smallest_scale": 1.0}
    sets = composition.train_separately(random_toy, scene, TINY)
    assert sets[0].metadata["settings"]["augmentation"] == augmentation


def test_a_recipe_probe_freezes_what_it_names(random_toy):
    """``what_trains`` reaches the run: K/V frozen leaves every delta zero, embeddings frozen keep their first rows."""
    from concept_attention.training.parameters import ConceptParameters
    from concept_attention.training.settings import TrainSettings

    scene = sw.reference_scenes(1)[0]
    kv_frozen = exp.train_variant(random_toy, scene, "Custom Diffusion", TINY, {"train_kv": False}).concepts
    assert kv_frozen.metadata["settings"]["train_kv"] is False
    assert all(float(delta.abs().max()) == 0.0 for delta in kv_frozen.kv_deltas.values())
    start = ConceptParameters.initial(random_toy.model, random_toy.clip, exp.specs_for(scene),
                                      TrainSettings(init=TINY.init))
    moved = [not torch.equal(c.embeddings[k].cpu(), v.detach().cpu().to(c.embeddings[k].dtype))
             for c, vectors in zip(kv_frozen.concepts, start.embeddings) for k, v in vectors.items()]
    assert moved and all(moved)
    kept = exp.train_variant(random_toy, scene, "Custom Diffusion", TINY, {"train_embeddings": False}).concepts
    assert any(float(delta.abs().max()) > 0.0 for delta in kept.kv_deltas.values())
    assert all(torch.equal(c.embeddings[k].cpu(), v.detach().cpu().to(c.embeddings[k].dtype))
               for c, vectors in zip(kept.concepts, start.embeddings) for k, v in vectors.items())
    with pytest.raises(ValueError, match=r"what_trains \['steps'\]: a recipe probe may switch only train_kv"):
        exp.train_variant(random_toy, scene, "Custom Diffusion", TINY, {"steps": 1})
