"""docs/nodes.md is exactly what scripts/gen_node_docs.py renders from the node schemas."""
from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "gen_node_docs.py"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_node_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_node_docs_match_the_schemas():
    generator = _generator()
    generator.library_mode()
    rendered = generator.render()
    committed = generator.DOC_PATH.read_text(encoding="utf-8") if generator.DOC_PATH.is_file() else ""
    if rendered != committed:
        diff = "".join(list(difflib.unified_diff(committed.splitlines(True), rendered.splitlines(True),
                                                 "docs/nodes.md (committed)", "rendered"))[:60])
        raise AssertionError(f"docs/nodes.md is out of date with the node schemas: run "
                             f"`{generator.REGENERATE}` and commit docs/nodes.md\n{diff}")


def test_every_node_input_and_output_is_documented():
    generator = _generator()
    generator.library_mode()
    schemas = generator.node_schemas()
    page = generator.render(schemas)
    for schema in schemas:
        section = page.split(f"`{schema.node_id}` · ", 1)[1].split("\n## ", 1)[0]
        for inp in schema.inputs:
            assert f"| `{inp.id}`" in section, (schema.node_id, inp.id)
        assert section.count("\n| ") >= len(schema.inputs) + len(schema.outputs) + 2
