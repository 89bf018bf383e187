"""The usual training script, written the way a transformers + PEFT user would: the baseline
of ``bench_end_to_end.py``. Not part of audiopetl.

Every epoch, each clip is decoded (soundfile), resampled to 16 kHz (soxr) and turned into
features by ``ASTFeatureExtractor`` inside a ``DataLoader`` with worker processes; the model
is transformers' ``ASTModel`` (SDPA) with PEFT LoRA on q and v, a mean-pooled linear head,
AdamW, bf16 autocast on CUDA. Split: every 10th clip validation, the next test. Writes
``metrics.json`` with the test accuracy and each epoch's training clips/s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import soundfile as sf
import soxr
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ASTFeatureExtractor, ASTModel


class Clips(torch.utils.data.Dataset):
    def __init__(self, items: list[tuple[Path, int]], frames: int):
        self.items = items
        self.extractor = ASTFeatureExtractor(max_length=frames)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        wave, rate = sf.read(path, dtype="float32", always_2d=True)
        wave = wave.mean(axis=1)
        if rate != 16000:
            wave = soxr.resample(wave, rate, 16000)
        features = self.extractor(wave, sampling_rate=16000, return_tensors="pt")["input_values"][0]
        return features, label


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, classes)

    def forward(self, features):
        return self.head(self.backbone(features).last_hidden_state.mean(dim=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-frames", type=int, default=500)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    device = torch.device(args.device)
    classes = sorted(p.name for p in Path(args.data_root).iterdir() if p.is_dir())
    items = [(path, label) for label, name in enumerate(classes) for path in sorted((Path(args.data_root) / name).glob("*.wav"))]
    splits = {"train": [], "valid": [], "test": []}
    for number, item in enumerate(items):
        splits["valid" if number % 10 == 0 else "test" if number % 10 == 1 else "train"].append(item)
    loaders = {
        name: torch.utils.data.DataLoader(
            Clips(chunk, args.max_frames), batch_size=args.batch_size, shuffle=name == "train",
            num_workers=args.workers, persistent_workers=False,
        )
        for name, chunk in splits.items()
    }
    backbone = ASTModel.from_pretrained(
        args.backbone, max_length=args.max_frames, ignore_mismatched_sizes=True, attn_implementation="sdpa"
    )
    hidden = backbone.config.hidden_size
    rank = max(1, hidden // 128)
    backbone = get_peft_model(backbone, LoraConfig(r=rank, lora_alpha=rank * 8 / 128, target_modules=["q_proj", "v_proj"]))
    model = Classifier(backbone, len(classes)).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def evaluate(loader) -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for features, labels in loader:
                with autocast:
                    logits = model(features.to(device))
                correct += int((logits.argmax(-1).cpu() == labels).sum())
        return correct / max(1, len(loader.dataset))

    speeds = []
    for _ in range(args.epochs):
        model.train()
        started, seen = time.perf_counter(), 0
        for features, labels in loaders["train"]:
            with autocast:
                loss = F.cross_entropy(model(features.to(device)).float(), labels.to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seen += len(labels)
        speeds.append(seen / (time.perf_counter() - started))
        evaluate(loaders["valid"])
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = {"test_accuracy": evaluate(loaders["test"]), "clips_per_s": speeds}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
