"""Learnability gate of a toy-world base model: does the baseline learn a hidden object from one scene?

    .venv/bin/python benchmarks/learnability_smallworld.py [--weights DIR] [--scenes 3] [--raw FILE]
    .venv/bin/python benchmarks/learnability_smallworld.py --from-raw FILE   # the rates again
    .venv/bin/python benchmarks/learnability_smallworld.py --set steps=400 --sample-seeds 8   # a recipe candidate
    .venv/bin/python benchmarks/learnability_smallworld.py --scenes 6 --scene-ids 2,3,4,5   # some of the dev scenes
    .venv/bin/python benchmarks/learnability_smallworld.py --freeze kv   # what trains: only the trigger embeddings

The CI test's protocol (``dev/smallworld_lab/learnability.py``): Custom Diffusion with the default
toy-world recipe learns every object of each dev scene; each hidden object is sampled with the
recipe's seeds and read back, matched one-to-one; rates count samples whose training object the
read-out gets right after a VAE round trip. Prints the gate (scenes' first objects), the rates
of every hidden object beside it and, where rows keep what was drawn, what the first objects' colour
misses were drawn with; ``--raw`` keeps one row per sample.
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
    parser.add_argument("--scene-ids", default=None, metavar="I,J",
                        help="run only these of the --scenes dev scenes (rows keep the scene's index)")
    parser.add_argument("--raw", type=Path, default=None, help="write one row per sample (JSON) here")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="try another recipe: change one ExperimentSettings field (e.g. learning_rate=1e-3)")
    parser.add_argument("--freeze", choices=("kv", "embeddings"), default=None,
                        help="what trains: keep the K/V projections (textual inversion) or the embeddings "
                             "(K/V only) as the base has them; default: both train, as in Custom Diffusion")
    parser.add_argument("--sample-seeds", type=int, default=None, metavar="N",
                        help="sample seeds 11 .. 10+N (default: the recipe's 4)")
    parser.add_argument("--train-seed", type=int, default=None, metavar="N",
                        help="seed of the training runs (augmentation, timesteps, noise; default: the recipe's 0)")
    parser.add_argument("--from-raw", type=Path, default=None, help="print the rates of saved rows")
    bench.add_machine_arguments(parser, device="cpu")
    return parser.parse_args(argv)


def chosen_scenes(text: str | None, count: int) -> list[int]:
    """The scene indices ``--scene-ids`` names (default: all ``count``), checked against ``--scenes``."""
    if text is None:
        return list(range(count))
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--scene-ids {text!r}: write whole numbers separated by commas, e.g. 2,3") from None
    if any(i < 0 or i >= count for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"--scene-ids {text!r}: each index once, from 0 to {count - 1} (--scenes {count}; "
                         f"raise --scenes to reach a higher index)")
    return ids


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    bench.start_benchmark(args)
    from smallworld_lab import learnability
    from smallworld_lab import study
    from concept_attention.smallworld import model as toy

    if args.from_raw:
        chosen = [flag for flag, value in (("--set", args.set), ("--scene-ids", args.scene_ids),
                                           ("--freeze", args.freeze), ("--sample-seeds", args.sample_seeds),
                                           ("--train-seed", args.train_seed is not None)) if value]
        if chosen:
            logging.error("%s choose what a run trains and samples; --from-raw only prints saved rows",
                          ", ".join(chosen))
            return 2
        saved = json.loads(args.from_raw.read_text())
        rows = [learnability.LearnedSample(**row) for row in saved["rows"]]
        scenes = learnability.dev_scenes(saved.get("scenes", 1 + max((row.scene for row in rows), default=0)))
    else:
        started, rows = time.monotonic(), []
        try:
            overrides = study.parse_overrides(args.set)
            settings = study.settings_with(overrides, args.sample_seeds)
            if args.train_seed is not None:
                if args.train_seed < 0:
                    raise ValueError(f"--train-seed must be a whole number of at least 0, got {args.train_seed}")
                settings = dataclasses.replace(settings, seed=args.train_seed)
            scene_ids = chosen_scenes(args.scene_ids, args.scenes)
        except ValueError as error:
            logging.error("%s", error)
            return 2
        what_trains = {f"train_{args.freeze}": False} if args.freeze else {}
        digests = toy.weights_sha256(args.weights)  # read before loading, so they name the files the run loaded
        bundle = toy.load_bundle(args.weights)
        scenes = learnability.dev_scenes(args.scenes)
        for i in scene_ids:
            rows += learnability.learn_scene(bundle, i, scenes[i], settings, what_trains)
            logging.info("scene %d done after %.0f s", i, time.monotonic() - started)
        if args.raw:
            payload = {"weights": str(args.weights), "scenes": args.scenes, "scene_ids": scene_ids,
                       **{f"{name}_sha256": digest for name, digest in digests.items()},
                       "settings": dataclasses.asdict(settings),
                       "overrides": overrides, "what_trains": what_trains,
                       "rows": [dataclasses.asdict(r) for r in rows]}
            args.raw.write_text(json.dumps(payload, indent=1, default=str))
    gate = learnability.rates(rows)
    print(f"first objects (the gate): {gate} -> {'pass' if learnability.passed(gate) else 'FAIL'} "
          f"(colour >= {learnability.COLOUR_GATE}, colour+pattern >= {learnability.COLOUR_PATTERN_GATE})")
    print(f"every hidden object: {learnability.rates(rows, first_only=False)}")
    if any(row.drawn_colour for row in rows):
        misses = learnability.colour_misses(rows, scenes)
        print(f"first objects' colour misses, as drawn: {misses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
