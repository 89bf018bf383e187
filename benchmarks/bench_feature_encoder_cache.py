"""Epoch time of PETL training on a speech encoder: cached feature-encoder output (ours) vs
running the frozen convolutional feature encoder on every batch of every epoch.

Both sides train the same Bottleneck adapter model on the same clips with the same batches;
the baseline feeds waveforms through ``backbone.frontend`` (the wav2vec 2.0 feature encoder)
inside the loop, ours reads the rows the feature cache built once. The one-off cost of
building the cache is printed too, so the break-even epoch count is visible.

    python benchmarks/bench_feature_encoder_cache.py                    # wav2vec 2.0 base size
    python benchmarks/bench_feature_encoder_cache.py --size tiny        # the test preset, seconds
    python benchmarks/bench_feature_encoder_cache.py --device cuda --clips 64 --seconds 5
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from audiopetl.backbone import load_backbone
from audiopetl.backbone.wav2vec2 import SpeechConfig, Wav2Vec2
from audiopetl.data import index_features
from audiopetl.data.folder import FolderDataset
from audiopetl.petl import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("base", "tiny"), default="base",
                        help="base: wav2vec 2.0 base architecture (random weights); tiny: tiny-random-wav2vec2")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per side (median reported)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    if args.size == "tiny":
        backbone = load_backbone("tiny-random-wav2vec2")
    else:
        backbone = Wav2Vec2(SpeechConfig()).eval()
        backbone.source = "random wav2vec 2.0 base"
    max_frames = int(args.seconds * 100)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        rng = np.random.default_rng(0)
        for i in range(args.clips):
            folder = root / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            sf.write(folder / f"{i}.wav", rng.standard_normal(int(args.seconds * 16000)).astype(np.float32) * 0.1, 16000)
        index = FolderDataset().scan(str(root))
        frontend = backbone.frontend(max_frames).to(device)
        start = time.perf_counter()
        data = index_features(index, frontend, Path(tmp) / "cache", progress=False)
        build_seconds = time.perf_counter() - start
        waves = torch.stack([torch.from_numpy(sf.read(clip.path, dtype="float32")[0]) for clip in index.clips])
        labels = torch.from_numpy(data.labels)
        cached = torch.from_numpy(np.array(data.features))  # copy: the cache is read-only

        model = build_model(copy.deepcopy(backbone), "adapter", num_classes=2).to(device)
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)

        def epoch(encoder_every_batch: bool) -> float:
            start = time.perf_counter()
            for begin in range(0, len(labels), args.batch_size):
                rows = slice(begin, begin + args.batch_size)
                if encoder_every_batch:
                    features = frontend(waves[rows]).to(device)
                else:
                    features = cached[rows].to(device)
                loss = torch.nn.functional.cross_entropy(model(features), labels[rows].to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        epoch(False)  # warm-up
        baseline = float(np.median([epoch(True) for _ in range(args.epochs)]))
        ours = float(np.median([epoch(False) for _ in range(args.epochs)]))

    print(f"backbone: {backbone.source}; {args.clips} clips x {args.seconds} s, batch {args.batch_size}, "
          f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"building the cache once:                 {build_seconds:8.3f} s")
    print(f"epoch, feature encoder run every batch:  {baseline:8.3f} s")
    print(f"epoch, cached feature-encoder output:    {ours:8.3f} s")
    print(f"ratio (baseline / cached):               {baseline / ours:8.2f}x")


if __name__ == "__main__":
    main()
