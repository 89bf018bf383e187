"""No accuracy cost (issue 11, target 6): the fast path trains a ViT-B to the fp32 accuracy.

The same LoRA q,v run twice from the same random ViT-B checkpoint, on the same generated
sound classes (features computed in memory with the library's filterbank: no audio files,
so no soundfile/soxr needed), with the trainer's own loop (:func:`audiopetl.train.loop.fit`):

* fp32 reference: fp32, every fast-path knob off (separate q/k/v, SDPA, eager, plain AdamW);
* fast path: what ``audiopetl train`` does by default on the device (bf16 with frozen weights
  stored in bf16; on CUDA also fused q/k/v, compiled blocks, fused AdamW).

Reported: test accuracy of both, and how far the fast path's logits are from fp32's for the
*same* weights (the reference's trained model run both ways), relative to the logits' scale.

    python benchmarks/bench_accuracy.py --device cuda          # ViT-B, about a minute on one GPU
    python benchmarks/bench_accuracy.py --tiny                 # smoke run on the CPU
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table  # noqa: E402

METHOD = {"method": "lora", "targets": ["q", "v"], "reduction_rate": 64, "alpha": 8.0}


def make_features(clips_per_class: int, frames: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from audiopetl.experiments.synthetic import CLASSES, SAMPLE_RATE, synth_clip
    from audiopetl.frontend.fbank import Fbank, FbankConfig

    rng = np.random.default_rng(seed)
    fbank = Fbank(FbankConfig(max_frames=frames))
    names = sorted(CLASSES)
    waves = [synth_clip(name, frames / 100, rng) for name in names for _ in range(clips_per_class)]
    labels = np.repeat(np.arange(len(names)), clips_per_class)
    assert fbank.sample_rate == SAMPLE_RATE
    with torch.no_grad():
        features = fbank(torch.from_numpy(np.stack(waves))).numpy()
    return features, labels, names


def splits(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """60/20/20 per class, shuffled with ``seed``."""
    rng = np.random.default_rng(seed)
    train, valid, test = [], [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        cut1, cut2 = int(0.6 * len(rows)), int(0.8 * len(rows))
        train += list(rows[:cut1])
        valid += list(rows[cut1:cut2])
        test += list(rows[cut2:])
    return tuple(np.sort(np.array(part)) for part in (train, valid, test))


def train(backbone, features, labels, parts, device, fast: bool, epochs: int, run_dir: Path):
    from audiopetl.petl import build_model, resolve_methods
    from audiopetl.train.loop import Batches, LoopSettings, fit

    torch.manual_seed(0)
    backbone = copy.deepcopy(backbone)
    if not fast:
        backbone.set_fused_qkv(False)
        backbone.set_attention_kernel("sdpa")
    model = build_model(backbone, resolve_methods(METHOD), num_classes=int(labels.max()) + 1).to(device)
    dtype = torch.bfloat16 if fast else torch.float32
    if fast:
        model.cast_frozen(dtype)
        if device.type == "cuda":  # the trainer's default there (TrainConfig.compile)
            model.backbone.compile_blocks()
    settings = LoopSettings(epochs=epochs, batch_size=16, lr=5e-3, device=device, dtype=dtype, progress=False,
                            selection="last", fused_adamw=None if fast else False)
    train_rows, valid_rows, test_rows = (Batches(features, labels, rows) for rows in parts)
    metrics = fit(model, train_rows, valid_rows, test_rows, settings, run_dir)
    return model, metrics["test_accuracy"]


def logit_gap(model, features: np.ndarray, device: torch.device) -> float:
    """max |fast - fp32| / max |fp32| over the clips, for the same trained weights."""
    reference = copy.deepcopy(model).float().eval()
    reference.backbone.set_fused_qkv(False)
    reference.backbone.set_attention_kernel("sdpa")
    fast = copy.deepcopy(model).eval()
    fast.cast_frozen(torch.bfloat16)
    fast.backbone.set_fused_qkv(None)
    fast.backbone.set_attention_kernel(None)
    inputs = torch.from_numpy(features[:64]).to(device)
    with torch.no_grad():
        exact = reference(inputs).float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            approx = fast(inputs).float()
    return ((approx - exact).abs().max() / exact.abs().max()).item()


def main(argv: list[str] | None = None) -> None:
    import bench_train_step as bench
    from audiopetl.backbone import load_backbone

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--clips-per-class", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="2-layer 128-wide model: a smoke run in seconds")
    parser.add_argument("--out", help="folder: append the table to accuracy.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    clips = 8 if args.tiny else args.clips_per_class
    features, labels, names = make_features(clips, args.frames)
    parts = splits(labels)
    backbone = load_backbone(bench.checkpoint_dir(args.tiny), max_frames=args.frames)
    print(f"machine: {machine(device)}")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        reference, reference_accuracy = train(
            backbone, features, labels, parts, device, False, args.epochs, Path(scratch) / "fp32")
        _, fast_accuracy = train(backbone, features, labels, parts, device, True, args.epochs, Path(scratch) / "fast")
    rows.append(["fp32, every knob off", reference_accuracy, ""])
    rows.append([f"fast path ({device.type} defaults)", fast_accuracy, f"{logit_gap(reference, features, device):.1e}"])
    print_table(
        f"LoRA q,v on {'a tiny AST' if args.tiny else 'ViT-B'}, {len(names)} generated classes x {clips} clips, "
        f"{args.frames} frames, {args.epochs} epochs: test accuracy",
        ["run", "test accuracy", "logit gap to fp32 (same weights)"],
        rows,
        markdown=Path(args.out) / "accuracy.md" if args.out else None,
    )


if __name__ == "__main__":
    main()
