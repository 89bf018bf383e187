"""Choosing the compute dtype: bf16 where the hardware multiplies it fast, fp32 elsewhere.

CUDA GPUs always have fast bf16. CPUs differ wildly: with AVX512-BF16/AMX a bf16 matmul
runs several times faster than fp32, without them PyTorch falls back to a scalar path that
is hundreds of times slower. No flag tells reliably, so we time one small matmul per dtype.
"""

from __future__ import annotations

import functools
import time

import torch

PRECISIONS = ("auto", "fp32", "bf16")


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when a bf16 matmul on this CPU is at least as fast as fp32."""
    size = 256
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up: first call pays for kernel selection
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        timings[dtype] = time.perf_counter() - start
    return timings[torch.bfloat16] <= timings[torch.float32]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """Map a precision name to the autocast dtype to use on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {list(PRECISIONS)}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return torch.bfloat16
    return torch.float32


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return resolved
