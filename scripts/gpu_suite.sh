#!/usr/bin/env bash
# Issue 21's speed figures on a lent GPU machine, in one call: benchmarks/gpu_suite.py.
#
#   bash scripts/gpu_suite.sh prepare
#       here: fills the ignored folder .gpu_carry/ with what the GPU machine lacks (ComfyUI's
#       python tree and two wheels: scripts/gpu_carry.sh), about 7 MB.
#   bash scripts/gpu_suite.sh run [--device cpu] [gpu_suite options...]
#       there (device tool: carry [".gpu_carry"], timeout_s 600): installs the wheels, runs the
#       suite (about 7 minutes on an H200) and writes $OUT/gpu_suite.md (the table),
#       $OUT/gpu_suite.json (its raw rows) and $OUT/gpu_suite.log; the table is also the last
#       thing printed. Here, `run --device cpu` is the smoke test with tiny models.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/gpu_carry.sh

prepare() {
  carry_begin
  carry_commit
}

run() {
  local out="${OUT:-/tmp/gpu_suite_out}"
  mkdir -p "$out"
  carry_install
  "$PY" benchmarks/gpu_suite.py --out "$out" "$@" 2>&1 | tee "$out/gpu_suite.log"
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 prepare | run [--device cpu] [gpu_suite options]" >&2; exit 2 ;;
esac
