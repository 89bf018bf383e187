"""Linear probing end to end: the head trained on cached embeddings vs. the plain loop that
runs the frozen backbone over every clip in every epoch (the usual transformers script).

Both sides are audiopetl's own ``run_training`` on the same generated dataset, features
and seeds, differing only in ``embedding_cache``; accuracies are printed beside the times.

    python benchmarks/bench_linear_probe.py [--epochs 50] [--clips-per-class 4] [--frames 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table  # noqa: E402

from audiopetl.data import FeatureCache, get_dataset  # noqa: E402
from audiopetl.experiments.synthetic import make_synthetic_dataset  # noqa: E402
from audiopetl.frontend import FbankConfig  # noqa: E402
from audiopetl.train import TrainConfig, run_training  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--clips-per-class", type=int, default=6)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--backbone", default=None, help="default: a random ViT-B saved to a temp folder")
    args = parser.parse_args()
    from bench_train_step import checkpoint_dir

    backbone = args.backbone or str(checkpoint_dir())
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic_dataset(Path(tmp) / "data", clips_per_class=args.clips_per_class, seconds=1.0)
        # Both sides read the same, already built, feature cache: only the training differs.
        index = get_dataset("folder").scan(data)
        FeatureCache(Path(tmp) / "cache").features(
            [clip.path for clip in index.clips], FbankConfig(max_frames=args.frames), progress=False
        )
        rows = []
        for cached in (False, True):
            config = TrainConfig(
                dataset="folder", data_root=str(data), method="linear", backbone=backbone,
                max_frames=args.frames, epochs=args.epochs, batch_size=8, lr=3e-2, embedding_cache=cached,
                cache_dir=str(Path(tmp) / "cache"), progress=False, device="cpu", precision="fp32",
            )
            start = time.perf_counter()
            summary = run_training(config, Path(tmp) / f"run-{cached}")
            seconds = time.perf_counter() - start
            rows.append(["cached embeddings" if cached else "backbone every epoch", seconds, summary["test_accuracy_mean"]])
    plain, cached = rows[0][1], rows[1][1]
    rows[0].append(1.0)
    rows[1].append(plain / cached)
    print(f"machine: {machine()}")
    print_table(
        f"linear probing, ViT-B, {args.epochs} epochs, {args.frames} frames, 6 classes x {args.clips_per_class} clips",
        ["side", "seconds", "test accuracy", "speed-up"],
        rows,
    )


if __name__ == "__main__":
    main()
