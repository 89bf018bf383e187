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
    """Measured dense matmul throughput: the ceiling model FLOPs utilisation is judged against."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)

    def step():
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()

    return 2 * size**3 / median_seconds(step, repeats=5) / 1e9


def ast_flops(frames: int, batch: int, extra_tokens: int = 0, step: str | None = None) -> float:
    """Analytic FLOPs of a ViT-B AST forward pass, or of a training step when ``step`` names the method.

    Linear layers cost 2*m*n*k and attention's two matmuls 4*T^2*d per layer. In a step's
    backward a frozen weight needs only its input gradient (1x forward), a trained one also
    its weight gradient (another 1x: ``step="full"``); attention's backward is 2x forward.
    Small terms (the tiny PETL modules, the patch embedding, the head) are left out.
    """
    from audiopetl.backbone import ASTConfig

    config = ASTConfig(max_frames=frames)
    tokens = config.num_tokens + extra_tokens
    dim, mlp, layers = config.hidden_size, config.mlp_size, config.num_layers
    linear = 2 * tokens * (4 * dim * dim + 2 * dim * mlp)
    attention = 4 * tokens * tokens * dim
    per_layer = linear + attention
    if step is not None:
        per_layer += linear + 2 * attention + (linear if step == "full" else 0)
    return batch * layers * per_layer


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}, {date.today()}"
    )


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header, *[[_fmt(c) for c in row] for row in rows]]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for number, row in enumerate(cells):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        if number == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
