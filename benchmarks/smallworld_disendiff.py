"""DisenDiff vs. Custom Diffusion and ablations in the toy world: table and bar chart for docs/.

    .venv/bin/python benchmarks/smallworld_disendiff.py [--scenes 8] [--quick] [--device cuda]
    .venv/bin/python benchmarks/smallworld_disendiff.py --shard 0/8 --raw part0.json   # one of 8 parallel parts
    .venv/bin/python benchmarks/smallworld_disendiff.py --from-raw docs/verdict_raw/shipped_v2_*.json   # results.md
    .venv/bin/python benchmarks/smallworld_disendiff.py --split dev --train-seeds 0,1 --sample-seeds 16 \
        --set attention_weight=0.2 --raw dev.json                       # the verdict's dev tuning
    .venv/bin/python benchmarks/smallworld_disendiff.py --split heldout --raw heldout.json
        # once: settings, seeds and scenes from docs/verdict_settings.json only (issue 18)

Needs the shipped toy-world weights (``smallworld/weights``). Each variant learns the concepts of
each reference scene from that one image, then is measured (``dev/smallworld_lab/experiment.py``): attention
IoU of trigger and class maps with the objects' masks, and fidelity / leakage / extra objects / text
alignment of fixed-seed samples, scored by evaluation v2 (``dev/smallworld_lab/evaluate.py``, report in
``results_v2.py``). Raw files written before v2 (no ``format`` key) are reported with evaluation
v1's tables (``results_v1.py``); the two are never merged. ``--quick`` (CI) trains DisenDiff and
Custom Diffusion on one scene, measures attention only, and exits 1 unless calibration moves the
IoU the right way. A second table (``dev/smallworld_lab/composition.py``) learns each object of a scene
separately and samples the combined caption with the sets combined and with automatic regions.
The study protocol (dev and held-out splits, frozen settings, training seeds) is
``dev/smallworld_lab/study.py``; a report from raw files of both splits shows each in its section.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dev"))
from devkit import bench  # noqa: E402
from devkit.bench import machine_info  # noqa: E402
from devkit.pack import REPO_ROOT  # noqa: E402
from smallworld_lab import results_v1 as v1  # noqa: E402
from smallworld_lab import results_v2 as v2  # noqa: E402

RAW_FORMAT = 2  # evaluation v2 (issue 18); files without "format" are v1 (results_v1.py)
TITLE = "Toy-world results: DisenDiff vs. Custom Diffusion and ablations"
QUICK_METRICS = [("iou_trigger_own", "trigger IoU own ↑", True),
                 ("iou_trigger_other", "trigger IoU other ↓", False)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=None, help="reference scenes (default 8; every 4th has 3 objects)")
    parser.add_argument("--variants", default="all",
                        help="comma-separated variant names, 'all', or 'none' (only the composition table)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--quick", action="store_true", help="CI check: 1 scene, attention IoU only")
    bench.add_machine_arguments(parser, device="cpu")
    parser.add_argument("--weights", type=Path, default=None, help="toy-world weights dir (default: shipped)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "results.md")
    parser.add_argument("--chart", type=Path, default=REPO_ROOT / "docs" / "results.png")
    parser.add_argument("--raw", type=Path, default=None, help="also write per-run rows as JSON")
    parser.add_argument("--no-composition", action="store_true",
                        help="skip the composition table (separately learned concepts: combined vs the regional modes)")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run only scenes i, i+N, ... and write rows to --raw (merge with --from-raw)")
    parser.add_argument("--scene-ids", default=None, metavar="I,J",
                        help="run only these scenes (like --shard: rows go to --raw for --from-raw)")
    parser.add_argument("--composition-seeds", type=int, default=None, metavar="N",
                        help="sample the composition table with N seeds per scene (default: the 4 "
                             "sample seeds; leakage is a rare event, so more seeds narrow its noise)")
    parser.add_argument("--composition-modes", default=None, metavar="A,B",
                        help="only these modes of dev/smallworld_lab/composition.py (default: all)")
    parser.add_argument("--sets-dir", type=Path, default=None,
                        help="keep the composition table's separately learned sets here and reuse them")
    parser.add_argument("--split", choices=("dev", "heldout"), default="dev",
                        help="dev scenes (tuning; the reference scenes) or held-out scenes (run once, "
                             "with docs/verdict_settings.json only)")
    parser.add_argument("--train-seeds", type=seed_list, default=None, metavar="I,J",
                        help="training seeds (default 0): each variant learns each scene once per seed")
    parser.add_argument("--sample-seeds", type=int, default=None, metavar="N",
                        help="sample seeds 11 .. 10+N (default: the settings' 4; the verdict uses 16)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="change one ExperimentSettings field (dev runs only), e.g. attention_weight=0.2")
    parser.add_argument("--from-raw", type=Path, nargs="+", default=None, metavar="JSON",
                        help="write the report from --raw files of earlier (sharded) runs, training nothing")
    return parser.parse_args(argv)


def seed_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (argparse type of --train-seeds); repeats are refused."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"write whole numbers separated by commas, e.g. 0,1,2 (got {text!r})") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"each training seed once, please (got {text!r})")
    return seeds


def write_raw(path: Path, raw: dict) -> None:
    """Rows so far, atomically (a sharded run killed at its time limit keeps what it finished)."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(raw, indent=1))
    tmp.replace(path)


def merge_raw(paths: list[Path]) -> dict:
    """One raw record from several shards' files: rows and composition rows concatenated by scene.

    Refuses shards run with different settings, splits or evaluation formats, or two rows for the
    same variant, scene and training seed.
    """
    merged: dict = {"rows": {}, "composition": {}, "minutes": 0.0, "machine": "", "settings": "",
                    "sources": []}
    machines: set[str] = set()
    for path in paths:
        part = json.loads(path.read_text())
        version = part.get("format", 1)
        if merged.setdefault("format", version) != version:
            raise SystemExit(f"{path} holds evaluation v{version} rows, the others v{merged['format']}; "
                             "report each evaluation from its own files")
        if merged["settings"] and part["settings"] != merged["settings"]:
            raise SystemExit(f"{path} was run with other settings ({part['settings']}); "
                             f"the others used {merged['settings']}")
        merged["settings"], merged["overrides"] = part["settings"], part.get("overrides", {})
        split = part.get("split", "dev")
        if merged.setdefault("split", split) != split:
            raise SystemExit(f"{path} holds {split} rows, the others {merged['split']}; "
                             "a report shows each split from its own files")
        frozen = part.get("frozen_settings_sha256", "")
        if merged.setdefault("frozen_settings_sha256", frozen) != frozen:
            raise SystemExit(f"{path} was run with another frozen settings file (sha256 {frozen[:12] or 'none'}) "
                             f"than the others ({merged['frozen_settings_sha256'][:12] or 'none'})")
        for key in ("rows", "composition"):
            for name, rows in part[key].items():
                runs = [run_key(r) for r in merged[key].get(name, [])] + [run_key(r) for r in rows]
                twice = sorted({run for run in runs if runs.count(run) > 1})
                if twice:
                    raise SystemExit(f"{path} repeats {name!r} on scene(s) {[s for s, _ in twice]} "
                                     f"(training seeds {[t for _, t in twice]})")
                merged[key].setdefault(name, []).extend(rows)
        merged["minutes"] = max(merged["minutes"], part["minutes"])  # shards run side by side
        machines.add(part["machine"])
        done = {name: sorted(r["scene"] for r in rows) for key in ("rows", "composition")
                for name, rows in part[key].items() if rows}
        merged["sources"].append({"file": path.name, "machine": part["machine"], "scenes": done})
    merged["machine"] = " and ".join(sorted(machines))
    for key in ("rows", "composition"):
        for rows in merged[key].values():
            rows.sort(key=run_key)
    return merged


def run_key(row: dict) -> tuple[int, int]:
    """(scene, training seed) of a row; rows from before training seeds count as seed 0."""
    return row["scene"], row.get("train_seed", 0)


def split_files(paths: list[Path]) -> dict[str, list[Path]]:
    """Raw files by split, dev first (files from before splits are dev: the seed-0 reference scenes)."""
    groups: dict[str, list[Path]] = {}
    for path in paths:
        groups.setdefault(json.loads(path.read_text()).get("split", "dev"), []).append(path)
    return dict(sorted(groups.items(), key=lambda item: item[0] != "dev"))


def sources_section(raw: dict) -> str:
    """Which machine ran which rows, for a report merged from several raw files."""
    if not raw.get("sources"):
        return ""
    by_machine: dict[str, dict[str, list[int]]] = {}
    for source in raw["sources"]:
        done = by_machine.setdefault(source["machine"], {})
        for name, scenes in source["scenes"].items():
            done[name] = sorted(set(done.get(name, [])) | set(scenes))
    lines = ["", f"Merged from {len(raw['sources'])} raw files of runs with the same settings and seeds "
             "(a CPU and a GPU give slightly different floating-point results for the same seed, so "
             "treat single-scene differences as noise):", ""]
    for machine, done in by_machine.items():
        rows = "; ".join(f"{name} on scenes {','.join(map(str, scenes))}" for name, scenes in done.items())
        lines.append(f"- {machine}: {rows}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = parse_args(argv)
    device = bench.start_benchmark(args)
    from smallworld_lab import experiment as exp
    from smallworld_lab import study

    variants = (list(exp.VARIANTS) if args.variants == "all" else [] if args.variants == "none"
                else [v.strip() for v in args.variants.split(",")])
    if args.quick:
        variants, args.scenes = ["DisenDiff", "Custom Diffusion"], 1
    if args.from_raw:
        raws = {split: in_table_order(merge_raw(paths)) for split, paths in split_files(args.from_raw).items()}
    else:
        overrides = args.set + ([f"steps={args.steps}"] if args.steps is not None else [])
        given = [flag for flag, value in (("--train-seeds", args.train_seeds), ("--sample-seeds", args.sample_seeds),
                                          ("--scenes", args.scenes),
                                          ("--composition-seeds", args.composition_seeds)) if value is not None]
        if args.split == "heldout" and given:
            raise SystemExit(f"held-out runs take {', '.join(given)} from {study.FROZEN_SETTINGS.name} only: "
                             "drop them (tune on --split dev, then record the choice in that file)")
        requested = study.Protocol(tuple(args.train_seeds or (0,)), args.sample_seeds, args.scenes or 8)
        try:
            settings, chosen, protocol, digest = study.run_settings(args.split, overrides, requested)
        except ValueError as error:
            raise SystemExit(str(error)) from None
        raws = {args.split: run_experiment(args, settings, chosen, protocol, digest, variants, device)}
        if args.shard or args.scene_ids:
            return 0
    if args.quick:
        rows = raws[args.split]["rows"]
        summary = {v: v2.scene_means(r) for v, r in rows.items()}
        print(v2.table(summary, QUICK_METRICS))
        d, c = summary["DisenDiff"], summary["Custom Diffusion"]
        ok = d["iou_trigger_own"] - d["iou_trigger_other"] > c["iou_trigger_own"] - c["iou_trigger_other"]
        print(f"calibration {'improves' if ok else 'does NOT improve'} the trigger-map contrast "
              f"(own - other IoU): DisenDiff {d['iou_trigger_own'] - d['iou_trigger_other']:.3f} vs "
              f"Custom Diffusion {c['iou_trigger_own'] - c['iou_trigger_other']:.3f}")
        return 0 if ok else 1
    command = "python benchmarks/smallworld_disendiff.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(raws, command.strip(), args.out, args.chart)
    print(f"wrote {args.out} and {args.chart}")
    return 0


def in_table_order(raw: dict) -> dict:
    """The raw record with variants and composition modes in the tables' usual order."""
    from smallworld_lab import composition
    from smallworld_lab import experiment as exp

    def ordered(table: dict, order: list[str]) -> dict:
        return dict(sorted(table.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))

    modes = list(v1.MODES if raw.get("format", 1) == 1 else composition.MODES)
    return {**raw, "rows": ordered(raw["rows"], list(exp.VARIANTS)), "composition": ordered(raw["composition"], modes)}


SPLIT_TITLES = {"dev": "Dev scenes (tuning: the seed-0 reference scenes)",
                "heldout": "Held-out scenes (run once, with the settings frozen after the dev tuning)"}


def write_report(raws: dict[str, dict], command: str, out: Path, chart: Path) -> None:
    """results.md and its chart: one split as before, or a section per split (chart: held-out)."""
    from smallworld_lab import study
    from smallworld_lab.report import bar_chart

    parts, titles, charted = [], [], None
    frozen_name = Path(os.path.relpath(study.FROZEN_SETTINGS, REPO_ROOT)).as_posix()
    chart_split = "heldout" if "heldout" in raws else next(iter(raws))
    for split, raw in raws.items():
        title, body, summary, chart_metrics = report_body(raw, chart.name if split == chart_split else None)
        print(body)
        rows = raw["rows"]
        scenes = len({r["scene"] for table_rows in rows.values() for r in table_rows})
        composed = len({r["scene"] for table_rows in raw["composition"].values() for r in table_rows})
        seeds = sorted({r.get("train_seed", 0) for table_rows in rows.values() for r in table_rows})
        scenes_text = f"{scenes or composed} reference scenes" + (
            f", {composed} in the composition table" if scenes and composed not in (0, scenes) else "") + (
            f", training seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else "")
        when = ")." if raw.get("sources") else f", {raw['minutes']:.0f} min on {raw['machine']})."
        if raw.get("frozen_settings_sha256"):
            overrides = (f"\nSet by {frozen_name} (sha256 {raw['frozen_settings_sha256'][:12]}…): "
                         f"`{raw.get('overrides') or 'the defaults'}`")
        else:
            overrides = f"\nChanged from the defaults: `{raw['overrides']}`" if raw.get("overrides") else ""
        head = (f"Command: `{command}` ({scenes_text}{when}" if len(raws) == 1
                else f"## {SPLIT_TITLES[split]}\n\n{scenes_text[0].upper()}{scenes_text[1:]}{when[1:]}")
        if len(raws) > 1:
            body = body.replace("\n## ", "\n### ")
        parts.append(f"{head}\n{sources_section(raw)}\nSettings: `{raw['settings']}`{overrides}\n\n{body}")
        titles.append(title)
        if split == chart_split:
            charted = (summary, chart_metrics)
    intro = "" if len(raws) == 1 else f"Command: `{command}`.\n\n"
    chart.parent.mkdir(parents=True, exist_ok=True)
    bar_chart(*charted, chart)
    section = ("Results" if any(raw.get("format", 1) == 1 for raw in raws.values()) else
               "The held-out verdict" if "heldout" in raws else "A first dev measurement on the v2 candidate")
    out.write_text(f"# {titles[0]}\n\n{intro}" + "\n".join(parts)
                   + f"\nHow the rows were produced and what they say: [toy_world.md](toy_world.md), *{section}*.\n")


def report_body(raw: dict, chart_name: str | None) -> tuple[str, str, dict[str, dict[str, float]], list]:
    """(title, markdown after the settings line, per-variant summary, chart metrics) for the raw
    format; the chart is shown only when ``chart_name`` is given."""
    from smallworld_lab.report import paired_difference

    rows = raw["rows"]
    chart = f"![bar chart]({chart_name})" if chart_name else ""
    if raw.get("format", 1) == 1:
        summary = {v: v2.scene_means(r) for v, r in rows.items()}
        composition = v1.composition_section(raw["composition"], paired_difference) if raw["composition"] else ""
        body = (f"{v1.NOTE}\n\n{v1.markdown_table(summary)}\n\n{chart}\n\n"
                f"## DisenDiff against the targets\n\n{v1.targets_table(summary)}\n{composition}")
        return (TITLE + " (evaluation v1)", body, summary, [(k, t) for k, t, _ in v1.METRICS])
    body, summary, chart_metrics = v2.render(raw, paired_difference)
    return TITLE + " (evaluation v2)", (f"{chart}\n\n" if summary and chart else "") + body, summary, chart_metrics


def run_experiment(args: argparse.Namespace, settings: Any, overrides: dict, protocol: Any, frozen_sha256: str,
                   variants: list[str], device: str) -> dict:
    """Train and measure every variant on every (shard's) scene and training seed; the raw record."""
    from smallworld_lab import composition
    from smallworld_lab import experiment as exp
    from smallworld_lab import study
    from concept_attention.smallworld import model as toy

    weights = args.weights or toy.WEIGHTS_DIR
    digests = toy.weights_sha256(weights)  # read before loading, so they name the files the run loaded
    bundle = toy.load_bundle(weights)
    indices = list(range(protocol.scenes))
    if args.shard:
        shard, count = (int(x) for x in args.shard.split("/"))
        indices = indices[shard::count]
    if args.scene_ids:
        indices = [int(i) for i in args.scene_ids.split(",")]
    scenes = study.split_scenes(args.split, protocol.scenes)
    train_seeds = list(protocol.train_seeds)
    raw: dict = {"format": RAW_FORMAT, "rows": {v: [] for v in variants}, "composition": {}, "minutes": 0.0,
                 "machine": machine_info(device), "settings": str(settings)}
    raw.update(split=args.split, overrides=overrides, weights=str(weights),
               **{f"{name}_sha256": digest for name, digest in digests.items()})
    if frozen_sha256:
        raw["frozen_settings_sha256"] = frozen_sha256
    started = time.monotonic()

    def record() -> None:
        raw["minutes"] = (time.monotonic() - started) / 60
        if args.raw:
            write_raw(args.raw, raw)

    for index in indices:
        for variant, train_seed in [(v, seed) for v in variants for seed in train_seeds]:
            t0 = time.monotonic()
            row = exp.run_scene(bundle, scenes[index], variant, replace(settings, seed=train_seed),
                                generate=not args.quick)
            row.update(scene=index, variant=variant, seconds=round(time.monotonic() - t0, 1))
            row["train_seed"] = train_seed
            raw["rows"][variant].append(row)
            print(f"scene {index} seed {train_seed} {variant:<17} " + " ".join(
                f"{k}={row[k]:.2f}" for k, _ in v2.CHART if k in row) + f" ({row['seconds']} s)", flush=True)
            record()
    if not (args.quick or args.no_composition):
        for index in indices:
            cache = args.sets_dir / f"scene{index}" if args.sets_dir else None
            seeds = range(11, 11 + args.composition_seeds) if args.composition_seeds else None
            modes = args.composition_modes.split(",") if args.composition_modes else composition.MODES
            learned = replace(settings, seed=train_seeds[0])  # the composition table: the first training seed
            for mode, values in composition.composition_metrics(bundle, scenes[index], learned, cache=cache,
                                                                modes=modes, seeds=seeds).items():
                raw["composition"].setdefault(mode, []).append({**values, "scene": index,
                                                                "train_seed": train_seeds[0]})
                print(f"scene {index} composition {mode:<14} " + " ".join(
                    f"{k}={values[k]:.2f}" for k, _, _ in v2.COMPOSITION if k in values), flush=True)
            record()
    record()
    return raw


if __name__ == "__main__":
    sys.exit(main())
