# What every run on a lent GPU machine needs and the machine lacks, in one place. Sourced by the
# scripts that run there (scripts/gpu_suite.sh, scripts/gpu_pretrain_smallworld.sh).
#
# Here, before the call: carry_begin fills $CARRY.partial/ with ComfyUI's python tree (without
# its large tokenizer data: only the SD1.x BPE files and the CLIP-L / bigG configs) and the wheels
# of ComfyUI's two requirements that the machine's image lacks (torchsde, trampoline); the caller
# may add its own files, then carry_commit swaps the folder in as the ignored $CARRY (all or
# nothing). The device tool's call names it: carry [".gpu_carry"].
# There: carry_install installs the wheels if torchsde is missing and points COMFYUI_PATH at the
# carried tree.
CARRY=.gpu_carry
PY="${PYTHON:-python3}"

carry_begin() {
  local comfy="${COMFYUI_PATH:-.comfyui}"
  rm -rf "$CARRY.partial" && mkdir -p "$CARRY.partial/whl"
  (cd "$comfy" && find . -name '*.py' -o -path './comfy/sd1_tokenizer/*' \
       -o -name 'sd1_clip_config.json' -o -name 'clip_config_bigg.json' \
     | grep -v -e '/tests' -e '/custom_nodes/' | tar -cf - -T -) | tar -xf - -C "$CARRY.partial" --one-top-level=comfyui
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$CARRY.partial/whl" torchsde==0.2.6 trampoline==0.1.2
}

carry_commit() {
  rm -rf "$CARRY" && mv "$CARRY.partial" "$CARRY"
  du -sh "$CARRY"
}

carry_install() {
  if [ ! -d "$CARRY/comfyui" ]; then
    echo "no $CARRY/comfyui: run the script's 'prepare' here first and name $CARRY in the call's carry" >&2
    return 1
  fi
  if ! "$PY" -c "import torchsde" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$CARRY"/whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export COMFYUI_PATH="$PWD/$CARRY/comfyui" PYTHONUNBUFFERED=1
}
