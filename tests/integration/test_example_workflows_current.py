"""The committed UI example workflows are what scripts/build_example_workflows.py writes today."""
from __future__ import annotations

import subprocess
import sys

from devkit.pack import REPO_ROOT


def test_example_workflows_are_up_to_date():
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "build_example_workflows.py"),
                           "--check"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
