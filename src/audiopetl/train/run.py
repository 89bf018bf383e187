"""One training run from a :class:`TrainConfig`: data -> features -> model -> fit, per split.

The backbone comes first: its frontend (filterbanks for AST, the frozen convolutional
feature encoder for the speech encoders) makes the cached features, so no epoch after
the first recomputes them.

The run directory holds ``config.yaml`` (the resolved configuration, precision included,
which ``resume`` reads back and refuses to change), one sub-directory
per split with its log, checkpoint, metrics and best adapter file, ``bad_audio.txt``
when files were skipped, and ``metrics.json`` with per-split and mean +- std test
accuracy. A run whose ``metrics.json`` exists is finished. The directory is made only once
every option has been checked (dataset layout, splits, backbone, method): a refused run
leaves nothing behind.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from ..atomic import atomic_path, remove_stale_temporaries
from ..backbone import load_backbone
from ..data import SpecAugment, few_shot_subset, get_dataset, index_features, write_bad_audio_report
from ..frontend import Fbank, channel_policy
from ..petl import PETLModel, build_model, learning_rate_family, resolve_methods
from . import distributed
from .checkpoint import write_json
from .config import LEARNING_RATES, TrainConfig
from .embeddings import LinearProbeForward, pooled_embeddings
from .loop import Batches, LoopSettings, fit
from .precision import DTYPES, resolve_device, resolve_precision_name
from .setups import apply_setup

METRICS = "metrics.json"
CONFIG = "config.yaml"
ADAPTER = "adapter.safetensors"


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill every ``None`` default from the dataset and method; validate the method early."""
    dataset = get_dataset(config.dataset)
    defaults = dataset.defaults
    methods = resolve_methods(config.method)
    resolved = dataclasses.replace(
        config,
        max_frames=config.max_frames or defaults.max_frames,
        epochs=config.epochs or defaults.epochs,
        batch_size=config.batch_size or defaults.batch_size,
        specaugment=defaults.specaugment if config.specaugment is None else config.specaugment,
        lr=config.lr or LEARNING_RATES[learning_rate_family(methods)],
    )
    return apply_setup(resolved)


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


def resume_run(run_dir: str | Path, runtime: dict | None = None) -> dict:
    """Continue the run in ``run_dir`` with the configuration its ``config.yaml`` records
    (``runtime``: :data:`RUNTIME_OPTIONS` to change); returns the run's metrics.

    Started as one of several ranks, every rank joins the process group first and rank 0
    alone reads ``config.yaml`` for all of them: a rank whose shared file system shows a
    stale folder (no ``config.yaml`` yet) would otherwise fail alone, and the launcher would
    stop the others, the reason lost among their errors. The group's device is the one
    ``--device auto`` picks (``cuda:LOCAL_RANK`` where CUDA is available), as the run
    is not read yet.
    """
    run_dir = Path(run_dir)
    _, device, created_group = distributed.setup(resolve_device("auto"))
    try:
        config = distributed.broadcast(distributed.on_main(
            lambda: dataclasses.replace(recorded_config(run_dir), **(runtime or {})), f"read {run_dir / CONFIG}"))
        if created_group and resolve_device(config.device).type != device.type:
            raise ValueError(
                f"{run_dir / CONFIG} records device {config.device!r}, but the ranks joined their group on "
                f"{device.type} (the device 'auto' picks here); hide the GPUs (CUDA_VISIBLE_DEVICES=) to "
                "resume it on CPU"
            )
        summary = run_training(config, run_dir, resume=True)
    except BaseException:
        distributed.teardown(created_group, wait=False)
        raise
    distributed.teardown(created_group)
    return summary


def _run_training(config: TrainConfig, run_dir: Path, resume: bool, ranks, device: torch.device) -> dict:
    # Rank 0 reads the recorded configuration for every rank (no config.yaml: nothing was
    # started, as a sweep resuming every run finds): ranks on a shared file system may see it differently.
    recorded = distributed.on_main(
        lambda: check_resume(config, run_dir) if resume and (run_dir / CONFIG).exists() else config,
        f"read {run_dir / CONFIG}",
    )
    config = distributed.broadcast(recorded)
    # Rank 0's choice for every rank: ranks on CPUs that differ must not compute (or resume) differently.
    precision = distributed.gather(resolve_precision_name(config.precision, device))[0]
    config = dataclasses.replace(config, precision=precision)

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
        dtype=DTYPES[config.precision],
        progress=config.progress,
        tensorboard=config.tensorboard,
        fused_adamw=config.fused_adamw,
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
    unvalidated = [split.name for split in splits if not split.valid]
    if config.selection == "best" and unvalidated:
        raise ValueError(
            f"selection 'best' needs a validation split; {config.dataset} protocol {config.protocol!r} has none "
            f"for {unvalidated}: use selection 'last'"
        )

    # Everything that can fail without audio fails here, before the (long) feature computation.
    backbone = load_backbone(config.backbone, max_frames=config.max_frames, pos_embed=config.pos_embed)
    check_model(backbone, methods, len(index.class_names), config)
    set_backbone_knobs(backbone, config)
    frontend = _with_channels(backbone.frontend(config.max_frames), config.channels)

    # Only now, with every option checked, the run directory is made: a run refused above leaves nothing.
    distributed.on_main(lambda: _write_config(config, run_dir), f"write {run_dir / CONFIG}")
    if not frontend.spectrogram:
        frontend.to(device)  # a convolutional feature encoder is worth the accelerator; filterbanks stay on the CPU
    data = index_features(index, frontend, config.cache_dir, config.skip_bad_audio, config.progress)
    if data.bad:
        report = distributed.on_main(lambda: write_bad_audio_report(run_dir / "bad_audio.txt", data.bad),
                                     f"write {run_dir / 'bad_audio.txt'}")
        if ranks.is_main:
            warn(f"skipped {len(data.bad)} unusable audio file(s); the list with reasons is in {report}")
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
        if ranks.is_main:
            warn_untrained_classes(split.name, index.class_names, labels, train_idx, data.rows(split.test))
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
                "precision": config.precision,
                "setup": config.setup,
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
            if config.compile if config.compile is not None else device.type == "cuda":
                # Regional compilation where the backbone offers it (one graph for all blocks).
                if hasattr(model.backbone, "compile_blocks"):
                    model.backbone.compile_blocks()
                else:
                    forward = torch.compile(model)
            if config.specaugment and frontend.spectrogram:  # not for waveform frontends' encoder features
                augment = SpecAugment()
        # No selection given: the best validation epoch where the split has validation clips, else the last.
        selection = config.selection or ("best" if split.valid else "last")
        metrics = fit(
            model,
            Batches(inputs, labels, train_idx),
            Batches(inputs, labels, data.rows(split.valid)),
            Batches(inputs, labels, data.rows(split.test)),
            dataclasses.replace(settings, selection=selection),
            split_dir,
            forward=forward,
            augment=augment,
            resume=resume,
        )
        distributed.on_main(lambda: model.save_adapter(split_dir / ADAPTER, dtype=config.adapter_dtype),
                            f"write {split_dir / ADAPTER}")
        metrics.update(split=split.name, **_parameter_counts(model))
        results.append(metrics)

    accuracies = np.array([r["test_accuracy"] for r in results])
    summary = {
        "dataset": config.dataset,
        "setup": config.setup,
        "method": [m.to_dict() for m in methods],
        "splits": results,
        "test_accuracy_mean": float(accuracies.mean()),
        "test_accuracy_std": float(accuracies.std()),
        "trainable_parameters": results[0]["trainable_parameters"],
        "paper_parameters": results[0]["paper_parameters"],
        "num_bad_audio": len(data.bad),
    }
    distributed.on_main(lambda: write_json(run_dir / METRICS, summary), f"write {run_dir / METRICS}")
    return summary


def _write_config(config: TrainConfig, run_dir: Path) -> None:
    with atomic_path(run_dir / CONFIG) as temp:
        temp.write_text(yaml.safe_dump(_plain(config.to_dict()), sort_keys=False))
    remove_stale_temporaries(run_dir)


# Options a resumed run may change: they do not change what it computes.
RUNTIME_OPTIONS = ("progress", "tensorboard", "num_workers", "cache_dir")


def recorded_config(run_dir: str | Path) -> TrainConfig:
    """The configuration a run recorded in its ``config.yaml``."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: it has no {CONFIG} to resume from")
    try:
        values = yaml.safe_load(path.read_text())
        return TrainConfig.from_dict(values)
    except (yaml.YAMLError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the run's configuration ({error})") from error


def check_resume(config: TrainConfig, run_dir: str | Path) -> TrainConfig:
    """The run's recorded configuration, after checking ``config`` changes nothing that
    matters (a resumed run must end exactly as the uninterrupted one would)."""
    recorded = recorded_config(run_dir)
    if config.precision == "auto":  # means "as recorded", not "as this machine would choose"
        config = dataclasses.replace(config, precision=recorded.precision)
    ours, theirs = _plain(config.to_dict()), _plain(resolve(recorded).to_dict())
    changed = [k for k in ours if k not in RUNTIME_OPTIONS and ours[k] != theirs.get(k)]
    if changed:
        listing = ", ".join(f"{k} ({theirs.get(k)!r} -> {ours[k]!r})" for k in changed)
        raise ValueError(
            f"cannot resume {run_dir} with other options, they would change its result: {listing}; "
            f"resume with the options recorded in {Path(run_dir) / CONFIG}, or train a new run directory"
        )
    runtime = {k: getattr(config, k) for k in RUNTIME_OPTIONS}
    return dataclasses.replace(recorded, **runtime)


def check_model(backbone, methods, num_classes: int, config: TrainConfig) -> None:
    """Build the model on the meta device (no memory, no time) so a method that does not fit
    the backbone, an unknown extra-trainable name or pooling fails now, not after decoding."""
    with torch.device("meta"):
        build_model(
            type(backbone)(backbone.config), methods, num_classes=num_classes, pooling=config.pooling,
            extra_trainable=config.extra_trainable,
        )


def set_backbone_knobs(backbone, config: TrainConfig) -> None:
    """The backbone's fast-path knobs the run sets (``None``: the backbone's own default)."""
    for option, setter in (("fused_qkv", "set_fused_qkv"), ("attention_kernel", "set_attention_kernel")):
        value = getattr(config, option)
        if value is None:
            continue
        if not hasattr(backbone, setter):
            raise ValueError(f"{option}: the {type(backbone).__name__} backbone does not offer it; leave it unset")
        getattr(backbone, setter)(value)


def warn_untrained_classes(split: str, class_names, labels: np.ndarray, train_rows, test_rows) -> None:
    """Classes the test set has but training never sees can only be scored wrong."""
    trained = set(labels[train_rows].tolist())
    missing = sorted({class_names[c] for c in labels[test_rows].tolist() if c not in trained})
    if missing:
        warn(f"{split}: classes {missing} occur in the test set but not in the training set")


def warn(message: str) -> None:
    print(f"audiopetl: warning: {message}", file=sys.stderr, flush=True)


def _with_channels(frontend, channels: str):
    """``frontend`` decoding multi-channel files by ``channels``: the filterbank frontend records the policy."""
    if channels == channel_policy(frontend.settings):
        return frontend
    if not isinstance(frontend, Fbank):
        raise ValueError(f"channels={channels!r} applies to the filterbank frontend (AST) only")
    return Fbank(dataclasses.replace(frontend.config, channels=channels))


def _parameter_counts(model: PETLModel) -> dict:
    return {"trainable_parameters": model.num_trainable(), "paper_parameters": model.paper_parameter_count()}


def _plain(value):
    """Tuples -> lists so the YAML stays readable and safe_load-able."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


__all__ = ["ADAPTER", "CONFIG", "METRICS", "check_resume", "is_finished", "recorded_config", "resolve", "resume_run",
           "run_training"]
