#!/usr/bin/env bash
# One bounded run of the toy base model's pretraining on a lent GPU (or, to try it, on the CPU).
#
#   bash scripts/gpu_pretrain_smallworld.sh prepare [FROM_DIR]
#       here: fills the ignored folder .gpu_carry/ with what the GPU machine lacks (ComfyUI's
#       python tree without its large tokenizer data, the torchsde/trampoline wheels) and the
#       weights to start from (FROM_DIR: an export of a run, default smallworld/weights).
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
CARRY=.gpu_carry
PY="${PYTHON:-python3}"

prepare() {
  local from="${1:-smallworld/weights}"
  local comfy="${COMFYUI_PATH:-.comfyui}"
  rm -rf "$CARRY.partial" && mkdir -p "$CARRY.partial/whl" "$CARRY.partial/from"
  # ComfyUI as a library: its python files and the SD1.x tokenizer, not the other models' vocabularies.
  (cd "$comfy" && find . -name '*.py' -o -path './comfy/sd1_tokenizer/*' -o -name 'sd1_clip_config.json' \
     | grep -v -e '/tests' -e '/custom_nodes/' | tar -cf - -T -) | tar -xf - -C "$CARRY.partial" --one-top-level=comfyui
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$CARRY.partial/whl" torchsde==0.2.6 trampoline==0.1.2
  cp "$from"/unet.safetensors "$from"/clip_l.safetensors "$from"/taesd.safetensors "$CARRY.partial/from/"
  rm -rf "$CARRY" && mv "$CARRY.partial" "$CARRY"
  du -sh "$CARRY"
}

run() {
  local minutes="$1"; shift
  local out="${OUT:-/tmp/gpu_pretrain_out}" device=cuda extra=()
  while [ $# -gt 0 ]; do
    if [ "$1" = --device ]; then device="$2"; shift 2; else extra+=("$1"); shift; fi
  done
  mkdir -p "$out"
  if ! "$PY" -c "import torchsde" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$CARRY"/whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export COMFYUI_PATH="$PWD/$CARRY/comfyui" PYTHONUNBUFFERED=1
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
