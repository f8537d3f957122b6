"""Assemble the README's picture of the demo from ``output/`` (run ``bash scripts/demo.sh`` first).

    .venv/bin/python scripts/make_readme_figure.py [--output-dir output] [--out docs/images/toy_world_demo.png]

Rows: the one training picture, four samples of "a V1 square on a light blue background", four of
"a V1 square and a V2 diamond on a grey background", and the attention maps of V1/square/V2/diamond.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
ROWS = [  # (label, file prefix in output/)
    ("V1 square on light blue", "toy_demo_v1_alone"),
    ("V1 square and V2 diamond", "toy_demo_combined"),
    ("maps: V1, square, V2, diamond", "toy_demo_heatmaps"),
]
TILE, LABEL = 128, 16


def newest(output_dir: Path, prefix: str, count: int = 4) -> list[Path]:
    """The last ``count`` images ComfyUI saved under ``prefix`` (its counter grows per run)."""
    files = sorted(output_dir.glob(f"{prefix}_*.png"))
    if len(files) < count:
        raise SystemExit(f"{output_dir} has {len(files)} '{prefix}' images, need {count}: run bash scripts/demo.sh")
    return files[-count:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "output")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "images" / "toy_world_demo.png")
    args = parser.parse_args(argv)
    scene = Image.open(REPO_ROOT / "example_workflows" / "toy_world_scene.png").convert("RGB")
    figure = Image.new("RGB", (TILE * 5, (TILE + LABEL) * len(ROWS)), "white")
    draw = ImageDraw.Draw(figure)
    for row, (label, prefix) in enumerate(ROWS):
        top = row * (TILE + LABEL)
        if row == 0:
            figure.paste(scene.resize((TILE, TILE)), (0, top + LABEL))
            draw.text((4, top + 2), "training picture", fill="black")
        draw.text((TILE + 4, top + 2), label, fill="black")
        for col, path in enumerate(newest(args.output_dir, prefix)):
            tile = Image.open(path).convert("RGB").resize((TILE, TILE))
            figure.paste(tile, (TILE * (col + 1), top + LABEL))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.out, optimize=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
