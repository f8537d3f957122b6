"""Write the UI-format example workflows into ``example_workflows/`` (ComfyUI's template browser).

    .venv/bin/python scripts/build_example_workflows.py           # (re)write the files
    .venv/bin/python scripts/build_example_workflows.py --check   # exit 1 if a file is stale

Each graph is described in ``example_graphs_*.py``; widget values are ordered from the node
definitions (``node_defs.py``: ComfyUI's nodes and this pack's V3 schemas, in-process).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import example_graphs_concepts as concepts
import example_graphs_nested as nested
from node_defs import REPO_ROOT, load_definitions
from ui_workflow import Graph

OUT_DIR = REPO_ROOT / "example_workflows"
EXAMPLES: dict[str, Callable[[], Graph]] = {
    "sd15_learn_two_concepts": concepts.learn_two_concepts,
    "sd15_each_concept_alone": concepts.each_concept_alone,
    "sd15_combine_concepts": concepts.combine_sets,
    "sd15_regional_masks": concepts.regional_masks,
    "sd15_regional_auto": concepts.regional_auto,
    "sd15_merge_concepts": concepts.merge_sets,
    "sd15_inpaint_concept": concepts.inpaint_concept,
    "sd15_concepts_with_lora": concepts.with_stock_lora,
    "sd15_export_concepts": concepts.export_concepts,
    "sd15_use_exported_concepts": concepts.use_exported,
    "sd15_nested_token_bank": nested.nested_token_bank,
    "sd15_nested_image_adapter": nested.nested_image_adapter,
    "sd15_nested_ipadapter_plus": nested.nested_ipadapter_plus,
    "sd15_attention_maps": nested.attention_maps,
    "sdxl_learn_two_concepts": lambda: concepts.learn_two_concepts("sdxl"),
}


def render(defs: dict, name: str, build: Callable[[], Graph]) -> str:
    """One workflow as the JSON text written to disk."""
    return json.dumps(build().to_ui(defs, name), indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or check) every example workflow."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale or missing files")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    defs = load_definitions()
    stale = []
    for name, build in EXAMPLES.items():
        path = args.out / f"{name}.json"
        text = render(defs, name, build)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print("stale example workflows (run scripts/build_example_workflows.py): " + ", ".join(stale))
        return 1
    print(f"{len(EXAMPLES)} example workflows {'up to date' if args.check else 'written'} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
