"""Where ComfyUI lives for tests, and how to import it as a library."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def comfy_root() -> Path:
    """The ComfyUI tree: ``$COMFYUI_PATH`` if set, else the copy made by ``scripts/setup_env.sh``."""
    root = Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".comfyui").resolve()
    if not (root / "main.py").is_file():
        raise RuntimeError(
            f"no ComfyUI at {root}: run `bash scripts/setup_env.sh` (or set COMFYUI_PATH to a checkout)")
    return root


def enable_library_mode() -> Path:
    """Put ComfyUI on ``sys.path`` and force CPU before ``comfy.model_management`` is imported."""
    root = comfy_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args

        args.cpu = True
    return root
