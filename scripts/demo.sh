#!/usr/bin/env bash
# The README's main-job command: set up the environment if needed, then run the demo in a real,
# headless ComfyUI with this pack loaded. Output images land in output/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/demo.py" "$@"
