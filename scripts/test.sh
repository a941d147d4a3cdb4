#!/usr/bin/env bash
# The project's test command (README.md): everything CI runs, on a fresh machine.
# Installs what the tests need, then builds once and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# insta: a missing or changed snapshot fails instead of being written.
export CI="${CI:-true}"

# NVRTC 12.9 + CUDA headers, and the disassemblers, from PyPI into the git-ignored `.nvrtc/`
# (no GPU or driver needed): kernels/tests/nvrtc.rs compiles every CUDA template for sm_90a/sm_80
# and checks the FP8 GEMMs' SASS for QGMMA. Two separate --target folders, each installed in one
# pip command: a second `pip install --target` into a folder that already holds `nvidia/` silently
# installs nothing. A `.done` marker naming the packages makes the step a no-op once it succeeded
# (and reinstalls when the pinned versions change). About 230 MB, a few seconds.
nvrtc_install() {
  local dir="$1"
  shift
  if [ "$(cat "$dir/.done" 2>/dev/null)" != "$*" ]; then
    rm -rf "$dir"
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
      --target "$dir" "$@"
    echo "$*" >"$dir/.done"
  fi
}
if [ "${FATHOM_SKIP_NVRTC:-0}" != "1" ]; then
  nvrtc_install .nvrtc/cu12 nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79
  nvrtc_install .nvrtc/tools nvidia-cuda-nvdisasm==13.5.37 nvidia-cuda-cuobjdump==13.5.37
fi

# One build from scratch: incremental compilation's caches would only add about 1 GB of disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

cargo test --workspace --locked --all-targets
cargo test --workspace --locked --doc
