#!/usr/bin/env python3
"""Times torch._scaled_mm (cuBLASLt FP8 GEMM) at DeepSeek-V3's linear shapes, for
`fathom gpu-check --cublas FILE` to compare Fathom's FP8 GEMM with.

D[M][N] = A[M][K] . B[N][K]^T with E4M3 operands, per-tensor scales and BF16 output (what
cuBLASLt offers as its FP8 GEMM; Fathom's kernel additionally applies 1x128 / 128x128 block
scales, which is more work, not less). Prints JSON on stdout:
{"torch": VERSION, "device": NAME, "results": [{"m", "n", "k", "ms", "tflops"}, ...]}.
"""

import json
import sys

from torch_timing import cuda_torch, timed

M = 4096
SHAPES = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
WARMUP, ITERS = 5, 20


def main() -> int:
    torch = cuda_torch("scaled_mm_bench")
    if torch is None:
        return 2
    device = torch.device("cuda")
    one = torch.tensor(1.0, device=device)
    results = []
    for n, k in SHAPES:
        a = (torch.randn(M, k, device=device) * 0.5).to(torch.float8_e4m3fn)
        # _scaled_mm wants B column-major: B[N][K] row-major, transposed.
        b = (torch.randn(n, k, device=device) * 0.5).to(torch.float8_e4m3fn)

        def gemm():
            return torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

        ms = timed(torch, gemm, WARMUP, ITERS)
        tflops = 2.0 * M * n * k / (ms * 1e-3) / 1e12
        results.append({"m": M, "n": n, "k": k, "ms": ms, "tflops": tflops})
        print(f"torch._scaled_mm M={M} N={n} K={k}: {ms:.4f} ms, {tflops:.1f} TFLOPS", file=sys.stderr)
    json.dump(
        {"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "results": results},
        sys.stdout,
        indent=1,
    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
