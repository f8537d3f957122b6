#!/usr/bin/env bash
# One bounded run of the toy base model's pretraining on a lent GPU (or, to try it, on the CPU).
#
#   bash scripts/gpu_pretrain_smallworld.sh prepare [FROM_DIR]
#       here: fills the ignored folder .gpu_carry/ with what the GPU machine lacks (ComfyUI's
#       python tree and two wheels: scripts/gpu_carry.sh) and the weights to start from
#       (FROM_DIR: an export of a run, default smallworld/weights).
#   bash scripts/gpu_pretrain_smallworld.sh run MINUTES [--device cpu] [pretrain options...]
#       there (device tool, carry [".gpu_carry"]): installs the wheels, seeds a work directory from
#       .gpu_carry/from, trains the UNet stage for MINUTES and writes the slim checkpoint (fp16 EMA
#       weights whose card names the step; `--init-from` resumes from it) to $OUT/weights, the log
#       to $OUT/pretrain.log, and prints the quality and two-object gates.
#
# Afterwards, here: `prepare DIR` with DIR the returned weights continues the run on the next GPU
# session, and `benchmarks/pretrain_smallworld.py --init-from DIR --work-dir NEW` continues it on the CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/gpu_carry.sh

prepare() {
  local from="${1:-smallworld/weights}"
  carry_begin
  mkdir -p "$CARRY.partial/from"
  cp "$from"/unet.safetensors "$from"/clip_l.safetensors "$from"/taesd.safetensors "$CARRY.partial/from/"
  carry_commit
}

run() {
  local minutes="$1"; shift
  local out="${OUT:-/tmp/gpu_pretrain_out}" device=cuda extra=()
  while [ $# -gt 0 ]; do
    if [ "$1" = --device ]; then device="$2"; shift 2; else extra+=("$1"); shift; fi
  done
  mkdir -p "$out"
  carry_install
  local work="${WORK_DIR:-/tmp/smallworld_gpu_work}"
  # The cosine schedule ends RUN_STEPS after the step the carried weights reached (an H200 does
  # about that many batches of 128 in 8 minutes); options given after MINUTES come last and win.
  "$PY" benchmarks/pretrain_smallworld.py --device "$device" --work-dir "$work" --init-from "$CARRY/from" \
    --out-dir "$out/weights" --max-minutes "$minutes" --export-when-stopped --two-object-samples 1 \
    --more-steps "${RUN_STEPS:-3000}" --batch 128 --lr 6e-4 --warmup 200 --supervision-weight 0.1 \
    --checkpoint-every 500 "${extra[@]}" 2>&1 | tee "$out/pretrain.log"
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 prepare [FROM_DIR] | run MINUTES [--device cpu] [pretrain options]" >&2; exit 2 ;;
esac
