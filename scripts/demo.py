"""Demo: in a real, headless ComfyUI, learn two concepts from one toy-world scene and use them.

    .venv/bin/python scripts/demo.py [--workflow FILE.json] [--steps N] [--tiny-random]

Starts ``main.py --cpu`` (from ``$COMFYUI_PATH`` or ``.comfyui``) with the pack linked into an extra
``custom_nodes`` dir, copies the shipped scene into its input folder and runs
``example_workflows/toy_world_two_concepts_api.json``: the toy-world base model learns "V1 square"
(an orange dotted square: a colour/pattern it has no words for) and "V2 diamond" from the one
picture, then draws them together and apart. Images, attention maps, the loss curve and the concept
file land in ``<repo>/output/``; the server is stopped by its PID. Exits nonzero, with the server
log tail, if anything fails. ``--tiny-random`` (also the fallback in a checkout without
``smallworld/weights``) runs the smoke workflow: txt2img on a tiny random SD1.5 model.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "dev"))

from devkit import workflows  # noqa: E402
from devkit.server import PACK_FOLDER_NAME, ComfyServer  # noqa: E402

WORKFLOW = REPO_ROOT / "example_workflows" / "toy_world_two_concepts_api.json"
SCENE = REPO_ROOT / "example_workflows" / "toy_world_scene.png"
log = logging.getLogger("demo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflow", type=Path, default=WORKFLOW, help="API-format workflow JSON")
    parser.add_argument("--steps", type=int, default=None, help="override the training steps")
    parser.add_argument("--tiny-random", action="store_true",
                        help="smoke test instead: txt2img on a tiny random SD1.5 model")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "output")
    parser.add_argument("--timeout", type=float, default=900.0)
    return parser.parse_args(argv)


def load_workflow(args: argparse.Namespace, server: ComfyServer) -> dict:
    """The API-format prompt to run, with the shipped scene placed in the server's input folder."""
    if not (REPO_ROOT / "smallworld" / "weights" / "unet.safetensors").is_file() and not args.tiny_random:
        log.warning("toy-world weights are missing from smallworld/weights (restore them with git, or "
                    "build them with benchmarks/pretrain_smallworld.py): running the tiny random smoke workflow")
        args.tiny_random = True
    if args.tiny_random:
        return workflows.tiny_txt2img("sd15", "a photo of a cat", seed=42, steps=4, size=256,
                                      filename_prefix="demo_sd15")
    shutil.copy2(SCENE, server.input_dir / SCENE.name)
    prompt = json.loads(args.workflow.read_text())
    if args.steps is not None:
        for node in prompt.values():
            if node["class_type"].endswith("TrainConcepts"):
                node["inputs"]["steps"] = args.steps
    return prompt


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[demo] %(message)s")
    args = parse_args(argv)
    server = ComfyServer()
    ok = False
    try:
        log.info("starting ComfyUI from %s (work dir %s)", server.comfy_root, server.workdir)
        server.start()
        log.info("ComfyUI up on %s in %.1fs", server.url, server.startup_s)
        pack_nodes = sorted(node_id for node_id, spec in server.object_info().items()
                            if spec.get("python_module") == f"custom_nodes.{PACK_FOLDER_NAME}")
        log.info("pack nodes loaded: %s", ", ".join(pack_nodes) or "NONE (see the server log)")

        prompt = load_workflow(args, server)
        started = time.monotonic()
        result = server.run(prompt, timeout=args.timeout)
        if not result.ok:
            raise RuntimeError(result.describe())
        log.info("workflow finished in %.2fs", time.monotonic() - started)

        args.output_dir.mkdir(parents=True, exist_ok=True)
        copied = []
        for image in server.output_images(result):
            target = args.output_dir / image.name
            shutil.copy2(image, target)
            copied.append(target)
        if not copied:
            raise RuntimeError("the workflow saved no image")
        for concept_file in sorted(server.concepts_dir.glob("*.safetensors")):
            target = args.output_dir / concept_file.name
            shutil.copy2(concept_file, target)
            copied.append(target)
        for target in copied:
            print(f"wrote {target}")
        ok = True
        return 0
    except Exception as exc:  # noqa: BLE001 - report anything, with the server's side of the story
        log.error("demo failed: %s", exc)
        print(f"----- ComfyUI server log tail ({server.log_path}) -----", file=sys.stderr)
        print(server.log_tail(8000), file=sys.stderr)
        return 1
    finally:
        server.stop()
        if ok:
            shutil.rmtree(server.workdir, ignore_errors=True)
        else:
            log.info("kept %s (server log, outputs) for inspection", server.workdir)


if __name__ == "__main__":
    sys.exit(main())
