"""``audiopetl demo``: the whole job end to end, offline, in a couple of minutes on a laptop CPU.

Generates a small labelled dataset of distinct synthetic sounds as WAV files, trains a
LoRA and a Bottleneck adapter on it, saves the adapter files, reloads one and labels a few
clips, and prints accuracy and parameter counts. By default the backbone is a small
*randomly initialised* AST (nothing is downloaded; ``tiny-random-wav2vec2`` and the other
speech presets likewise); ``backbone=`` a hub id or folder runs the same demo on real
pre-trained weights.
"""

from __future__ import annotations

from pathlib import Path

from ..backbone import load_backbone
from ..backbone.presets import TINY_RANDOM
from ..backbone.registry import preset_names
from ..data import get_dataset
from ..train import ADAPTER, TrainConfig, run_training
from .inference import predict_files
from .synthetic import CLASSES, make_synthetic_dataset

DEMO_METHODS = {
    "lora": {"method": "lora", "targets": ["q", "v"], "reduction_rate": 16, "alpha": 8.0},
    "adapter": "bottleneck_pf_par",
}


def run_demo(
    out: str | Path,
    backbone: str = TINY_RANDOM,
    epochs: int | None = None,
    clips_per_class: int = 32,
    progress: bool = True,
) -> dict:
    """Run the demo into ``out``; returns {method: summary} for the trained methods."""
    out = Path(out)
    tiny = backbone in (TINY_RANDOM, *preset_names())
    if tiny:
        print(
            f"NOTE: using {backbone}, a small randomly initialised model (no pre-trained weights, nothing downloaded).\n"
            "      Accuracy here shows the pipeline learns; run `audiopetl demo --backbone "
            "MIT/ast-finetuned-audioset-10-10-0.4593` for real weights."
        )
    data = make_synthetic_dataset(out / "data", clips_per_class=clips_per_class, seconds=1.0)
    print(f"dataset: {len(CLASSES)} synthetic classes x {clips_per_class} clips in {data}")
    results = {}
    for name, method in DEMO_METHODS.items():
        config = TrainConfig(
            dataset="folder",
            data_root=str(data),
            method=method,
            backbone=backbone,
            max_frames=100,
            epochs=epochs or (20 if tiny else 3),
            batch_size=16,
            cache_dir=str(out / "cache"),
            progress=progress,
        )
        results[name] = run_training(config, out / "runs" / name)

    backbone_size = sum(p.numel() for p in load_backbone(backbone, max_frames=100).parameters())
    print(f"\nbackbone: {backbone} ({backbone_size:,} parameters, frozen); chance accuracy {1 / len(CLASSES):.3f}")
    print(f"{'method':8s}  {'test accuracy':>13s}  {'trainable parameters':>20s}  {'adapter file':>12s}")
    for name, summary in results.items():
        adapter = next((out / "runs" / name).glob(f"*/{ADAPTER}"))
        print(
            f"{name:8s}  {summary['test_accuracy_mean']:13.3f}  {summary['trainable_parameters']:20,}  "
            f"{adapter.stat().st_size / 1024:9.0f} KB"
        )
    adapter = next((out / "runs" / "lora").glob(f"*/{ADAPTER}"))
    print(f"\nreloading {adapter} and labelling one test clip per class:")
    for item in predict_files(adapter, _one_test_clip_per_class(data), top_k=1, device="cpu"):
        print(f"  {Path(item['path']).name:24s} -> {item['label']} ({item['top_k'][0]['score']:.2f})")
    return results


def _one_test_clip_per_class(data: Path) -> list[str]:
    """Clips the models never trained on: the first test clip of each class."""
    source = get_dataset("folder")
    index = source.scan(data)
    (split,) = source.splits(index)
    first = {}
    for i in split.test:
        first.setdefault(index.clips[i].label, index.clips[i].path)
    return [first[label] for label in sorted(first)]
