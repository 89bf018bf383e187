"""Serving many adapters: dynamic batching with one shared backbone pass for LoRA tasks, vs
batching grouped by task, vs one request per forward pass, on a real server over loopback.

Each side is a fresh ``audiopetl serve`` process on 127.0.0.1 with the same adapters (LoRA
tasks of different targets and ranks plus one bottleneck adapter); the same client load
(``--requests`` clips spread over the tasks, ``--concurrency`` in flight) is sent to each.
Prints throughput, p50/p99 latency and the ratios.

    python benchmarks/bench_serve.py [--backbone tiny-random] [--frames 100] [--requests 400] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table  # noqa: E402

from audiopetl.backbone import load_backbone  # noqa: E402
from audiopetl.frontend import FbankConfig  # noqa: E402
from audiopetl.petl import AdapterConfig, LoRAConfig, build_model  # noqa: E402

TASKS = {
    "lora_qv": LoRAConfig(targets=("q", "v"), reduction_rate=16),
    "lora_qkvo": LoRAConfig(targets=("q", "k", "v", "o"), reduction_rate=32),
    "lora_ffn": LoRAConfig(targets=("ffn_in", "ffn_out"), reduction_rate=8),
    "lora_v": LoRAConfig(targets=("v",), reduction_rate=16),
    "adapter": AdapterConfig(module="bottleneck", location="ffn", reduction_rate=16),
}
SIDES = {
    "batched, LoRA tasks share a pass": ["--lora-batching", "shared"],
    "batched, one pass per task": ["--lora-batching", "per-task"],
    "one request per pass": ["--max-batch", "1"],
}


def make_adapters(folder: Path, backbone_name: str, frames: int) -> list[str]:
    backbone = load_backbone(backbone_name, max_frames=frames)
    specs = []
    for seed, (name, method) in enumerate(TASKS.items()):
        model = build_model(copy.deepcopy(backbone), method, num_classes=10, class_names=[f"c{i}" for i in range(10)],
                            metadata={"frontend": FbankConfig(max_frames=frames).to_dict()})
        torch.manual_seed(seed)
        with torch.no_grad():
            for param in model.trainable_parameters():
                param.add_(torch.randn_like(param) * 0.05)
        specs.append(f"{name}={model.save_adapter(folder / f'{name}.safetensors')}")
    return specs


def start(specs: list[str], extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "audiopetl.cli.main", "serve", *specs, "--port", "0", "--device", "cpu",
               "--log-level", "warning", *extra]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            return process, found.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


async def load(url: str, clips: list[bytes], names: list[str], requests: int, concurrency: int) -> dict:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i: int) -> float:
            async with limit:
                start = time.perf_counter()
                answer = await client.post(f"/v1/tasks/{names[i % len(names)]}/classify", content=clips[i % len(clips)])
                answer.raise_for_status()
                return time.perf_counter() - start

        for i in range(2 * concurrency):  # warm-up
            await one(i)
        before = (await client.get("/v1/stats")).json()
        start = time.perf_counter()
        latencies = sorted(await asyncio.gather(*(one(i) for i in range(requests))))
        elapsed = time.perf_counter() - start
        after = (await client.get("/v1/stats")).json()
    return {
        "throughput": requests / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * len(latencies)) - 1],
        "clips_per_pass": (after["samples"] - before["samples"]) / max(1, after["passes"] - before["passes"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny-random", help="backbone name or checkpoint path")
    parser.add_argument("--frames", type=int, default=100, help="clip length in frames (100 = 1 s)")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        specs = make_adapters(folder, args.backbone, args.frames)
        rng = np.random.default_rng(0)
        clips = []
        for i in range(8):
            path = folder / f"clip{i}.wav"
            sf.write(path, (0.1 * rng.standard_normal(int(16000 * args.frames / 100))).astype(np.float32), 16000)
            clips.append(path.read_bytes())
        results = {}
        for side, extra in SIDES.items():
            process, url = start(specs, extra, folder / "server.log")
            try:
                results[side] = asyncio.run(load(url, clips, list(TASKS), args.requests, args.concurrency))
            finally:
                process.terminate()
                process.wait(timeout=30)
    rows = [[side, f"{r['throughput']:.1f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}", f"{r['clips_per_pass']:.1f}"]
            for side, r in results.items()]
    title = (f"{len(TASKS)} tasks ({', '.join(TASKS)}) on {args.backbone}, {args.frames} frames; "
             f"{args.requests} requests, {args.concurrency} concurrent, loopback")
    print_table(title, ["server", "requests/s", "p50 ms", "p99 ms", "clips/pass"], rows)
    shared, per_task, single = (results[s]["throughput"] for s in SIDES)
    print(f"\nbatched multi-task (shared LoRA pass) vs one request per pass: {shared / single:.2f}x throughput")
    print(f"shared LoRA pass vs one pass per task (both batched): {shared / per_task:.2f}x throughput")


if __name__ == "__main__":
    main()
