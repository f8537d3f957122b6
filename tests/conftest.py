"""Shared pytest set-up: the pack alias and the ComfyUI location."""
from __future__ import annotations

import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from pack_alias import install_alias  # noqa: E402

install_alias()
