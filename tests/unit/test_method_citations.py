"""Every ``docs/method.md §N`` a comment, docstring or test cites is a section of that page."""
from __future__ import annotations

import re
from pathlib import Path

from devkit.pack import REPO_ROOT

METHOD_DOC = REPO_ROOT / "docs" / "method.md"
CITATION = re.compile(r"docs/method\.md`{0,2}\s*((?:§\d+(?:\s*(?:,|-|–|and)\s*)?)+)")
SKIPPED_DIRS = {".venv", ".comfyui", ".git", "node_modules", "__pycache__"}


def _sections() -> set[int]:
    headings = re.findall(r"^#{2,4} (\d+)\. ", METHOD_DOC.read_text(encoding="utf-8"), flags=re.M)
    return {int(n) for n in headings}


def _python_files() -> list[Path]:
    return [p for p in REPO_ROOT.rglob("*.py")
            if not SKIPPED_DIRS & set(p.relative_to(REPO_ROOT).parts)]


def _citations() -> list[tuple[str, int]]:
    found = []
    for path in _python_files():
        for match in CITATION.finditer(path.read_text(encoding="utf-8")):
            found += [(str(path.relative_to(REPO_ROOT)), int(n)) for n in re.findall(r"§(\d+)", match.group(1))]
    return found


def test_method_doc_sections_are_numbered_one_to_n() -> None:
    sections = _sections()
    assert sections == set(range(1, max(sections) + 1))


def test_every_method_citation_names_an_existing_section() -> None:
    citations = _citations()
    assert len(citations) >= 8  # the pack cites the page from calibration, nested attention, adapters, tests
    missing = [(where, n) for where, n in citations if n not in _sections()]
    assert not missing, f"citations of docs/method.md sections that do not exist: {missing}"
