"""Report helpers: per-seed value lists, a paired bootstrap, a grouped bar chart as a PNG (Pillow only).

Raw rows keep each metric's values per seed: ``per_seed[key][k]`` is the list of values that seed
``k``'s pictures gave (one per target, pair of concepts or picture, depending on the metric), so
that means pool every value of a scene and the bootstrap can resample scenes, then seeds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(52, 101, 164), (204, 0, 0), (115, 210, 22), (245, 121, 0), (117, 80, 123), (193, 125, 17),
           (85, 87, 83), (0, 150, 150)]


def bar_chart(summary: Mapping[str, Mapping[str, float]], metrics: Sequence[tuple[str, str]],
              path: Path, width: int = 1200, height: int = 520) -> Path:
    """One group of bars per metric (values in 0..1), one colour per variant, legend on top."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    variants = list(summary)
    metrics = [(k, t) for k, t in metrics if all(k in summary[v] for v in variants)]
    left, right, top, bottom = 50, 20, 30 + 18 * ((len(variants) + 3) // 4), height - 60
    for i, name in enumerate(variants):
        x, y = left + (i % 4) * 280, 8 + 18 * (i // 4)
        draw.rectangle([x, y + 2, x + 12, y + 14], fill=PALETTE[i % len(PALETTE)])
        draw.text((x + 18, y + 2), name, fill="black")
    for tick in range(0, 11, 2):
        y = bottom - (bottom - top) * tick / 10
        draw.line([left, y, width - right, y], fill=(220, 220, 220))
        draw.text((8, y - 6), f"{tick / 10:.1f}", fill="black")
    group = (width - left - right) / max(1, len(metrics))
    bar = group * 0.8 / max(1, len(variants))
    for m, (key, title) in enumerate(metrics):
        x0 = left + m * group + group * 0.1
        for i, name in enumerate(variants):
            value = max(0.0, min(1.0, float(summary[name][key])))
            draw.rectangle([x0 + i * bar, bottom - (bottom - top) * value, x0 + (i + 1) * bar - 2, bottom],
                           fill=PALETTE[i % len(PALETTE)])
        for j, line in enumerate(title.replace(" ↑", " (up)").replace(" ↓", " (down)").split(" ", 1)):
            draw_words(draw, (left + m * group + 6, bottom + 6 + 14 * j), line)
    draw.line([left, bottom, width - right, bottom], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def draw_words(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, gap: float = 5.0) -> None:
    """Draw ``text`` word by word: the default font's 2-pixel space runs words together ("swapsingle")."""
    x, y = xy
    for word in text.split():
        draw.text((x, y), word, fill="black")
        x += draw.textlength(word) + gap


def add_values(per_seed: dict, seed_index: int, values: Mapping[str, Sequence[float]], suffix: str = "") -> None:
    """Append one picture's values (``score_picture``'s lists) to ``per_seed[key + suffix][seed_index]``."""
    for key, found in values.items():
        lists = per_seed.setdefault(key + suffix, [])
        while len(lists) <= seed_index:
            lists.append([])
        lists[seed_index].extend(float(v) for v in found)


def pooled_means(per_seed: Mapping[str, Sequence[Sequence[float]]]) -> dict[str, float]:
    """Each key's mean over all its values, every seed pooled (keys without any value are left out)."""
    pooled = {key: [v for seed in seeds for v in seed] for key, seeds in per_seed.items()}
    return {key: float(np.mean(values)) for key, values in pooled.items() if values}


def paired_difference(rows_a: Sequence[Mapping], rows_b: Sequence[Mapping], key: str,
                      draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``key`` under A minus under B with a 95 % bootstrap interval: (difference, low, high).

    Rows are one per scene and training seed (``train_seed``, 0 when absent) with ``per_seed[key]``:
    per sample seed, the values of that image (the same seeds in A and B). A mode's mean is the
    mean over scenes of each scene's values pooled over its runs and seeds, as in the tables.
    Scenes are resampled, then training seeds within a scene (when it has several), then sample
    seeds within each run; the same draw is used for A and B, so the interval is of the paired
    difference.
    """
    runs_b = {(r["scene"], r.get("train_seed", 0)): r["per_seed"][key] for r in rows_b}
    scenes: dict[Any, list[tuple[Sequence, Sequence]]] = {}
    for r in rows_a:
        run = (r["scene"], r.get("train_seed", 0))
        if run in runs_b:
            scenes.setdefault(r["scene"], []).append((r["per_seed"][key], runs_b[run]))
    pairs = list(scenes.values())  # per scene: its runs, each (A's per-seed values, B's)
    if not pairs:
        raise ValueError(f"no scene has per-seed {key!r} values in both modes")

    def mean(index: Sequence[tuple[int, Sequence[tuple[int, Sequence[int]]]]], side: int) -> float:
        per_scene = [[v for run, seeds in runs for k in seeds for v in pairs[s][run][side][k]]
                     for s, runs in index]
        means = [float(np.mean(values)) for values in per_scene if values]
        return float(np.mean(means)) if means else 0.0

    def every(s: int, run: int) -> range:
        return range(len(pairs[s][run][0]))

    whole = [(s, [(run, every(s, run)) for run in range(len(pairs[s]))]) for s in range(len(pairs))]
    difference = mean(whole, 0) - mean(whole, 1)
    rng = np.random.default_rng(seed)

    def resample(s: int) -> tuple[int, list[tuple[int, Sequence[int]]]]:
        count = len(pairs[s])
        runs = [0] if count == 1 else [int(r) for r in rng.integers(0, count, count)]
        return s, [(run, rng.integers(0, len(every(s, run)), len(every(s, run)))) for run in runs]

    samples = []
    for _ in range(draws):
        index = [resample(int(s)) for s in rng.integers(0, len(pairs), len(pairs))]
        samples.append(mean(index, 0) - mean(index, 1))
    low, high = np.percentile(samples, [2.5, 97.5])
    return difference, float(low), float(high)
