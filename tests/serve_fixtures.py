"""Tiny adapter files of several methods on the ``tiny-random`` backbones, and clips to classify.

Shared by the serving, browser and export tests. Every trained tensor is moved away from
its initial value (heads strongly) so each method changes the answer and labels are clear.
"""

from __future__ import annotations

import copy
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from audio_fixtures import noise, tone, write_audio
from audiopetl.backbone import load_backbone
from audiopetl.petl import AdapterConfig, BitFitConfig, LoRAConfig, PromptConfig, build_model

FRAMES = 100  # 1 s of audio: keeps the tiny backbone fast
CLASSES = ["dog", "rain", "siren", "wind"]
METHODS = {
    "lora": LoRAConfig(targets=("q", "v"), reduction_rate=16),
    "lora_wide": LoRAConfig(targets=("q", "k", "v", "o", "ffn_in"), reduction_rate=8, alpha=4.0),
    "adapter": AdapterConfig(module="bottleneck", location="ffn", reduction_rate=8),
    "prompt_bitfit": [PromptConfig(3), BitFitConfig()],
}


def make_adapter(
    path: Path, method, seed: int, classes: list[str] = CLASSES, backbone: str = "tiny-random", frames: int = FRAMES
) -> Path:
    """An adapter on ``backbone`` (any preset) recording the frontend ``train`` would: ``frames`` 10-ms steps."""
    model = load_backbone(backbone, max_frames=frames)
    model = build_model(
        copy.deepcopy(model), method, num_classes=len(classes), class_names=classes,
        metadata={"frontend": model.frontend(frames).settings, "dataset": "toy"},
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                scale = 2.0 if name.startswith("head.") else 0.1
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model.save_adapter(path)


def make_adapters(folder: Path) -> dict[str, Path]:
    return {name: make_adapter(folder / f"{name}.safetensors", method, seed) for seed, (name, method) in
            enumerate(METHODS.items())}


def make_clips(folder: Path) -> list[Path]:
    """WAV/FLAC/OGG clips at several rates and channel counts, one longer than the model's 1 s."""
    return [
        write_audio(folder / "tone440.wav", tone(440, 0.8), 16000),
        write_audio(folder / "tone3k_stereo.wav", tone(3000, 0.6, sr=44100), 44100, channels=2),
        write_audio(folder / "noise.flac", noise(0.7, sr=22050, seed=1, amplitude=0.3), 22050),
        write_audio(folder / "chirp.ogg", tone(1200, 0.9, sr=48000) + noise(0.9, sr=48000, seed=2), 48000,
                    subtype="VORBIS"),
        write_audio(folder / "long.wav", tone(700, 3.0), 16000),
    ]


def start_server(adapters: list[str], log: Path, *extra: str, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """``audiopetl serve`` in a subprocess on 127.0.0.1 (a free port); returns it and its base URL."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "audiopetl.cli.main", "serve", *adapters, "--port", "0", "--device", "cpu", *extra]
    handle = log.open("w")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())
        if match:
            return process, match.group(1)
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server did not start in {timeout} s:\n{log.read_text()}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_both_engines(tasks, items):
    """Run ``items`` through the shared-LoRA engine and the one-pass-per-task engine; check each
    clip's probabilities, from both, against its task's model run alone. Returns both engines
    (their ``passes`` say how many backbone passes each made)."""
    from audiopetl.serve import Engine

    shared, per_task = Engine(tasks, "shared"), Engine(tasks, "per-task")
    got, baseline = shared.run(items), per_task.run(items)
    for (name, features), probabilities, reference in zip(items, got, baseline):
        assert isinstance(probabilities, torch.Tensor), probabilities
        with torch.no_grad():
            alone = tasks[name].model(features).softmax(-1)[0]
        torch.testing.assert_close(probabilities, alone, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(reference, alone, atol=1e-6, rtol=1e-5)
    return shared, per_task
