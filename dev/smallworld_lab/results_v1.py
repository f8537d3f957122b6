"""Evaluation v1 report: the tables of raw files written before evaluation v2 (no ``format`` key).

v1 scored each target on its best-matching object among all read objects (no one-to-one
matching), counted shape in fidelity and had chance levels only for the composition table's colour
leakage; issue 18 explains why those numbers cannot decide between variants. Kept, unchanged, only
so that ``docs/results_v1.md`` can still be rebuilt from the raw rows committed then.
"""
from __future__ import annotations

from typing import Callable

MODES = ("combined", "regional_auto", "regional_auto_shared", "regional_auto_restart_triggers",
         "regional_auto_restart", "regional_masks", "single")  # the v1 composition table's rows, in order
METRICS = [  # (key, column title, higher is better)
    ("iou_trigger_own", "trigger IoU own ↑", True), ("iou_trigger_other", "trigger IoU other ↓", False),
    ("iou_class_own", "class IoU own ↑", True), ("fidelity_single", "fidelity single ↑", True),
    ("fidelity_combined", "fidelity combined ↑", True), ("leakage_single", "leakage single ↓", False),
    ("leakage_combined", "leakage combined ↓", False), ("extra_objects", "extra objects ↓", False),
    ("text_alignment", "text alignment ↑", True),
]
NOTE = ("**Evaluation v1.** These rows were scored before evaluation v2 (issue 18): each target on its "
        "best-matching object among all read objects (one object can be the match of both targets, and "
        "extra objects give more chances), fidelity counts shape (the class word gives it for free), and "
        "leakage counts a pattern misread as solid and has no chance level outside the composition table. "
        "Read them as what was measured then, not as a verdict between the variants.")


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


def composition_section(per_mode: dict[str, list[dict]], paired_difference: Callable) -> str:
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
    table = "\n".join(lines) + differences_to_combined(per_mode, paired_difference)
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


def differences_to_combined(per_mode: dict[str, list[dict]], paired_difference: Callable) -> str:
    """Markdown lines: each mode's leakage minus combined's, with paired 95 % bootstrap intervals."""
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
