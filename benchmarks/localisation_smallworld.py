"""Localisation report of a toy-world base model: do its class words' maps find their objects?

    .venv/bin/python benchmarks/localisation_smallworld.py [--weights DIR] [--raw FILE]
    .venv/bin/python benchmarks/localisation_smallworld.py --from-raw FILE   # the table again

Held-out scenes of the pretraining distribution, every layer group and noise level: class-word
soft IoU against its ceiling, mass on the own object / other objects / background, thresholded
IoU and argmax assignment (protocol: ``dev/smallworld_lab/localisation.py``, ``docs/toy_world.md``). Prints
a markdown table and the acceptance gates at ``--gate-group``.
"""
from __future__ import annotations

import argparse
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
    parser.add_argument("--scenes", type=int, default=24, help="held-out scenes")
    parser.add_argument("--seeds", type=int, default=2, help="noise draws per scene and level")
    parser.add_argument("--gate-group", default=None, help="layer group the gates are checked at "
                        "(default: the toy world's calibration layers, CALIBRATION_LAYERS in smallworld/model.py)")
    parser.add_argument("--raw", type=Path, default=None, help="write the raw rows (JSON) here")
    parser.add_argument("--from-raw", type=Path, default=None, help="print the table of saved rows")
    bench.add_machine_arguments(parser, device="cpu")
    parser.add_argument("--levels", default=None, help="comma list of the noise levels to print rows for "
                        "(the averages always use all), e.g. 0.05,0.45,0.95")
    return parser.parse_args(argv)


def gate_lines(report, group: str) -> str:
    """One line per acceptance gate."""
    names = {"soft_low": "soft IoU / ceiling, t ≤ 0.5", "soft_uniform": "soft IoU / ceiling, uniform t",
             "thresholded_objects": "objects with thresholded IoU ≥ 0.5, t ≤ 0.5",
             "argmax": "argmax assignment, t ≤ 0.5"}
    return "\n".join(f"- {names[k]} at {group}: {v:.2f} (gate ≥ {need:.2f}) {'pass' if ok else 'FAIL'}"
                     for k, (v, need, ok) in report.gates(group).items())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    bench.start_benchmark(args, attention="pytorch")
    from smallworld_lab import localisation as loc
    from concept_attention.smallworld import model as toy

    if args.from_raw:
        report = loc.LocalisationReport.from_json(args.from_raw.read_text())
    else:
        started = time.monotonic()
        scenes = loc.held_out_scenes(args.scenes)
        report = loc.localisation_report(toy.load_bundle(args.weights), scenes, seeds=args.seeds)
        logging.info("measured %d scenes x %d draws in %.0f s", len(scenes), args.seeds, time.monotonic() - started)
        if args.raw:
            args.raw.parent.mkdir(parents=True, exist_ok=True)
            args.raw.write_text(report.to_json())
    levels = [float(v) for v in args.levels.split(",")] if args.levels else None
    print(report.table(levels))
    print(gate_lines(report, args.gate_group or toy.CALIBRATION_LAYERS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
