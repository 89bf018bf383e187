"""Shared helpers for the benchmark scripts: timing, peak memory, worker processes, tables.

Each side of a comparison runs in its own fresh process (``run_worker``), so peak memory
(max RSS) is that side's alone and one side's caches or allocator state cannot help or
hurt the other. Times are medians of several repeats after a warm-up.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch


def median_seconds(fn, repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA only: on CPU the peak is the process's max RSS)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since :func:`reset_peak_memory`; CPU: this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def run_worker(script: str, *args: str) -> dict:
    """Run ``script --worker ARGS`` in a fresh interpreter; its last stdout line is JSON."""
    result = subprocess.run(
        [sys.executable, script, "--worker", *map(str, args)], capture_output=True, text=True, env=os.environ
    )
    if result.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def emit(payload: dict) -> None:
    print(json.dumps(payload), flush=True)


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, size: int = 2048, device: str = "cpu") -> float:
    """Measured dense matmul throughput: the ceiling model FLOPs utilisation is judged against.

    On CUDA, pass a size that fills the card (8192); each timed call runs 10 products.
    """
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    calls = 10 if device != "cpu" else 1

    def step():
        for _ in range(calls):
            a @ b
        if device != "cpu":
            torch.cuda.synchronize()

    return calls * 2 * size**3 / median_seconds(step, repeats=5) / 1e9


def ast_flops(frames: int, batch: int, extra_tokens: int = 0, step: str | None = None, config=None) -> float:
    """Analytic FLOPs of a ViT-B AST forward pass, or of a training step when ``step`` names the method.

    Linear layers cost 2*m*n*k and attention's two matmuls 4*T^2*d per layer. In a step's
    backward a frozen weight needs only its input gradient (1x forward), a trained one also
    its weight gradient (another 1x: ``step="full"``); attention's backward is 2x forward.
    Small terms (the tiny PETL modules, the patch embedding, the head) are left out.
    """
    from dataclasses import replace

    from audiopetl.backbone import ASTConfig

    config = replace(config or ASTConfig(), max_frames=frames)
    tokens = config.num_tokens + extra_tokens
    dim, mlp, layers = config.hidden_size, config.mlp_size, config.num_layers
    linear = 2 * tokens * (4 * dim * dim + 2 * dim * mlp)
    attention = 4 * tokens * tokens * dim
    per_layer = linear + attention
    if step is not None:
        per_layer += linear + 2 * attention + (linear if step == "full" else 0)
    return batch * layers * per_layer


def machine(device: torch.device | str = "cpu") -> str:
    gpu = f"{torch.cuda.get_device_name(device)}, " if torch.device(device).type == "cuda" else ""
    return (
        f"{gpu}{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}"
        f"{', avx512_bf16/amx' if has_fast_cpu_bf16() else ''}, {date.today()}"
    )


def print_table(title: str, header: list[str], rows: list[list], markdown: str | os.PathLike | None = None) -> None:
    """Print an aligned table; with ``markdown``, also append it to that file (its folder made if
    needed) as a Markdown table."""
    cells = [header, *[[_fmt(c) for c in row] for row in rows]]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(header))]
    print(f"\n{title}", flush=True)
    for number, row in enumerate(cells):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        if number == 0:
            print("  ".join("-" * w for w in widths))
    if markdown is not None:
        Path(markdown).parent.mkdir(parents=True, exist_ok=True)
        lines = [f"\n**{title}**\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in cells[1:]]
        with open(markdown, "a") as handle:
            handle.write("\n".join(lines) + "\n")


def has_fast_cpu_bf16() -> bool:
    """What the CPU reports (AVX512-BF16 / AMX / Arm bf16): the library's own detection."""
    from audiopetl.train.precision import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
