"""Choosing the compute dtype: bf16 where the hardware multiplies it fast, fp32 elsewhere.

The choice is made from what the hardware *is*, never from a timing (a stopwatch flips
under load, and a resumed run must not change precision): CUDA GPUs get bf16; a CPU gets
bf16 when it has bf16 multiply instructions (x86 AVX512-BF16 or AMX, as PyTorch reports
them; the ``bf16`` feature of Arm CPUs), because without them PyTorch falls back to a
scalar path that is hundreds of times slower than fp32. The environment variable
``AUDIOPETL_FAST_BF16=1`` (or ``0``) overrides the CPU detection, e.g. to test both paths
on one machine. A run records the resolved name (``fp32``/``bf16``) in its ``config.yaml``
and adapter files, so resume, ``eval`` and ``predict`` compute exactly as it did.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FAST_BF16_ENV = "AUDIOPETL_FAST_BF16"


def cpu_bf16_features() -> list[str]:
    """The bf16 multiply features this CPU reports (empty: none): PyTorch's own probes, and
    the kernel's flags (x86 ``avx512_bf16``/``amx_bf16``, Arm ``bf16``) where PyTorch has none."""
    found = set()
    for name, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported")):
        if getattr(torch.cpu, probe, lambda: False)():
            found.add(name)
    flags = _proc_cpuinfo_flags()
    found.update(f for f in ("avx512_bf16", "amx_bf16") if f in flags)
    if platform.machine().lower() in ("aarch64", "arm64") and "bf16" in flags:
        found.add("bf16")
    return sorted(found)


def _proc_cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (or ``AUDIOPETL_FAST_BF16`` says so)."""
    forced = os.environ.get(FAST_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(f"{FAST_BF16_ENV}={forced!r}: use 1 (CPU has fast bf16) or 0 (it has not)")
        return forced == "1"
    return bool(cpu_bf16_features())


def resolve_precision_name(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: what ``precision`` (``auto`` included) means on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {list(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return "bf16"
    return "fp32"


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return resolved
