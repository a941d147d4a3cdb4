#!/usr/bin/env python3
"""Times PyTorch's scaled_dot_product_attention at DeepSeek-V3's MLA sizes, for
`fathom gpu-check --torch-attention FILE` to compare the MLA attention templates with.

One sequence of 4096 tokens, 128 heads, query/key heads of 128 + 64 = 192 channels, value heads
of 128, BF16, causal, scale 1/sqrt(192): the forward, and the backward as (forward + backward)
minus the forward. PyTorch chooses its kernel; where none of its kernels takes a value width
other than the query's, v is padded with zeros to 192 (more work than the templates do) and
the variant says so. Prints JSON on stdout:
{"torch", "device", "variant", "b", "t", "h", "qk", "v", "forward_ms", "backward_ms"}.
"""

import json
import sys

from torch_timing import cuda_torch, timed

B, T, H, QK, V = 1, 4096, 128, 192, 128
WARMUP, ITERS = 3, 10


def main() -> int:
    torch = cuda_torch("attention_bench")
    if torch is None:
        return 2
    import torch.nn.functional as F

    cuda = torch.device("cuda")

    def tensor(width):
        return (torch.rand(B, H, T, width, device=cuda, dtype=torch.bfloat16) * 2 - 1).requires_grad_()

    q, k = tensor(QK), tensor(QK)
    scale = QK**-0.5
    variant = "as given"
    v = tensor(V)
    try:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).sum().backward()
    except RuntimeError as error:
        print(f"attention_bench: v of {V} refused ({error}); padding it to {QK}", file=sys.stderr)
        variant = f"v padded to {QK}"
        v = tensor(QK)
    d_o = torch.rand(B, H, T, v.shape[-1], device=cuda, dtype=torch.bfloat16)

    def forward():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    def forward_backward():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        out.backward(d_o)

    forward_ms = timed(torch, forward, WARMUP, ITERS)
    both_ms = timed(torch, forward_backward, WARMUP, ITERS)
    result = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0),
        "variant": variant,
        "b": B,
        "t": T,
        "h": H,
        "qk": QK,
        "v": V,
        "forward_ms": forward_ms,
        "backward_ms": both_ms - forward_ms,
    }
    print(f"scaled_dot_product_attention ({variant}): forward {forward_ms:.3f} ms, "
          f"backward {both_ms - forward_ms:.3f} ms", file=sys.stderr)
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
