"""The benchmarks cannot rot: ``gpu_check.sh`` and its Python entry points run end to end on
the CPU at tiny size (``SMOKE=1``). Figures are not checked (no timing in tests), only that
every table is produced with a row per side."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_gpu_check_runs_every_measurement_at_tiny_size_on_cpu(tmp_path):
    env = {**os.environ, "SMOKE": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "AUDIOPETL_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    train = (out / "train_step.md").read_text()
    for side in ("audiopetl", "audiopetl-fused", "hf-sdpa", "hf-eager-fp32"):
        for method in ("lora", "dpt25"):
            assert f"| {method} | {side} | " in train
    assert "error" not in train.lower() and "skipped" not in train
    assert "LoRA q,v merged" in (out / "inference.md").read_text()
    assert "separate q/k/v" in (out / "profile_step.md").read_text()
    assert "| fp32 | 48 | 50 | 2 |" in (out / "attention.md").read_text()  # fp32 always; bf16 where it is fast
    summary = (out / "summary.txt").read_text()
    assert "fast path (cpu defaults)" in (out / "accuracy.md").read_text()
    for step in ("train_step", "inference", "profile_step", "attention", "accuracy"):
        assert f"{step}: exit 0" in summary


@pytest.mark.slow
def test_end_to_end_benchmark_runs_at_tiny_size(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUDIOPETL_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_end_to_end.py"), "--tiny", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "end_to_end.md").read_text()
    assert "| audiopetl train |" in table and "| usual script |" in table
