"""What the PyTorch timing scripts share: PyTorch with a CUDA device, or why not, and a CUDA-event
timing of a function."""

import sys


def cuda_torch(script: str):
    """The torch module when PyTorch sees a CUDA device; otherwise None, having said why."""
    try:
        import torch
    except ImportError:
        print(f"{script}: PyTorch is not installed", file=sys.stderr)
        return None
    if not torch.cuda.is_available():
        print(f"{script}: PyTorch sees no CUDA device", file=sys.stderr)
        return None
    torch.manual_seed(0)
    return torch


def timed(torch, fn, warmup: int, iters: int) -> float:
    """Milliseconds per call of fn, after warmup untimed calls, between two CUDA events."""
    for _ in range(warmup):
        fn()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
