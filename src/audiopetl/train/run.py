"""One training run from a :class:`TrainConfig`: data -> features -> model -> fit, per split.

The backbone comes first: its frontend (filterbanks for AST, the frozen convolutional
feature encoder for the speech encoders) makes the cached features, so no epoch after
the first recomputes them.

The run directory holds ``config.yaml`` (the resolved configuration), one sub-directory
per split with its log, checkpoint, metrics and best adapter file, ``bad_audio.txt``
when files were skipped, and ``metrics.json`` with per-split and mean +- std test
accuracy. A run whose ``metrics.json`` exists is finished.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch
import yaml

from ..backbone import load_backbone
from ..data import SpecAugment, few_shot_subset, get_dataset, index_features, write_bad_audio_report
from ..petl import PETLModel, build_model, learning_rate_family, resolve_methods
from . import distributed
from .checkpoint import write_json
from .config import LEARNING_RATES, TrainConfig
from .embeddings import LinearProbeForward, pooled_embeddings
from .loop import Batches, LoopSettings, fit
from .precision import resolve_device, resolve_precision

METRICS = "metrics.json"
ADAPTER = "adapter.safetensors"


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill every ``None`` default from the dataset and method; validate the method early."""
    dataset = get_dataset(config.dataset)
    defaults = dataset.defaults
    methods = resolve_methods(config.method)
    return dataclasses.replace(
        config,
        max_frames=config.max_frames or defaults.max_frames,
        epochs=config.epochs or defaults.epochs,
        batch_size=config.batch_size or defaults.batch_size,
        specaugment=defaults.specaugment if config.specaugment is None else config.specaugment,
        lr=config.lr or LEARNING_RATES[learning_rate_family(methods)],
    )


def is_finished(run_dir: str | Path) -> bool:
    return (Path(run_dir) / METRICS).exists()


def run_training(config: TrainConfig, run_dir: str | Path, resume: bool = False) -> dict:
    """Train ``config`` on every selected split; returns (and writes) the run's metrics.

    Started as one of several ranks (torchrun, ``--nproc``) it trains data-parallel
    (:mod:`.distributed`); only rank 0 writes files.
    """
    config = resolve(config)
    ranks, device, created_group = distributed.setup(resolve_device(config.device))
    try:
        summary = _run_training(config, Path(run_dir), resume, ranks, device)
    except BaseException:
        distributed.teardown(created_group, wait=False)
        raise
    distributed.teardown(created_group)
    return summary


def _run_training(config: TrainConfig, run_dir: Path, resume: bool, ranks, device: torch.device) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    if ranks.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(_plain(config.to_dict()), sort_keys=False))

    methods = resolve_methods(config.method)
    settings = LoopSettings(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        betas=config.betas,
        eps=config.eps,
        grad_accum=config.grad_accum,
        seed=config.seed,
        device=device,
        dtype=resolve_precision(config.precision, device),
        progress=config.progress,
        tensorboard=config.tensorboard,
    )

    dataset = get_dataset(config.dataset)
    index = dataset.scan(config.data_root)
    splits = dataset.splits(index, protocol=config.protocol)
    if config.folds is not None:
        valid_folds = list(range(1, len(splits) + 1))
        unknown = [f for f in config.folds if f not in valid_folds]
        if unknown:
            raise ValueError(f"folds {unknown} do not exist for {config.dataset}; valid: {valid_folds}")
        splits = [splits[f - 1] for f in config.folds]

    backbone = load_backbone(config.backbone, max_frames=config.max_frames, pos_embed=config.pos_embed)
    frontend = backbone.frontend(config.max_frames)
    if not frontend.spectrogram:
        frontend.to(device)  # a convolutional feature encoder is worth the accelerator; filterbanks stay on the CPU
    data = index_features(index, frontend, config.cache_dir, config.skip_bad_audio, config.progress)
    if data.bad and ranks.is_main:
        write_bad_audio_report(run_dir / "bad_audio.txt", data.bad)
    features, labels = data.features, data.labels
    linear_probe = config.embedding_cache and all(m.to_dict()["method"] == "linear" for m in methods)
    embeddings = None
    if linear_probe:
        embeddings = pooled_embeddings(backbone, features, config.pooling, settings)

    results = []
    for split in splits:
        split_dir = run_dir / split.name
        train_idx = data.rows(split.train)
        if config.few_shot:
            train_idx = few_shot_subset(labels, train_idx, config.few_shot, seed=config.few_shot_seed)
        torch.manual_seed(config.seed)
        model = build_model(
            copy.deepcopy(backbone),
            methods,
            num_classes=len(index.class_names),
            pooling=config.pooling,
            extra_trainable=config.extra_trainable,
            class_names=index.class_names,
            metadata={
                "backbone": config.backbone,
                "pos_embed": config.pos_embed,
                "frontend": frontend.settings,
                "dataset": config.dataset,
                "split": split.name,
            },
        ).to(device)
        if config.grad_checkpointing:
            model.backbone.gradient_checkpointing = True
        if settings.dtype != torch.float32:
            model.cast_frozen(settings.dtype)
        inputs, forward, augment = features, None, None
        if linear_probe:
            inputs, forward = embeddings, LinearProbeForward(model)
        else:
            if config.compile:
                forward = torch.compile(model)
            if config.specaugment and frontend.spectrogram:  # not for waveform frontends' encoder features
                augment = SpecAugment()
        metrics = fit(
            model,
            Batches(inputs, labels, train_idx),
            Batches(inputs, labels, data.rows(split.valid)),
            Batches(inputs, labels, data.rows(split.test)),
            settings,
            split_dir,
            forward=forward,
            augment=augment,
            resume=resume,
        )
        if ranks.is_main:
            model.save_adapter(split_dir / ADAPTER, dtype=config.adapter_dtype)
        metrics.update(split=split.name, **_parameter_counts(model))
        results.append(metrics)

    accuracies = np.array([r["test_accuracy"] for r in results])
    summary = {
        "dataset": config.dataset,
        "method": [m.to_dict() for m in methods],
        "splits": results,
        "test_accuracy_mean": float(accuracies.mean()),
        "test_accuracy_std": float(accuracies.std()),
        "trainable_parameters": results[0]["trainable_parameters"],
        "paper_parameters": results[0]["paper_parameters"],
        "num_bad_audio": len(data.bad),
    }
    if ranks.is_main:
        write_json(run_dir / METRICS, summary)
    return summary


def _parameter_counts(model: PETLModel) -> dict:
    return {"trainable_parameters": model.num_trainable(), "paper_parameters": model.paper_parameter_count()}


def _plain(value):
    """Tuples -> lists so the YAML stays readable and safe_load-able."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


__all__ = ["ADAPTER", "METRICS", "is_finished", "resolve", "run_training"]
