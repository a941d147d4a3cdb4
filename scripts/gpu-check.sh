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
#      PyTorch with CUDA is installed; then the MLA attention templates' forward and backward
#      at DeepSeek-V3's sizes beside PyTorch's scaled_dot_product_attention,
#   5. training throughput on the GPU (`fathom bench --backend cuda`, benches/configs/small.json),
#      f32 and FP8 with Hopper's accumulation (the FP8 GEMM plans) one after the other.
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

torch_timings=()
if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  if timeout 120 python3 scripts/scaled_mm_bench.py >"$work/scaled_mm.json"; then
    torch_timings+=(--cublas "$work/scaled_mm.json")
  else
    echo "gpu-check: scripts/scaled_mm_bench.py failed; the cuBLASLt comparison is skipped"
  fi
  if timeout 60 python3 scripts/attention_bench.py >"$work/attention.json"; then
    torch_timings+=(--torch-attention "$work/attention.json")
  else
    echo "gpu-check: scripts/attention_bench.py failed; the attention comparison is skipped"
  fi
else
  echo "gpu-check: no PyTorch with CUDA here; the cuBLASLt and attention comparisons are skipped"
fi

status=0
timeout 330 "$bin" gpu-check "${torch_timings[@]}" || status=$?
[ "$status" = 124 ] && echo "gpu-check: stopped after 330 s (a kernel hung, or the checks ran long)"

echo
echo "== 5. training throughput on the GPU, f32 and FP8 side by side (small config, 8 x 256 tokens)"
for run in "fp32 exact" "fp8 hopper"; do
  read -r precision accumulation <<<"$run"
  bench_status=0
  timeout 100 "$bin" bench --config benches/configs/small.json --backend cuda --batch 8 --seq 256 \
    --steps 5 --precision "$precision" --accumulation "$accumulation" --json \
    >"$work/bench-$precision.json" || bench_status=$?
  if [ "$bench_status" = 0 ]; then
    echo "$precision ($accumulation accumulation): $(cat "$work/bench-$precision.json")"
  else
    echo "gpu-check: the $precision bench failed (exit $bench_status)"
    [ "$status" = 0 ] && status=$bench_status
  fi
done
if [ -s "$work/bench-fp32.json" ] && [ -s "$work/bench-fp8.json" ]; then
  python3 - "$work/bench-fp32.json" "$work/bench-fp8.json" <<'PY'
import json, sys
f32, fp8 = (json.load(open(path)) for path in sys.argv[1:3])
key = "train_tokens_per_second"
print(f"train tokens/s: f32 {f32[key]:.0f}, fp8 {fp8[key]:.0f} (fp8/f32 = {fp8[key] / f32[key]:.2f}x); "
      f"backends {f32['backend']}, {fp8['backend']}")
PY
fi

echo "gpu-check: finished in $((SECONDS - started)) s (exit $status)"
exit "$status"
