"""Using a trained adapter file: label audio files (``predict``) and score a split (``eval``).

Both rebuild the model from the file alone: the backbone and frontend settings named in
its metadata, so a shipped adapter needs nothing else.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import torch

from ..data import get_dataset, index_features
from ..frontend import AudioError, Frontend, channel_policy, frontend_from_settings, load_audio
from ..petl import PETLModel, load_adapter
from ..train.loop import Batches, LoopSettings, autocast, evaluate
from ..train.precision import DTYPES, resolve_device

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au"}


def load_for_inference(adapter: str | Path, backbone: str | None = None, device: str = "auto") -> PETLModel:
    """The adapter's model on ``device`` in eval mode; ``backbone`` overrides the file's backbone id."""
    backbone_model = None
    if backbone is not None:
        from ..backbone import load_backbone
        from ..petl import read_adapter_metadata

        metadata = read_adapter_metadata(adapter)["metadata"]
        backbone_model = load_backbone(
            backbone, max_frames=metadata["frontend"]["max_frames"], pos_embed=metadata.get("pos_embed", "adapt")
        )
    return load_adapter(adapter, backbone=backbone_model).to(resolve_device(device)).eval()


def recorded_dtype(model: PETLModel) -> torch.dtype:
    """The autocast dtype the adapter was trained with (files without the record: fp32), so
    ``eval`` and ``predict`` compute as training did."""
    return DTYPES[model.metadata.get("precision", "fp32")]


def audio_files(inputs: list[str | Path]) -> list[Path]:
    """Files as given, and audio-named entries found (recursively, sorted) in given folders.

    Entries that are not readable files (a missing path, a broken link, a folder named
    like audio) are kept, so they are reported as errors instead of vanishing.
    """
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES))
        else:
            files.append(item)
    if not files:
        raise ValueError(f"no audio files found in {[str(i) for i in inputs]}")
    return files


@torch.no_grad()
def predict_files(
    adapter: str | Path,
    inputs: list[str | Path],
    top_k: int = 5,
    backbone: str | None = None,
    device: str = "auto",
    batch_size: int = 16,
) -> list[dict]:
    """Top-k labels and probabilities for each audio file, in input order.

    A file that cannot be used gets ``{"path", "error"}`` instead of labels (and a line
    on stderr); the others are predicted all the same.
    """
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    files = audio_files(inputs)
    model = load_for_inference(adapter, backbone, device)
    device_ = next(model.parameters()).device
    frontend = frontend_from_settings(model.metadata["frontend"], model.backbone).to(device_)
    settings = LoopSettings(epochs=1, batch_size=batch_size, lr=1.0, device=device_, dtype=recorded_dtype(model))
    k = min(top_k, len(model.class_names))
    channels = channel_policy(frontend.settings)
    results: dict[int, dict] = {}
    for start in range(0, len(files), batch_size):
        chunk, waves = [], []
        for i in range(start, min(start + batch_size, len(files))):
            try:
                waves.append(torch.from_numpy(load_audio(files[i], sample_rate=frontend.sample_rate, channels=channels)))
                chunk.append(i)
            except AudioError as error:
                print(f"audiopetl predict: {error}", file=sys.stderr)
                results[i] = {"path": str(files[i]), "error": error.reason}
        if not chunk:
            continue
        features = waveform_features(frontend, waves).to(device_)  # fp32, as the training cache computed them
        with autocast(settings):
            probabilities = model(features).float().softmax(-1).cpu()
        for i, row in zip(chunk, probabilities):
            results[i] = prediction_record(str(files[i]), row, model.class_names, k)
    return [results[i] for i in range(len(files))]


def waveform_features(frontend: Frontend, waves: list[torch.Tensor]) -> torch.Tensor:
    """Model input for 1-D waveforms of any lengths, each as it would be alone.

    Padded on the CPU; each frontend computes on its own device (``Fbank``: its buffers';
    the speech encoders' waveform frontend: its feature encoder's, returning CPU rows).
    """
    lengths = torch.tensor([len(w) for w in waves])
    padded = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    return frontend(padded, lengths=lengths)


def prediction_record(path: str | None, probabilities: torch.Tensor, class_names: list[str], k: int) -> dict:
    """The record ``predict`` writes for one clip: path, top label, and the top-k labels with scores."""
    scores, labels = probabilities.topk(k)
    ranked = [{"label": class_names[int(i)], "score": round(float(s), 6)} for s, i in zip(scores, labels)]
    return {"path": path, "label": ranked[0]["label"], "top_k": ranked}


def format_predictions(predictions: list[dict], fmt: str = "json") -> str:
    if fmt == "json":
        return json.dumps(predictions, indent=2) + "\n"
    if fmt != "csv":
        raise ValueError(f"unknown format {fmt!r}; valid: ['json', 'csv']")
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["path", "rank", "label", "score", "error"])
    for item in predictions:
        if "error" in item:
            writer.writerow([item["path"], "", "", "", item["error"]])
        for rank, entry in enumerate(item.get("top_k", ()), start=1):
            writer.writerow([item["path"], rank, entry["label"], entry["score"], ""])
    return out.getvalue()


def evaluate_adapter(
    adapter: str | Path,
    data_root: str,
    dataset: str | None = None,
    split: str | None = None,
    protocol: str = "default",
    backbone: str | None = None,
    batch_size: int = 32,
    device: str = "auto",
    cache_dir: str | None = None,
    skip_bad_audio: bool = False,
) -> dict:
    """Test accuracy of an adapter on a split of its dataset (default: the split it was trained on).

    With ``skip_bad_audio`` unusable files are left out and listed in the result
    (``skipped_audio``) and on stderr; without it they stop the evaluation, named.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    model = load_for_inference(adapter, backbone, device)
    metadata = model.metadata
    dataset = dataset or metadata["dataset"]
    split = split or metadata["split"]
    source = get_dataset(dataset)
    index = source.scan(data_root)
    splits = {s.name: s for s in source.splits(index, protocol=protocol)}
    if split not in splits:
        raise ValueError(f"split {split!r} not found for {dataset}; valid: {sorted(splits)}")
    if list(index.class_names) != list(model.class_names):
        raise ValueError(
            f"adapter classes {model.class_names[:5]}... do not match dataset classes {index.class_names[:5]}..."
        )
    # The whole dataset's features: the cache entry the training run built, so nothing is decoded again.
    data = index_features(index, frontend_from_settings(metadata["frontend"], model.backbone), cache_dir, skip_bad_audio)
    for path, reason in data.bad:
        print(f"audiopetl eval: skipped {path}: {reason}", file=sys.stderr)
    test_rows = data.rows(splits[split].test)
    device_ = next(model.parameters()).device
    # The precision the run trained in (recorded in the adapter), so eval reproduces its test accuracy.
    settings = LoopSettings(epochs=1, batch_size=batch_size, lr=1.0, device=device_, dtype=recorded_dtype(model))
    metrics = evaluate(model, Batches(data.features, data.labels, test_rows), settings)
    return {
        "dataset": dataset,
        "split": split,
        "test_accuracy": metrics["accuracy"],
        "num_test": len(test_rows),
        "skipped_audio": [{"path": path, "reason": reason} for path, reason in data.bad],
    }
