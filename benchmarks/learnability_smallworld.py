"""Learnability gate of a toy-world base model: does the baseline learn a hidden object from one scene?

    .venv/bin/python benchmarks/learnability_smallworld.py [--weights DIR] [--scenes 3] [--raw FILE]
    .venv/bin/python benchmarks/learnability_smallworld.py --from-raw FILE   # the rates again
    .venv/bin/python benchmarks/learnability_smallworld.py --set steps=400 --sample-seeds 8   # a recipe candidate

The CI test's protocol (``dev/smallworld_lab/learnability.py``): Custom Diffusion with the default
toy-world recipe learns every object of each dev scene; each hidden object is sampled with the
recipe's seeds and read back, matched one-to-one; rates count samples whose training object the
read-out gets right after a VAE round trip. Prints the gate (scenes' first objects) and the rates
of every hidden object beside it; ``--raw`` keeps one row per sample.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dev"))
from devkit import bench  # noqa: E402
from devkit.pack import REPO_ROOT  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=REPO_ROOT / "smallworld" / "weights")
    parser.add_argument("--scenes", type=int, default=3, help="dev scenes (the CI test uses 3)")
    parser.add_argument("--raw", type=Path, default=None, help="write one row per sample (JSON) here")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="try another recipe: change one ExperimentSettings field (e.g. learning_rate=1e-3)")
    parser.add_argument("--sample-seeds", type=int, default=None, metavar="N",
                        help="sample seeds 11 .. 10+N (default: the recipe's 4)")
    parser.add_argument("--from-raw", type=Path, default=None, help="print the rates of saved rows")
    bench.add_machine_arguments(parser, device="cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    bench.start_benchmark(args)
    from smallworld_lab import learnability
    from smallworld_lab import study
    from concept_attention.smallworld import model as toy

    if args.from_raw:
        rows = [learnability.LearnedSample(**row) for row in json.loads(args.from_raw.read_text())["rows"]]
    else:
        started, rows = time.monotonic(), []
        try:
            overrides = study.parse_overrides(args.set)
            settings = study.settings_with(overrides, args.sample_seeds)
        except ValueError as error:
            logging.error("%s", error)
            return 2
        bundle = toy.load_bundle(args.weights)
        for i, scene in enumerate(learnability.dev_scenes(args.scenes)):
            rows += learnability.learn_scene(bundle, i, scene, settings)
            logging.info("scene %d done after %.0f s", i, time.monotonic() - started)
        if args.raw:
            payload = {"weights": str(args.weights), "scenes": args.scenes,
                       "settings": dataclasses.asdict(settings),
                       "overrides": overrides, "rows": [dataclasses.asdict(r) for r in rows]}
            args.raw.write_text(json.dumps(payload, indent=1, default=str))
    gate = learnability.rates(rows)
    print(f"first objects (the gate): {gate} -> {'pass' if learnability.passed(gate) else 'FAIL'} "
          f"(colour >= {learnability.COLOUR_GATE}, colour+pattern >= {learnability.COLOUR_PATTERN_GATE})")
    print(f"every hidden object: {learnability.rates(rows, first_only=False)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
