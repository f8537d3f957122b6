"""The map of the repository holds: the installed pack imports only itself, in layer order.

The pack is what ComfyUI loads (``__init__.py`` and the folders below); the research harness
(``dev/smallworld_lab``), the development support (``dev/devkit``), the tests, scripts and
benchmarks import the pack, never the other way round.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Each package of the pack and the packages it may import (besides itself): a lower layer never
# imports a higher one.
LAYERS = {
    "attention": set(),
    "concepts": {"attention"},
    "sampling": {"attention", "concepts"},
    "training": {"attention", "concepts", "sampling"},
    "smallworld": {"attention", "concepts", "sampling", "training"},
    "nodes": {"attention", "concepts", "sampling", "training", "smallworld"},
}
OUTSIDE = {"dev", "devkit", "smallworld_lab", "tests", "support", "benchmarks", "scripts", "pack_alias"}


def _pack_files() -> list[Path]:
    return [REPO / "__init__.py"] + sorted(p for folder in LAYERS for p in (REPO / folder).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted target relative to the repository root or absolute) of every import in ``path``."""
    package = list(path.relative_to(REPO).parent.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
                found.append((node.lineno, "pack:" + target))
            else:
                found.append((node.lineno, node.module or ""))
    return found


def test_the_pack_has_the_folders_the_map_names():
    assert all((REPO / folder / "__init__.py").is_file() for folder in LAYERS)
    assert (REPO / "dev" / "devkit" / "__init__.py").is_file()


@pytest.mark.parametrize("path", _pack_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_pack_imports_only_itself_in_layer_order(path: Path):
    own = path.relative_to(REPO).parts[0] if path.parent != REPO else None
    for line, target in _imports(path):
        where = f"{path.relative_to(REPO)}:{line} imports {target}"
        top = target.removeprefix("pack:").split(".")[0]
        assert top not in OUTSIDE and "concept_attention" not in target, where
        if target.startswith("pack:") and own is not None and top and top != own:
            assert top in LAYERS[own], f"{where}: {own}/ may import only {sorted(LAYERS[own])}"
