"""Write ``docs/nodes.md`` from the pack's V3 node schemas: every node, input and output.

    .venv/bin/python scripts/gen_node_docs.py           # rewrite docs/nodes.md
    .venv/bin/python scripts/gen_node_docs.py --check   # exit 1 if docs/nodes.md is out of date

ComfyUI is imported in library mode (``.comfyui`` or ``$COMFYUI_PATH``, as the tests do). File
lists (``models/concepts`` and friends) are documented as the folder they come from, never as the
files of this machine, so the page is the same everywhere. ``tests/integration/test_node_docs.py``
fails when the committed page differs from what this script renders.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC_PATH = REPO_ROOT / "docs" / "nodes.md"
REGENERATE = ".venv/bin/python scripts/gen_node_docs.py"
FILE_LIST_MARK = "*.safetensors"  # how a folder's file list appears in a combo while rendering

log = logging.getLogger("gen_node_docs")


def library_mode() -> None:
    """Make ComfyUI and the pack (as ``concept_attention``) importable in this process."""
    dev = str(REPO_ROOT / "dev")
    if dev not in sys.path:
        sys.path.insert(0, dev)
    from devkit.comfy_env import start

    start("cpu")


class _EveryFolder(dict):
    """Model folder table that claims every folder exists (optional folders of other packs too)."""

    def __contains__(self, key: object) -> bool:
        return True


@contextlib.contextmanager
def folder_placeholders() -> Iterator[None]:
    """While schemas are built, every model folder exists and lists one placeholder naming it."""
    import folder_paths

    listing, table = folder_paths.get_filename_list, folder_paths.folder_names_and_paths
    folder_paths.get_filename_list = lambda folder: [f"models/{folder}/{FILE_LIST_MARK}"]
    folder_paths.folder_names_and_paths = _EveryFolder(table)
    try:
        yield
    finally:
        folder_paths.get_filename_list, folder_paths.folder_names_and_paths = listing, table


def node_schemas() -> list[Any]:
    """The V3 schema of every node of the pack, in menu order."""
    from concept_attention.nodes import node_list, register_model_folders

    register_model_folders()
    with folder_placeholders():
        return [cls.define_schema() for cls in node_list()]


def _cell(text: Any) -> str:
    """Markdown (e.g. inline code) safe inside a table cell."""
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def _text(text: Any) -> str:
    """Plain prose for the page: angle brackets and ampersands shown, not read as HTML."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _code(value: Any) -> str:
    """A value as inline code (strings JSON-quoted so empty strings and newlines show)."""
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, str):
        shown = json.dumps(value, ensure_ascii=False)
    else:
        shown = repr(value)
    return f"`{shown}`"


def _comfy_lists() -> dict[tuple[str, ...], str]:
    """ComfyUI's own choice lists, named instead of spelled out (they change with its version)."""
    import comfy.samplers

    return {tuple(comfy.samplers.KSampler.SAMPLERS): "ComfyUI's samplers (as in KSampler)",
            tuple(comfy.samplers.KSampler.SCHEDULERS): "ComfyUI's schedulers (as in KSampler)"}


def _options(options: list[Any]) -> str:
    """Combo choices; a folder placeholder is shown as the folder's files."""
    if len(options) and all(isinstance(o, str) and o.endswith(FILE_LIST_MARK) for o in options):
        return "a file of " + " or ".join(f"`{o}`" for o in options)
    named = _comfy_lists().get(tuple(options))
    if named:
        return named
    return "one of " + ", ".join(_code(o) for o in options)


def _range(inp: Any) -> str:
    """Range, step, choices or text kind of one input ('' for plain sockets)."""
    kind = inp.get_io_type()
    if kind == "COMBO":
        return _options(list(getattr(inp, "options", None) or []))
    parts = []
    low, high = getattr(inp, "min", None), getattr(inp, "max", None)
    if low is not None or high is not None:
        parts.append(f"{_code(low) if low is not None else '…'} to {_code(high) if high is not None else '…'}")
    if getattr(inp, "step", None) is not None:
        parts.append(f"step {_code(inp.step)}")
    if getattr(inp, "multiline", None):
        parts.append("multiline")
    return ", ".join(parts)


def _default(inp: Any) -> str:
    """The widget's default (a combo's first choice when it names none; '' for sockets)."""
    default = getattr(inp, "default", None)
    if default is None and inp.get_io_type() == "COMBO":
        options = list(getattr(inp, "options", None) or [])
        if options and not _options(options).startswith("a file"):
            default = options[0]
    return "" if default is None else _code(default)


def render_node(schema: Any) -> list[str]:
    """One node's section: title, ids, description, inputs and outputs tables."""
    title = schema.display_name or schema.node_id
    facts = [f"`{schema.node_id}`", f"category `{schema.category}`"]
    if schema.is_output_node:
        facts.append("output node")
    if schema.not_idempotent:
        facts.append("always re-runs")
    lines = [f"## {_text(title)}", "", " · ".join(facts), ""]
    if schema.description:
        lines += [_text(schema.description.strip()), ""]
    lines += ["| Input | Type | Default | Range / choices | Description |", "|---|---|---|---|---|"]
    for inp in schema.inputs:
        name = f"`{inp.id}`" + (" (optional)" if inp.optional else "")
        lines.append(f"| {name} | {inp.get_io_type()} | {_cell(_default(inp))} | {_cell(_range(inp))} | "
                     f"{_cell(_text(inp.tooltip or ''))} |")
    if not schema.inputs:
        lines.append("| (none) | | | | |")
    lines += ["", "| Output | Type | Description |", "|---|---|---|"]
    for index, out in enumerate(schema.outputs):
        name = out.display_name or out.id or out.get_io_type()
        listed = " (list)" if getattr(out, "is_output_list", False) else ""
        lines.append(f"| {index}: `{_cell(name)}`{listed} | {out.get_io_type()} | {_cell(_text(out.tooltip or ''))} |")
    if not schema.outputs:
        lines.append("| (none) | | |")
    return lines + [""]


def _anchor(title: str) -> str:
    """GitHub's heading anchor for ``title``."""
    kept = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


def render(schemas: list[Any] | None = None) -> str:
    """The whole page."""
    schemas = node_schemas() if schemas is None else schemas
    lines = ["# Nodes", "",
             f"Generated from the node schemas by `{REGENERATE}`; do not edit by hand (a test "
             "compares this page with the schemas). Optional inputs may be left unconnected; "
             "`models/<folder>/*.safetensors` stands for the files found in that folder.", "",
             "| Node | Id |", "|---|---|"]
    for schema in schemas:
        title = schema.display_name or schema.node_id
        lines.append(f"| [{_cell(_text(title))}](#{_anchor(title)}) | `{schema.node_id}` |")
    lines.append("")
    for schema in schemas:
        lines += render_node(schema)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` compare) docs/nodes.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether the page is current")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    library_mode()
    text = render()
    if args.check:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.is_file() else ""
        if current != text:
            log.error("%s is out of date: run `%s`", DOC_PATH.relative_to(REPO_ROOT), REGENERATE)
            return 1
        log.info("%s is up to date", DOC_PATH.relative_to(REPO_ROOT))
        return 0
    DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOC_PATH.write_text(text, encoding="utf-8")
    log.info("wrote %s (%d nodes)", DOC_PATH.relative_to(REPO_ROOT), text.count("\n## "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
