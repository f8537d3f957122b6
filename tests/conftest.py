"""Shared pytest set-up: the pack alias and ComfyUI in library mode (``dev/devkit``)."""
from __future__ import annotations

from devkit.comfy_env import start

start("cpu")
