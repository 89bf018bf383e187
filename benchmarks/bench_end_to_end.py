"""End to end from audio files: a whole ``audiopetl train`` vs the usual training script.

Both train LoRA q,v (RR 128) on the same generated clips (16 / 22.05 / 44.1 kHz WAVs,
``--seconds`` long, one sub-folder per class), the same random checkpoint, 80/10/10 split,
and write ``metrics.json``; each wall time runs from process start to process exit.

* audiopetl: ``audiopetl train --dataset folder`` (feature cache built on all cores, then
  epochs from the cache, validation, test, adapter file), a fresh cache directory.
* the usual script (:mod:`peer_train_script`): per clip and every epoch, decode
  (soundfile) + resample (soxr) + ``ASTFeatureExtractor`` in a ``DataLoader`` with
  ``--workers`` workers; transformers SDPA + PEFT LoRA, bf16 autocast on CUDA.

Needs soundfile and soxr (both sides decode real files).

    python benchmarks/bench_end_to_end.py --device cuda --clips 1000 --epochs 3
    python benchmarks/bench_end_to_end.py --tiny        # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table  # noqa: E402

RATES = (16000, 22050, 44100)


def make_clips(root: Path, clips: int, seconds: float) -> Path:
    """``clips`` WAVs over 5 classes, rates cycling through 16 / 22.05 / 44.1 kHz."""
    import soundfile as sf
    import soxr

    from audiopetl.experiments.synthetic import SAMPLE_RATE, make_synthetic_dataset

    classes = ("low_tone", "high_tone", "chirp", "noise_bursts", "clicks")
    per_class = max(1, clips // len(classes))
    make_synthetic_dataset(root, clips_per_class=per_class, seconds=seconds, classes=classes)
    for number, path in enumerate(sorted(root.rglob("*.wav"))):
        rate = RATES[number % len(RATES)]
        if rate != SAMPLE_RATE:
            wave, _ = sf.read(path, dtype="float32")
            sf.write(path, soxr.resample(wave, SAMPLE_RATE, rate), rate)
    return root


def timed_run(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=8, help="the usual script's DataLoader workers")
    parser.add_argument("--tiny", action="store_true", help="tiny model, 20 one-second clips, 1 epoch, 2 workers")
    parser.add_argument("--out", help="folder: append the table to end_to_end.md")
    args = parser.parse_args(argv)
    if args.tiny:
        args.clips, args.seconds, args.epochs, args.batch, args.workers = 20, 1.0, 1, 4, 2
    from bench_train_step import checkpoint_dir

    frames = int(args.seconds * 100)
    checkpoint = checkpoint_dir(args.tiny)
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_clips(tmp / "data", args.clips, args.seconds)
        common = ["--epochs", str(args.epochs), "--batch-size", str(args.batch), "--max-frames", str(frames),
                  "--device", args.device]
        ours = timed_run(
            [sys.executable, "-m", "audiopetl.cli.main", "train", "--dataset", "folder", "--data-root", str(data),
             "--method", "lora", "--targets", "q,v", "--reduction-rate", "128", "--alpha", "8",
             "--backbone", str(checkpoint), "--pos-embed", "zeros", "--cache-dir", str(tmp / "cache"),
             "--run-dir", str(tmp / "ours"), "--no-progress", *common],
            {**env, "AUDIOPETL_CACHE": str(tmp / "cache")},
        )
        peer = timed_run(
            [sys.executable, str(here / "peer_train_script.py"), "--data-root", str(data), "--backbone",
             str(checkpoint), "--run-dir", str(tmp / "peer"), "--workers", str(args.workers), *common],
            env,
        )
        epochs = [json.loads(line) for line in (tmp / "ours").rglob("log.jsonl").__next__().read_text().splitlines()]
        peer_metrics = json.loads((tmp / "peer" / "metrics.json").read_text())
        ours_metrics = json.loads((tmp / "ours" / "metrics.json").read_text())
    print(f"machine: {machine(args.device)}")
    rows = [
        ["audiopetl train", ours, ours / peer, " ".join(f"{e['clips_per_s']:.0f}" for e in epochs),
         f"{ours_metrics['test_accuracy_mean']:.3f}"],
        ["usual script", peer, 1.0, " ".join(f"{c:.0f}" for c in peer_metrics["clips_per_s"]),
         f"{peer_metrics['test_accuracy']:.3f}"],
    ]
    out = Path(args.out) if args.out else None
    print_table(
        f"end to end, {args.clips} clips x {args.seconds:g} s (16/22.05/44.1 kHz), LoRA, {args.epochs} epochs, "
        f"batch {args.batch}, {'tiny AST' if args.tiny else 'ViT-B'}, {args.device}",
        ["side", "wall s", "x usual script", "train clips/s per epoch", "test acc"],
        rows,
        markdown=out / "end_to_end.md" if out else None,
    )
    return rows


if __name__ == "__main__":
    main()
