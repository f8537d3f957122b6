"""Import this repository as the package ``concept_attention`` without running its ``__init__``.

ComfyUI has a top-level ``nodes`` module, so the pack's own ``nodes/`` (and friends) must never be
imported as top-level packages. ComfyUI imports the pack under its folder name; tests import it
under this fixed alias, and the pack's code uses relative imports only.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

PACK_NAME = "concept_attention"
REPO_ROOT = Path(__file__).resolve().parents[2]


def install_alias() -> types.ModuleType:
    """Register ``concept_attention`` as a namespace-like package rooted at the repository."""
    existing = sys.modules.get(PACK_NAME)
    if existing is not None:
        return existing
    module = types.ModuleType(PACK_NAME)
    module.__path__ = [str(REPO_ROOT)]
    module.__file__ = str(REPO_ROOT / "__init__.py")
    module.__package__ = PACK_NAME
    sys.modules[PACK_NAME] = module
    return module
