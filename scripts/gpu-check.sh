#!/usr/bin/env bash
# The GPU checks (DESIGN.md, "GPU code without a GPU"; issue 6, item 6), for a machine with an
# NVIDIA GPU (written for an H200; under 8 minutes there):
#   1. every generated kernel of the tiny model's training step against the CPU backend, then
#      every f32 library template (GEMMs, index operations, fake quantisation) at awkward shapes,
#   2. a few training steps of the tiny model on the GPU (generated kernels and library
#      templates) against the CPU, comparing losses,
#   3. the FP8 GEMM templates against the exact product of their quantized operands (DeepGEMM's
#      1 - 2Σxy/Σ(x²+y²) < 0.001): every sm_90a tile configuration that step 4 times, under three
#      tile schedules, and the portable sm_80 GEMM, in the three layouts (128x128 weight scales,
#      1x128 B scales, grouped experts); then the quantisation templates against the CPU's
#      quantizers, bit for bit,
#   4. the FP8 GEMM's TFLOPS at DeepSeek-V3's shapes (M = 4096), every tile configuration under
#      every schedule side by side, the fastest beside torch._scaled_mm (cuBLASLt FP8) when
#      PyTorch with CUDA is installed.
# On a machine without a GPU it says so in one line and exits 0.
#
# Environment: FATHOM_GPU_CHECK_BIN=path uses a prebuilt `fathom` instead of building one;
# FATHOM_CACHE_DIR chooses the kernel cache (default: a fresh folder, so compiles are timed too);
# FATHOM_NVRTC points at libnvrtc.so.12 when it is not in CUDA_HOME, /usr/local/cuda or .nvrtc/.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

if ! command -v nvidia-smi >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1'; then
  echo "gpu-check: no NVIDIA driver on this machine (no nvidia-smi, no libcuda.so.1); nothing to check"
  exit 0
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L || true

# NVRTC 12 and the CUDA headers: the toolkit's, or the pip install scripts/test.sh makes.
if [ -z "${FATHOM_NVRTC:-}" ] && [ ! -f "${CUDA_HOME:-/usr/local/cuda}/lib64/libnvrtc.so.12" ] \
  && [ ! -f .nvrtc/cu12/.done ]; then
  echo "gpu-check: installing NVRTC 12.9 from PyPI into .nvrtc/cu12"
  rm -rf .nvrtc/cu12
  python3 -m pip install --quiet --disable-pip-version-check --target .nvrtc/cu12 \
    nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79
  echo "nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79" >.nvrtc/cu12/.done
fi

bin="${FATHOM_GPU_CHECK_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --release --locked --bin fathom
  bin=target/release/fathom
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export FATHOM_CACHE_DIR="${FATHOM_CACHE_DIR:-$work/kernel-cache}"

# cudarc opens NVRTC by name, and on a machine whose toolkit is CUDA 13 (the H200 image, 2026-11)
# those names reach NVRTC 13, which the kernels' loader refuses ("expected NVRTC 12, got 13.0").
# Links under those names to the NVRTC 12 in use, first on the library path, make them reach it.
nvrtc="${FATHOM_NVRTC:-}"
if [ -z "$nvrtc" ] && [ -f .nvrtc/cu12/.done ]; then
  nvrtc=.nvrtc/cu12/nvidia/cuda_nvrtc/lib/libnvrtc.so.12
fi
if [ -n "$nvrtc" ]; then
  [ -d "$nvrtc" ] && nvrtc="$nvrtc/libnvrtc.so.12"
  nvrtc=$(realpath "$nvrtc")
  mkdir -p "$work/nvrtc-names"
  for name in libnvrtc.so libnvrtc.so.13; do ln -s "$nvrtc" "$work/nvrtc-names/$name"; done
  export LD_LIBRARY_PATH="$work/nvrtc-names:$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

cublas=()
if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  if timeout 120 python3 scripts/scaled_mm_bench.py >"$work/scaled_mm.json"; then
    cublas=(--cublas "$work/scaled_mm.json")
  else
    echo "gpu-check: scripts/scaled_mm_bench.py failed; the cuBLASLt comparison is skipped"
  fi
else
  echo "gpu-check: no PyTorch with CUDA here; the cuBLASLt comparison is skipped"
fi

status=0
timeout 360 "$bin" gpu-check "${cublas[@]}" || status=$?
[ "$status" = 124 ] && echo "gpu-check: stopped after 360 s (a kernel hung, or the checks ran long)"
echo "gpu-check: finished in $((SECONDS - started)) s (exit $status)"
exit "$status"
