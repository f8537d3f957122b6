"""Demo: run the real ComfyUI headless with this pack installed and generate an image.

    .venv/bin/python scripts/demo.py [--arch sd15|sdxl] [--prompt TEXT] [--steps N] [--size PX]

Starts ``main.py --cpu`` (from ``$COMFYUI_PATH`` or ``.comfyui``) with the pack linked into an extra
``custom_nodes`` dir, runs a tiny txt2img workflow on a tiny random model, copies the saved
image(s) to ``<repo>/output/`` and stops the server by its PID. Exits nonzero, with the server log
tail, if anything fails. The images are noise-like by design: the model's weights are random.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from support import workflows  # noqa: E402
from support.server import PACK_FOLDER_NAME, ComfyServer  # noqa: E402

log = logging.getLogger("demo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--prompt", default="a photo of a cat sitting on a wooden chair")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "output")
    parser.add_argument("--timeout", type=float, default=300.0)
    return parser.parse_args(argv)


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

        prompt = workflows.tiny_txt2img(args.arch, args.prompt, seed=args.seed, steps=args.steps,
                                        size=args.size, filename_prefix=f"demo_{args.arch}")
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
