"""Feature extraction: our batched torch filterbank vs. transformers' ASTFeatureExtractor,
and an epoch served from the feature cache vs. decoding + resampling + filterbanks again.

    python benchmarks/bench_features.py [--clips 100] [--seconds 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, median_seconds, print_table  # noqa: E402

from audiopetl.data import FeatureCache  # noqa: E402
from audiopetl.frontend import Fbank, FbankConfig, load_audio  # noqa: E402


def speech_like(seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    f0 = rng.uniform(90, 200)
    voiced = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 20))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 5) * t)
    return (0.3 * voiced * envelope / 10 + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    from transformers import ASTFeatureExtractor

    rng = np.random.default_rng(0)
    waves = [speech_like(args.seconds, 16000, rng) for _ in range(args.clips)]
    max_frames = int(args.seconds * 100)
    config = FbankConfig(max_frames=max_frames)
    extractor = ASTFeatureExtractor(max_length=max_frames)
    fbank = Fbank(config)
    batch = torch.from_numpy(np.stack(waves))

    def theirs():
        for wave in waves:
            extractor(wave, sampling_rate=16000, return_tensors="np")

    def ours():
        with torch.no_grad():
            fbank(batch)

    # Same numbers before timing.
    reference = extractor(waves[0], sampling_rate=16000, return_tensors="np")["input_values"][0]
    with torch.no_grad():
        difference = np.abs(fbank(batch[:1])[0].numpy() - reference).max()
    assert difference < 1e-3, difference
    t_theirs, t_ours = median_seconds(theirs, repeats=3), median_seconds(ours, repeats=3)
    print(f"machine: {machine()}")
    print_table(
        f"filterbanks for {args.clips} clips of {args.seconds:g} s (max |diff| {difference:.1e})",
        ["side", "seconds", "clips/s", "ratio"],
        [
            ["ASTFeatureExtractor, per clip", t_theirs, args.clips / t_theirs, 1.0],
            ["audiopetl Fbank, batched", t_ours, args.clips / t_ours, t_theirs / t_ours],
        ],
    )

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for number, wave in enumerate(waves):
            path = Path(tmp) / f"clip{number:03d}.wav"
            stereo = np.stack([wave, wave], axis=1)
            sf.write(path, soxr.resample(stereo, 16000, 44100), 44100, subtype="PCM_16")
            paths.append(str(path))
        cache = FeatureCache(Path(tmp) / "cache")
        cache.features(paths, config, progress=False)  # the first epoch builds the cache

        def recompute_epoch():
            for start in range(0, len(paths), 32):
                chunk = [torch.from_numpy(load_audio(p)) for p in paths[start : start + 32]]
                lengths = torch.tensor([len(c) for c in chunk])
                with torch.no_grad():
                    fbank(torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True), lengths=lengths)

        def cached_epoch():
            features = cache.features(paths, config, progress=False)[0]
            for start in range(0, len(paths), 32):
                torch.from_numpy(np.array(features[start : start + 32]))

        t_recompute, t_cached = median_seconds(recompute_epoch), median_seconds(cached_epoch)
        print_table(
            f"one epoch of features for {args.clips} WAV files (44.1 kHz stereo, {args.seconds:g} s)",
            ["side", "seconds", "ratio"],
            [
                ["decode + resample + filterbank", t_recompute, 1.0],
                ["feature cache (memory-mapped)", t_cached, t_recompute / t_cached],
            ],
        )


if __name__ == "__main__":
    main()
