"""Concept Attention: learn several concepts from one picture (DisenDiff) and compose them in ComfyUI.

ComfyUI imports this folder as a package and calls ``comfy_entrypoint``. Everything that needs
ComfyUI lives in ``nodes/``; ``attention/``, ``concepts/``, ``sampling/`` and ``training/`` are importable without it.
"""
from __future__ import annotations

from .nodes import ConceptAttentionExtension, register_model_folders

WEB_DIRECTORY = "./web"

register_model_folders()


async def comfy_entrypoint() -> ConceptAttentionExtension:
    """V3 entry point: registers the front end's read-only routes, returns the node list's owner."""
    from .nodes.web_api import register_routes

    register_routes()
    return ConceptAttentionExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
