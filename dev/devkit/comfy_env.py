"""ComfyUI as a library for tests, scripts and benchmarks: where it lives and the one start-up."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from .pack import REPO_ROOT, install_alias

ATTENTION_FLAGS = {"pytorch": "use_pytorch_cross_attention", "sub-quad": "use_quad_cross_attention",
                   "split": "use_split_cross_attention"}


def comfy_root() -> Path:
    """The ComfyUI tree: ``$COMFYUI_PATH`` if set, else the copy made by ``scripts/setup_env.sh``."""
    root = Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".comfyui").resolve()
    if not (root / "main.py").is_file():
        raise RuntimeError(
            f"no ComfyUI at {root}: run `bash scripts/setup_env.sh` (or set COMFYUI_PATH to a checkout)")
    return root


def resolve_device(name: str) -> str:
    """``"auto"`` is ``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    return name


def start(device: str = "cpu", attention: str = "auto") -> str:
    """The pack alias ``concept_attention`` and ComfyUI on ``sys.path``, in library mode.

    Must run before ``comfy.model_management`` is imported: on ``"cpu"`` it forces ComfyUI's CPU
    mode. ``attention`` picks ComfyUI's attention function like its command-line flags (``"auto"``
    keeps ComfyUI's choice: sub-quadratic on CPU, PyTorch SDPA on CUDA). Returns the device name.
    """
    device = resolve_device(device)
    install_alias()
    root = str(comfy_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args

        args.cpu = device == "cpu"
        if attention != "auto":
            setattr(args, ATTENTION_FLAGS[attention], True)
    return device
