#!/usr/bin/env bash
# The README's test command: set up the environment if needed, then run every test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/unit -k nested`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
if [ "$#" -eq 0 ]; then set -- tests/unit tests/integration tests/e2e tests/browser; fi
# rootdir = tests/: the repository root is a ComfyUI package whose __init__ needs ComfyUI.
exec "$ROOT/.venv/bin/python" -m pytest -c tests/pytest.ini --rootdir tests "$@"
