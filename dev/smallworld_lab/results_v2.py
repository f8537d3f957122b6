"""Evaluation v2 report (issue 18): tables with chance levels and paired intervals from format-2 raw rows.

The metrics are defined in ``dev/smallworld_lab/evaluate.py`` (matching, per-picture values) and
``dev/smallworld_lab/experiment.py`` (IoU against the ceiling at the maps' resolution); DEFINITIONS below
says the same for readers of the report.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

Column = tuple[str, str, bool]  # (key, title, higher is better)
ATTENTION: list[Column] = [
    ("iou_trigger_own_share", "trigger IoU own / ceiling ↑", True),
    ("iou_trigger_own", "trigger IoU own ↑", True),
    ("iou_trigger_other", "trigger IoU other ↓", False), ("iou_class_own_share", "class IoU own / ceiling ↑", True),
    ("iou_class_own", "class IoU own ↑", True), ("iou_class_other", "class IoU other ↓", False),
    ("iou_ceiling", "IoU ceiling", True),
]
LEAKAGE: list[Column] = [  # each shown with its chance level (key + "_chance" before the suffix)
    ("colour_leak_combined", "colour leakage combined ↓", False),
    ("colour_leak_single", "colour swap single ↓", False),
    ("cp_leak_combined", "colour+pattern leakage combined ↓", False),
    ("cp_leak_single", "colour+pattern swap single ↓", False),
]
PICTURES: list[Column] = [
    ("fidelity_cp_single", "fidelity single ↑", True), ("fidelity_cp_combined", "fidelity combined ↑", True),
    ("shape_right_single", "shape right single ↑", True), ("shape_right_combined", "shape right combined ↑", True),
    ("not_drawn_single", "not drawn single ↓", False), ("not_drawn_combined", "not drawn combined ↓", False),
    ("extra_rate_single", "extra objects single ↓", False),
    ("extra_rate_combined", "extra objects combined ↓", False),
    ("text_alignment", "text alignment ↑", True),
]
COMPOSITION: list[Column] = [
    ("fidelity_cp", "fidelity ↑", True), ("shape_right", "shape right ↑", True),
    ("not_drawn", "not drawn ↓", False), ("extra_rate", "extra objects ↓", False),
    ("colour_leak", "colour leakage ↓", False), ("cp_leak", "colour+pattern leakage ↓", False),
]
CHART = [("iou_trigger_own_share", "trigger IoU own / ceiling ↑"), ("iou_trigger_other", "trigger IoU other ↓"),
         ("fidelity_cp_single", "fidelity single ↑"), ("fidelity_cp_combined", "fidelity combined ↑"),
         ("colour_leak_combined", "colour leakage combined ↓"), ("colour_leak_single", "colour swap single ↓"),
         ("not_drawn_combined", "not drawn combined ↓"), ("extra_rate_single", "extra objects single ↓")]
DEFINITIONS = (
    "**Evaluation v2** (issue 18; `dev/smallworld_lab/evaluate.py`). Drawn objects are matched one-to-one to the "
    "concepts (Hungarian assignment on the attribute distance, shape first: the class word names it; an "
    "object never matches a concept it shares no attribute with, nor one whose shape is another prompted "
    "concept's). A concept without an object is *not drawn*, never leakage; objects left over are *extra "
    "objects* (share of pictures with any), and they cannot raise a score: duplicates as plausible as the "
    "matched object are scored with it, on the worst of them. *Fidelity* is the share of colour and pattern "
    "right on the matched object (0 when not drawn); *shape right* apart. *Colour leakage* (main figure, "
    "colour is read exactly) is the share of (drawn concept, other concept) pairs where the concept's "
    "object has the other's colour: in the combined caption, and in single prompts as *appearance swap* "
    "(the other concept's colour on the lone concept). *Colour+pattern* leakage counts both attributes "
    "(patterns are drawn less reliably than colours). In brackets each leakage's "
    "*chance level*: with U the values of an attribute no concept of the scene has, an object showing one "
    "of them counts 1/|U| (how often one given unasked value turns up, so how often the other concept's "
    "would by chance alone). *IoU / ceiling*: the soft IoU of the map with its own object as a share of "
    "the IoU of that object's mask pooled to the map's resolution and scored the same way (the "
    "*IoU ceiling*, its own column in the attention table; a map equal to the pooled mask scores 1.00 on "
    "IoU / ceiling). Means are over scenes of each scene's "
    "pooled values; intervals are paired 95 % bootstrap intervals, scenes resampled, then seeds.")


def scene_means(rows: Sequence[Mapping]) -> dict[str, float]:
    """Mean over scenes of every numeric metric: each scene's mean over its rows (training seeds)
    first, so every scene weighs the same, each over the rows that have the metric."""
    skip = {"scene", "seconds", "seeds", "train_seed"}
    keys = dict.fromkeys(k for r in rows for k, v in r.items()
                         if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool))
    by_scene: dict = {}
    for r in rows:
        by_scene.setdefault(r.get("scene"), []).append(r)

    def mean(values: list) -> float:
        return sum(values) / len(values)

    out = {}
    for k in keys:
        per_scene = [mean([r[k] for r in runs if k in r]) for runs in by_scene.values() if any(k in r for r in runs)]
        out[k] = mean(per_scene)
    return out


def chance_key(key: str) -> str:
    """'colour_leak_single' -> 'colour_leak_chance_single'; 'colour_leak' -> 'colour_leak_chance'."""
    for suffix in ("_single", "_combined"):
        if key.endswith(suffix):
            return key[: -len(suffix)] + "_chance" + suffix
    return key + "_chance"


def table(summary: Mapping[str, Mapping[str, float]], columns: Sequence[Column], first: str = "variant",
          chances: bool = False, extra: Mapping[str, str] | None = None) -> str:
    """Rows as given, the columns every row has; the best value in bold, chance levels in brackets.

    ``extra``: one more column, its ``title`` and a cell per row name.
    """
    columns = [c for c in columns if summary and all(c[0] in s for s in summary.values())]
    if not columns:
        return ""
    best = {k: (max if up else min)(s[k] for s in summary.values()) for k, _, up in columns
            if len({round(s[k], 2) for s in summary.values()}) > 1}  # no bold where all rows agree
    with_chance = {k for k, _, _ in columns if chances and all(chance_key(k) in s for s in summary.values())}
    head = [t + (" (chance)" if k in with_chance else "") for k, t, _ in columns] + ([extra["title"]] if extra else [])
    lines = [f"| {first} | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for name, s in summary.items():
        cells = []
        for key, _, _ in columns:
            cell = f"**{s[key]:.2f}**" if key in best and abs(s[key] - best[key]) < 1e-9 else f"{s[key]:.2f}"
            if key in with_chance:
                cell += f" ({s[chance_key(key)]:.2f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells + ([extra[name]] if extra else [])) + " |")
    return "\n".join(lines)


def differences(rows: Mapping[str, Sequence[Mapping]], reference: str, keys: Sequence[Column],
                paired_difference: Callable, title: str, reference_first: bool) -> str:
    """Paired differences with ``reference`` and their 95 % bootstrap intervals, a table.

    ``reference_first``: "reference − other" (DisenDiff − Custom Diffusion), one row per metric and
    a column per other variant; else "other − reference", one row per other (mode) and a column per metric.
    """
    if reference not in rows:
        return ""
    others = [name for name in rows if name != reference and rows[name]]
    usable = [(k, t) for k, t, _ in keys
              if all(k in r.get("per_seed", {}) for name in [reference, *others] for r in rows[name])]
    if not others or not usable:
        return ""

    def cell(name: str, key: str) -> str:
        a, b = (reference, name) if reference_first else (name, reference)
        return "{:+.3f} [{:+.3f}, {:+.3f}]".format(*paired_difference(rows[a], rows[b], key))

    if reference_first:
        head = [f"{reference} − {name}" for name in others]
        lines = [(t, [cell(n, k) for n in others]) for k, t in usable]
    else:
        head, lines = [t for _, t in usable], [(n, [cell(n, k) for k, _ in usable]) for n in others]
    out = [f"| {title} | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    return "\n".join(out + [f"| {label} | " + " | ".join(cells) + " |" for label, cells in lines])


def targets_table(summary: Mapping[str, Mapping[str, float]], rows: Mapping[str, Sequence[Mapping]],
                  paired_difference: Callable) -> str:
    """DisenDiff against issue 18's targets (met or not), leakage against half of Custom Diffusion's."""
    ours = summary.get("DisenDiff")
    if not ours:
        return ""
    checks = [("iou_trigger_own_share", "trigger IoU own ≥ 0.8 × ceiling", lambda v: v >= 0.8),
              ("iou_trigger_other", "trigger IoU other ≤ 0.1", lambda v: v <= 0.1),
              ("fidelity_cp_single", "fidelity single ≥ 0.8", lambda v: v >= 0.8),
              ("fidelity_cp_combined", "fidelity combined ≥ 0.8", lambda v: v >= 0.8),
              ("extra_rate_single", "extra objects single ≤ 0.1", lambda v: v <= 0.1)]
    lines = ["| target | DisenDiff | met? |", "|---|---|---|"]
    lines += [f"| {label} | {ours[key]:.2f} | {'yes' if met(ours[key]) else 'no'} |"
              for key, label, met in checks if key in ours]
    key, baseline = "colour_leak_combined", summary.get("Custom Diffusion", {})
    usable = all(key in r.get("per_seed", {}) for name in ("DisenDiff", "Custom Diffusion") for r in rows.get(name, []))
    if key in ours and key in baseline and usable:
        difference, low, high = paired_difference(rows["DisenDiff"], rows["Custom Diffusion"], key)
        met = ours[key] <= baseline[key] / 2 and high < 0
        lines.append(f"| colour leakage combined ≤ half of Custom Diffusion's ({baseline[key]:.2f}), interval "
                     f"excluding zero | {ours[key]:.2f}, {difference:+.3f} [{low:+.3f}, {high:+.3f}] | "
                     f"{'yes' if met else 'no'} |")
        half = (high - low) / 2  # the study is sized for this (issue 18)
        lines.append(f"| the study's size: interval on colour leakage narrower than ±0.05 | ±{half:.3f} | "
                     f"{'yes' if half < 0.05 else 'no'} |")
    return "\n".join(lines)


def composition_section(per_mode: Mapping[str, Sequence[Mapping]], paired_difference: Callable) -> str:
    """Markdown: the composition modes (separately learned concepts), means over scenes, vs combined."""
    summary = {mode: scene_means(rows) for mode, rows in per_mode.items()}
    sizes = {mode: f"{len(rows)} × {rows[0].get('seeds', '?')}" for mode, rows in per_mode.items()}
    main = table(summary, COMPOSITION, "composition", chances=True, extra={"title": "scenes × seeds", **sizes})
    versus = differences(per_mode, "combined", COMPOSITION, paired_difference,
                         "against combined (95 % paired bootstrap)", reference_first=False)
    return ("\n## Composition of separately learned concepts\n\nEach object learned on its own (one concept "
            "set per object, trained with its mask); the combined caption sampled with the sets composed by "
            "each mode of `dev/smallworld_lab/composition.py` (its docstring describes them); `single` samples each "
            "concept alone with its own set (its leakage is the appearance swap: the floor no composition "
            "goes below).\n\n" + main + ("\n\n" + versus if versus else "") + "\n")


def render(raw: Mapping, paired_difference: Callable) -> tuple[str, dict[str, dict[str, float]], list]:
    """The report's body after the settings line, the per-variant summary and the chart's metrics."""
    rows = {name: r for name, r in raw["rows"].items() if r}
    summary = {name: scene_means(r) for name, r in rows.items()}
    parts = [DEFINITIONS]
    for title, columns, chances in (("Attention maps on the training image", ATTENTION, False),
                                    ("Leakage (chance level in brackets)", LEAKAGE, True),
                                    ("Fidelity, objects drawn and extra objects", PICTURES, False)):
        text = table(summary, columns, chances=chances)
        if text:
            parts.append(f"## {title}\n\n{text}")
    versus = differences(rows, "DisenDiff", ATTENTION[:-1] + LEAKAGE + PICTURES, paired_difference,
                         "metric (95 % paired bootstrap)", reference_first=True)
    if versus:
        parts.append("## DisenDiff against the other variants\n\n" + versus)
    targets = targets_table(summary, rows, paired_difference)
    if targets:
        parts.append("## DisenDiff against the targets\n\n" + targets)
    body = "\n\n".join(parts) + "\n"
    if raw.get("composition"):
        body += composition_section(raw["composition"], paired_difference)
    return body, summary, CHART
