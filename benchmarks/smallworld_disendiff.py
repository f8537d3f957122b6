"""DisenDiff vs. Custom Diffusion and ablations in the toy world: table and bar chart for docs/.

    .venv/bin/python benchmarks/smallworld_disendiff.py [--scenes 8] [--quick] [--device cuda]
    .venv/bin/python benchmarks/smallworld_disendiff.py --shard 0/8 --raw part0.json   # one of 8 parallel parts
    .venv/bin/python benchmarks/smallworld_disendiff.py --from-raw docs/results_raw/*.json   # report only

Needs the shipped toy-world weights (``smallworld/weights``). Each variant learns the concepts of
each reference scene from that one image, then is measured (``smallworld/experiment.py``): attention
IoU of trigger and class maps with the objects' masks, and fidelity / leakage / extra objects / text
alignment of fixed-seed samples. ``--quick`` (CI) trains DisenDiff and Custom Diffusion on one
scene, measures attention only, and exits 1 unless calibration moves the IoU the right way.
A second table (``smallworld/composition.py``) learns each object of a scene separately and samples
the combined caption with the sets combined and with automatic regions (leakage, fidelity).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, machine_info, setup_comfy  # noqa: E402

METRICS = [  # (key, column title, higher is better)
    ("iou_trigger_own", "trigger IoU own ↑", True), ("iou_trigger_other", "trigger IoU other ↓", False),
    ("iou_class_own", "class IoU own ↑", True), ("fidelity_single", "fidelity single ↑", True),
    ("fidelity_combined", "fidelity combined ↑", True), ("leakage_single", "leakage single ↓", False),
    ("leakage_combined", "leakage combined ↓", False), ("extra_objects", "extra objects ↓", False),
    ("text_alignment", "text alignment ↑", True),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=8, help="reference scenes (every 4th has 3 objects)")
    parser.add_argument("--variants", default="all",
                        help="comma-separated variant names, 'all', or 'none' (only the composition table)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--quick", action="store_true", help="CI check: 1 scene, attention IoU only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--weights", type=Path, default=None, help="toy-world weights dir (default: shipped)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "results.md")
    parser.add_argument("--chart", type=Path, default=REPO_ROOT / "docs" / "results.png")
    parser.add_argument("--raw", type=Path, default=None, help="also write per-run rows as JSON")
    parser.add_argument("--no-composition", action="store_true",
                        help="skip the composition table (separately learned concepts: combined vs the regional modes)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run only scenes i, i+N, ... and write rows to --raw (merge with --from-raw)")
    parser.add_argument("--scene-ids", default=None, metavar="I,J",
                        help="run only these scenes (like --shard: rows go to --raw for --from-raw)")
    parser.add_argument("--composition-seeds", type=int, default=None, metavar="N",
                        help="sample the composition table with N seeds per scene (default: the 4 "
                             "sample seeds; leakage is a rare event, so more seeds narrow its noise)")
    parser.add_argument("--composition-modes", default=None, metavar="A,B",
                        help="only these modes of smallworld/composition.py (default: all)")
    parser.add_argument("--sets-dir", type=Path, default=None,
                        help="keep the composition table's separately learned sets here and reuse them")
    parser.add_argument("--from-raw", type=Path, nargs="+", default=None, metavar="JSON",
                        help="write the report from --raw files of earlier (sharded) runs, training nothing")
    return parser.parse_args(argv)


def mean_rows(rows: list[dict]) -> dict[str, float]:
    """Per-metric mean over runs (metrics missing from a run are skipped)."""
    keys = [k for k, _, _ in METRICS if any(k in r for r in rows)]
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


def markdown_table(summary: dict[str, dict[str, float]]) -> str:
    """Variants as rows, metrics as columns; the best value of each column in bold."""
    summary = {name: values for name, values in summary.items() if values}  # variants with rows
    keys = [(k, t, up) for k, t, up in METRICS if all(k in s for s in summary.values())]
    lines = ["| variant | " + " | ".join(t for _, t, _ in keys) + " |",
             "|---|" + "---|" * len(keys)]
    best = {k: (max if up else min)(s[k] for s in summary.values()) for k, _, up in keys}
    for name, s in summary.items():
        cells = [f"**{s[k]:.2f}**" if abs(s[k] - best[k]) < 1e-9 else f"{s[k]:.2f}" for k, _, _ in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def composition_section(per_mode: dict[str, list[dict]]) -> str:
    """Markdown: the composition modes on separately learned concepts, mean over scenes."""
    lines = ["| composition | fidelity combined ↑ | leakage combined ↓ | leakage, drawn objects ↓ "
             "| colour leakage, drawn objects ↓ | its chance level | objects drawn ↑ | scenes × seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, rows in per_mode.items():
        mean = {k: sum(r.get(k, float("nan")) for r in rows) / len(rows)
                for k in ("fidelity_combined", "leakage_combined", "leakage_found", "colour_leakage",
                          "colour_chance", "found")}
        cells = " | ".join("–" if v != v else f"{v:.2f}" for v in mean.values())
        lines.append(f"| {mode} | {cells} | {len(rows)} × {rows[0].get('seeds', 4)} |")
    table = "\n".join(lines) + differences_to_combined(per_mode)
    print(table)
    return ("\n## Composition of separately learned concepts\n\nEach object learned on its own (one "
            "concept set per object, trained with its mask); the combined caption sampled with the sets "
            "composed by each mode of `smallworld/composition.py`: `combined` (every set everywhere), "
            "`regional_auto` (regions from the class words' maps over the first 30 % of the steps, "
            "the rest sampled regionally, each region reading the caption without the other "
            "triggers), `regional_auto_shared` (the same, regions reading the whole caption), "
            "`regional_auto_restart_triggers` (the same regions, then every step sampled again with "
            "them, texts without the other triggers), `regional_auto_restart` (that, with texts "
            "without the other concepts' whole phrases: the node's defaults), `regional_masks` (the "
            "true object masks as regions, texts without the other triggers); `single` is no "
            "composition: each concept sampled alone with its own set, the leakage its learning left "
            "in it. *Leakage, drawn objects* counts only objects whose "
            "shape was drawn; *colour leakage* is the same for colour alone (read exactly, where "
            "patterns are read right about 60 % of the time through a simulated 8x VAE); "
            "*its chance level* is "
            "what it would read if a wrong colour were the other object's by chance only (the share "
            "of one colour no object has); *objects drawn* is the share of objects drawn.\n\n"
            + table + "\n")


def differences_to_combined(per_mode: dict[str, list[dict]]) -> str:
    """Markdown lines: each mode's leakage minus combined's, with paired 95 % bootstrap intervals."""
    from concept_attention.smallworld.report import paired_difference

    base = per_mode.get("combined", [])
    if not base or not all("per_seed" in r for rows in per_mode.values() for r in rows):
        return ""
    lines = ["", "", "| against combined (95 % paired bootstrap over scenes and seeds) | leakage combined "
             "| colour leakage, drawn objects |", "|---|---|---|"]
    for mode, rows in per_mode.items():
        if mode == "combined":
            continue
        cells = ["{:+.3f} [{:+.3f}, {:+.3f}]".format(*paired_difference(rows, base, key))
                 for key in ("leakage_combined", "colour_leakage")]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_raw(path: Path, raw: dict) -> None:
    """Rows so far, atomically (a sharded run killed at its time limit keeps what it finished)."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(raw, indent=1))
    tmp.replace(path)


def merge_raw(paths: list[Path]) -> dict:
    """One raw record from several shards' files: rows and composition rows concatenated by scene.

    Refuses shards run with different settings, or two rows for the same variant and scene.
    """
    merged: dict = {"rows": {}, "composition": {}, "minutes": 0.0, "machine": "", "settings": "",
                    "sources": []}
    machines: set[str] = set()
    for path in paths:
        part = json.loads(path.read_text())
        if merged["settings"] and part["settings"] != merged["settings"]:
            raise SystemExit(f"{path} was run with other settings ({part['settings']}); "
                             f"the others used {merged['settings']}")
        merged["settings"] = part["settings"]
        for key in ("rows", "composition"):
            for name, rows in part[key].items():
                have = {r["scene"] for r in merged[key].get(name, [])}
                twice = sorted(have & {r["scene"] for r in rows})
                if twice:
                    raise SystemExit(f"{path} repeats {name!r} on scene(s) {twice}")
                merged[key].setdefault(name, []).extend(rows)
        merged["minutes"] = max(merged["minutes"], part["minutes"])  # shards run side by side
        machines.add(part["machine"])
        done = {name: sorted(r["scene"] for r in rows) for key in ("rows", "composition")
                for name, rows in part[key].items() if rows}
        merged["sources"].append({"file": path.name, "machine": part["machine"], "scenes": done})
    merged["machine"] = " and ".join(sorted(machines))
    for key in ("rows", "composition"):
        for rows in merged[key].values():
            rows.sort(key=lambda r: r["scene"])
    return merged


TARGETS = [  # (metric, issue target, met when)
    ("iou_trigger_own", ">= 0.5", lambda v: v >= 0.5), ("iou_trigger_other", "<= 0.1", lambda v: v <= 0.1),
    ("fidelity_single", ">= 0.8", lambda v: v >= 0.8), ("leakage_combined", "<= 0.1", lambda v: v <= 0.1),
    ("extra_objects", "<= 0.1", lambda v: v <= 0.1),
]


def targets_table(summary: dict[str, dict[str, float]]) -> str:
    """DisenDiff against the targets it aims at, and its leakage against half of Custom Diffusion's."""
    if "DisenDiff" not in summary:
        return ""
    ours = summary["DisenDiff"]
    titles = {k: t for k, t, _ in METRICS}
    lines = ["| target | DisenDiff | met? |", "|---|---|---|"]
    for key, target, met in TARGETS:
        if key in ours:
            lines.append(f"| {titles[key]} {target} | {ours[key]:.2f} | {'yes' if met(ours[key]) else 'no'} |")
    baseline = summary.get("Custom Diffusion", {})
    for key in ("leakage_single", "leakage_combined"):
        if key in ours and key in baseline:
            ok = ours[key] <= baseline[key] / 2
            lines.append(f"| {titles[key]} at most half of Custom Diffusion's ({baseline[key]:.2f}) | "
                         f"{ours[key]:.2f} | {'yes' if ok else 'no'} |")
    return "\n".join(lines)


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
    device = setup_comfy(args.device)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from concept_attention.smallworld import composition
    from concept_attention.smallworld import experiment as exp
    from concept_attention.smallworld.report import bar_chart

    settings = exp.ExperimentSettings()
    if args.steps:
        settings.steps = args.steps
    variants = (list(exp.VARIANTS) if args.variants == "all" else [] if args.variants == "none"
                else [v.strip() for v in args.variants.split(",")])
    if args.quick:
        variants, args.scenes = ["DisenDiff", "Custom Diffusion"], 1
    if args.from_raw:
        raw = merge_raw(args.from_raw)
        order = list(exp.VARIANTS)  # the table's usual order, whatever order the files came in
        raw["rows"] = dict(sorted(raw["rows"].items(),
                                  key=lambda item: order.index(item[0]) if item[0] in order else len(order)))
        modes = list(composition.MODES)
        raw["composition"] = dict(sorted(raw["composition"].items(),
                                         key=lambda item: modes.index(item[0]) if item[0] in modes else len(modes)))
    else:
        raw = run_experiment(args, settings, variants, device)
        if args.shard or args.scene_ids:
            return 0
    rows, minutes = raw["rows"], raw["minutes"]
    summary = {v: mean_rows(r) for v, r in rows.items()}
    table = markdown_table(summary)
    print(table)
    if args.quick:
        d, c = summary["DisenDiff"], summary["Custom Diffusion"]
        ok = d["iou_trigger_own"] - d["iou_trigger_other"] > c["iou_trigger_own"] - c["iou_trigger_other"]
        print(f"calibration {'improves' if ok else 'does NOT improve'} the trigger-map contrast "
              f"(own - other IoU): DisenDiff {d['iou_trigger_own'] - d['iou_trigger_other']:.3f} vs "
              f"Custom Diffusion {c['iou_trigger_own'] - c['iou_trigger_other']:.3f}")
        return 0 if ok else 1
    composition = composition_section(raw["composition"]) if raw["composition"] else ""
    command = "python benchmarks/smallworld_disendiff.py " + " ".join(argv if argv is not None else sys.argv[1:])
    scenes = len({r["scene"] for table_rows in rows.values() for r in table_rows})
    composed = len({r["scene"] for table_rows in raw["composition"].values() for r in table_rows})
    scenes_text = f"{scenes or composed} reference scenes" + (
        f", {composed} in the composition table" if scenes and composed not in (0, scenes) else "")
    args.chart.parent.mkdir(parents=True, exist_ok=True)
    bar_chart(summary, [(k, t) for k, t, _ in METRICS], args.chart)
    args.out.write_text(
        f"# Toy-world results: DisenDiff vs. Custom Diffusion and ablations\n\n"
        f"Command: `{command.strip()}` ({scenes_text}"
        + (")." if raw.get("sources") else f", {minutes:.0f} min on {raw['machine']}).")
        + f"\n{sources_section(raw)}\nSettings: `{raw['settings']}`\n\n{table}\n\n"
        f"![bar chart]({args.chart.name})\n\n## DisenDiff against the targets\n\n"
        f"{targets_table(summary)}\n{composition}"
        "\nHow the rows were produced and what they say: [toy_world.md](toy_world.md#results).\n")
    print(f"wrote {args.out} and {args.chart}")
    return 0


def run_experiment(args: argparse.Namespace, settings: Any, variants: list[str], device: str) -> dict:
    """Train and measure every variant on every (shard's) scene; the raw record of all rows."""
    from concept_attention.smallworld import composition
    from concept_attention.smallworld import experiment as exp
    from concept_attention.smallworld import model as toy
    from concept_attention.smallworld import scenes as sw

    bundle = toy.load_bundle(args.weights) if args.weights else toy.load_bundle()
    indices = list(range(args.scenes))
    if args.shard:
        shard, count = (int(x) for x in args.shard.split("/"))
        indices = indices[shard::count]
    if args.scene_ids:
        indices = [int(i) for i in args.scene_ids.split(",")]
    scenes = sw.reference_scenes(args.scenes)
    raw: dict = {"rows": {v: [] for v in variants}, "composition": {}, "minutes": 0.0,
                 "machine": machine_info(device), "settings": str(settings)}
    started = time.monotonic()

    def record() -> None:
        raw["minutes"] = (time.monotonic() - started) / 60
        if args.raw:
            write_raw(args.raw, raw)

    for index in indices:
        for variant in variants:
            t0 = time.monotonic()
            row = exp.run_scene(bundle, scenes[index], variant, settings, generate=not args.quick)
            row.update(scene=index, variant=variant, seconds=round(time.monotonic() - t0, 1))
            raw["rows"][variant].append(row)
            print(f"scene {index} {variant:<17} " + " ".join(
                f"{k}={row[k]:.2f}" for k, _, _ in METRICS if k in row) + f" ({row['seconds']} s)", flush=True)
            record()
    if not (args.quick or args.no_composition):
        for index in indices:
            cache = args.sets_dir / f"scene{index}" if args.sets_dir else None
            seeds = range(11, 11 + args.composition_seeds) if args.composition_seeds else None
            modes = args.composition_modes.split(",") if args.composition_modes else composition.MODES
            for mode, values in composition.composition_metrics(bundle, scenes[index], settings, cache=cache,
                                                                modes=modes, seeds=seeds).items():
                raw["composition"].setdefault(mode, []).append({**values, "scene": index})
                print(f"scene {index} composition {mode:<14} " + " ".join(
                    f"{k}={v:.2f}" for k, v in values.items() if k != "per_seed"), flush=True)
            record()
    record()
    return raw


if __name__ == "__main__":
    sys.exit(main())
