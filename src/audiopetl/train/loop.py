"""The training loop for one split: train, select on validation, test the selected weights.

Read it top to bottom: :func:`fit` builds AdamW and a per-step cosine schedule over the
trainable parameters only, runs the epochs (SpecAugment on the fly, gradient
accumulation, autocast), evaluates the validation split after each epoch, keeps a copy
of the best trainable tensors, checkpoints atomically, and finally scores the test split
with the weights ``LoopSettings.selection`` names: the best validation epoch (``best``)
or the last epoch (``last``, what the published code reported). ``resume=True``
continues from the split's checkpoint and ends exactly where an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..atomic import atomic_path, remove_stale_temporaries
from ..integrity import non_finite
from ..petl.model import PETLModel
from . import distributed
from .checkpoint import CheckpointError, copy_state, load_checkpoint, save_checkpoint, write_json

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
SELECTIONS = ("best", "last")


@dataclass
class LoopSettings:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_accum: int = 1
    seed: int = 0
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    progress: bool = True
    tensorboard: bool = False
    selection: str = "best"  # weights tested: "best" validation epoch or "last" epoch (see SELECTIONS)
    fused_adamw: bool | None = None  # one fused AdamW kernel; None: on for CUDA, off on CPU (not measured there)


@dataclass
class Batches:
    """Clips ``indices`` of a feature array, served in (optionally shuffled) batches.

    ``inputs`` is anything indexable by a numpy index array: a memory-mapped feature
    cache (batch, frames, mel) or an embedding table (batch, hidden).
    """

    inputs: np.ndarray
    labels: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def iterate(self, batch_size: int, generator: torch.Generator | None = None):
        order = self.indices
        if generator is not None:
            order = order[torch.randperm(len(order), generator=generator).numpy()]
        for start in range(0, len(order), batch_size):
            chunk = np.sort(order[start : start + batch_size])  # sorted reads are kinder to a memmap
            yield torch.from_numpy(np.ascontiguousarray(self.inputs[chunk])), torch.from_numpy(self.labels[chunk])


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
    )


def autocast(settings: LoopSettings):
    if settings.dtype == torch.float32:
        return nullcontext()
    return torch.autocast(settings.device.type, dtype=settings.dtype)


@torch.no_grad()
def evaluate(forward: Callable, batches: Batches, settings: LoopSettings) -> dict:
    """Accuracy and mean loss of ``forward`` on ``batches``; also returns the predictions.

    Under data parallelism each rank scores its contiguous share; the results are gathered.
    """
    predictions, losses = [], []
    shard = Batches(batches.inputs, batches.labels, batches.indices[distributed.share(len(batches))])
    for inputs, labels in shard.iterate(settings.batch_size):
        with autocast(settings):
            logits = forward(inputs.to(settings.device)).float()
        labels = labels.to(settings.device)
        losses.append(F.cross_entropy(logits, labels, reduction="sum").item())
        predictions.append(logits.argmax(-1).cpu())
    predicted = torch.cat(predictions).numpy() if predictions else np.zeros(0, dtype=np.int64)
    predicted = np.concatenate(distributed.gather(predicted))
    (loss_sum,) = distributed.all_sum(sum(losses))
    truth = batches.labels[batches.indices]
    count = max(1, len(truth))
    return {
        "accuracy": float((predicted == truth).mean()) if len(truth) else float("nan"),
        "loss": loss_sum / count,
        "predictions": predicted,
    }


def fit(
    model: torch.nn.Module,
    train: Batches,
    valid: Batches,
    test: Batches,
    settings: LoopSettings,
    run_dir: str | Path,
    forward: Callable | None = None,
    augment: Callable | None = None,
    resume: bool = False,
) -> dict:
    """Train ``model`` and return final metrics; writes log, checkpoint and metrics to ``run_dir``.

    ``forward`` maps a batch of inputs to logits (default: ``model``); linear probing on
    cached embeddings passes its own. ``augment(inputs, generator)`` runs on training
    batches only.
    """
    if settings.selection not in SELECTIONS:
        raise ValueError(f"unknown selection {settings.selection!r}; valid: {list(SELECTIONS)}")
    if settings.selection == "best" and not len(valid):
        raise ValueError("selection 'best' needs validation clips and this split has none; use selection 'last'")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    forward = model if forward is None else forward
    ranks = distributed.current()
    train_forward = distributed.wrap(forward, settings.device)  # DDP when several ranks; ``forward`` evaluates
    params = [p for p in model.parameters() if p.requires_grad]
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if isinstance(model, PETLModel):
        # A PETL model's trained state also holds buffers training updates (the Conformer
        # adapter's BatchNorm statistics): best-epoch selection and resume must keep them.
        named = model.adapter_state_dict()
    fused = settings.fused_adamw if settings.fused_adamw is not None else settings.device.type == "cuda"
    optimizer = torch.optim.AdamW(
        params, lr=settings.lr, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay,
        fused=fused,
    )
    steps_per_epoch = math.ceil(math.ceil(len(train) / settings.batch_size) / settings.grad_accum)
    scheduler = cosine_schedule(optimizer, settings.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(settings.seed)
    best = {"accuracy": -1.0, "epoch": 0, "state": copy_state(named)}
    start_epoch = 1

    checkpoint_path = run_dir / CHECKPOINT
    distributed.on_main(lambda: remove_stale_temporaries(run_dir), f"clean up {run_dir}")  # a killed run's leftovers
    # Rank 0 decides for every rank whether to resume (a shared file system may show ranks different things).
    if distributed.broadcast(resume and checkpoint_path.exists()):
        state = load_checkpoint(checkpoint_path)
        epochs = distributed.gather(state["epoch"])
        if len(set(epochs)) > 1:
            raise CheckpointError(
                f"the ranks read different versions of {str(checkpoint_path)!r} (epochs {epochs}): the file "
                "system shows them different contents; resume when every machine sees the same file"
            )
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                named[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        best = state["best"]
        start_epoch = state["epoch"] + 1
    distributed.on_main(lambda: trim_log(run_dir / LOG, last_epoch=start_epoch - 1), f"write {run_dir / LOG}")

    writer = distributed.on_main(lambda: _tensorboard(run_dir), "start TensorBoard") if settings.tensorboard else None
    for epoch in range(start_epoch, settings.epochs + 1):
        model.train()
        started = time.perf_counter()
        total_loss, correct, seen = 0.0, 0, 0
        steps = math.ceil(len(train) / settings.batch_size)
        bar = tqdm(
            train.iterate(settings.batch_size, generator),
            total=steps,
            desc=f"{run_dir.name} epoch {epoch}/{settings.epochs}",
            disable=not (settings.progress and ranks.is_main),
            leave=False,
        )
        optimizer.zero_grad(set_to_none=True)
        for step, (inputs, labels) in enumerate(bar, start=1):
            inputs, labels = inputs.to(settings.device), labels.to(settings.device)
            if augment is not None:
                inputs = augment(inputs, generator)  # on the whole global batch: same masks on every rank
            count = len(labels)
            inputs, labels = distributed.local_part(inputs, labels)
            with autocast(settings):
                logits = train_forward(inputs).float()
            # Sum over this rank's clips / global count * ranks: DDP's mean over ranks then gives
            # the global-batch mean, whatever share each rank had.
            loss_sum = F.cross_entropy(logits, labels, reduction="sum")
            _check_finite(loss_sum / max(1, len(labels)), run_dir, epoch, step)
            (loss_sum / count * ranks.world_size / settings.grad_accum).backward()
            if step % settings.grad_accum == 0 or step == steps:
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            total_loss += loss_sum.item()
            correct += int((logits.argmax(-1) == labels).sum())
            seen += len(labels)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", clips_per_s=f"{seen / (time.perf_counter() - started):.1f}")
        elapsed = time.perf_counter() - started
        total_loss, correct, seen = distributed.all_sum(total_loss, correct, seen)

        _check_weights(named, run_dir, epoch)
        model.eval()
        valid_metrics = evaluate(forward, valid, settings) if len(valid) else {"accuracy": None, "loss": None}
        if settings.selection == "best" and valid_metrics["accuracy"] > best["accuracy"]:
            best = {"accuracy": valid_metrics["accuracy"], "epoch": epoch, "state": copy_state(named)}
        record = {
            "epoch": epoch,
            "train_loss": total_loss / max(1, seen),
            "train_accuracy": correct / max(1, seen),
            "valid_loss": valid_metrics["loss"],
            "valid_accuracy": valid_metrics["accuracy"],
            "lr": optimizer.param_groups[0]["lr"],
            "clips_per_s": seen / elapsed if elapsed > 0 else float("nan"),
            "seconds": elapsed,
        }
        # Rank 0 writes the epoch's log line and checkpoint (and builds the checkpoint: no other rank needs it).
        distributed.on_main(
            lambda: _record_epoch(run_dir, record, writer, {
                "epoch": epoch,
                "trainable": copy_state(named),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "best": best,
            }),
            f"write in {run_dir}",
        )
        if settings.progress and ranks.is_main:
            valid_text = "" if valid_metrics["accuracy"] is None else f" valid acc {valid_metrics['accuracy']:.4f}"
            tqdm.write(
                f"{run_dir.name} epoch {epoch}: loss {record['train_loss']:.4f}{valid_text} "
                f"({record['clips_per_s']:.1f} clips/s)"
            )
    if writer is not None:
        writer.close()

    if settings.selection == "best":
        with torch.no_grad():
            for name, tensor in best["state"].items():
                named[name].copy_(tensor)
    model.eval()
    test_metrics = evaluate(forward, test, settings)
    metrics = {
        "test_accuracy": test_metrics["accuracy"],
        "test_loss": test_metrics["loss"],
        "selection": settings.selection,
        "tested_epoch": best["epoch"] if settings.selection == "best" else settings.epochs,
        "best_valid_accuracy": best["accuracy"] if settings.selection == "best" else None,
        "best_epoch": best["epoch"] if settings.selection == "best" else None,
        "epochs": settings.epochs,
        "num_train": len(train),
        "num_valid": len(valid),
        "num_test": len(test),
    }
    distributed.on_main(lambda: write_json(run_dir / "metrics.json", metrics), f"write {run_dir / 'metrics.json'}")
    return metrics


def _record_epoch(run_dir: Path, record: dict, writer, state: dict) -> None:
    """Rank 0's files of an epoch: its log line (and TensorBoard scalars), then the checkpoint."""
    with open(run_dir / LOG, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    if writer is not None:
        for key, value in record.items():
            if value is not None:  # no validation split: no valid_* scalars
                writer.add_scalar(key, value, record["epoch"])
    save_checkpoint(run_dir / CHECKPOINT, state)


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss became NaN or infinite."""


def _check_finite(loss: torch.Tensor, run_dir: Path, epoch: int, step: int) -> None:
    """Stop at the first non-finite loss, before it reaches the weights or a checkpoint
    (on every rank at once: a rank that stopped alone would leave the others waiting)."""
    finite = bool(torch.isfinite(loss))
    if distributed.current().world_size > 1:
        finite = distributed.all_sum(float(not finite))[0] == 0
    if finite:
        return
    kept = f"the checkpoint of epoch {epoch - 1} is kept in {run_dir}" if epoch > 1 else "no checkpoint was written"
    raise NonFiniteLossError(
        f"{run_dir.name}: the training loss became NaN or infinite at epoch {epoch}, step {step}; training stopped "
        f"({kept}). Lower the learning rate (--lr) and train again"
    )


def _check_weights(named: dict[str, torch.Tensor], run_dir: Path, epoch: int) -> None:
    """An update that overflowed leaves non-finite weights: never checkpoint or ship them."""
    bad = non_finite(named)
    if bad:
        raise NonFiniteLossError(
            f"{run_dir.name}: trained tensors {bad[:3]} became NaN or infinite in epoch {epoch}; training stopped "
            f"(the last good checkpoint is kept in {run_dir}). Lower the learning rate (--lr) and train again"
        )


def trim_log(path: Path, last_epoch: int) -> None:
    """Keep the log's records of epochs up to ``last_epoch`` (the checkpoint's): a run killed
    between writing its log line and its checkpoint repeats that epoch on resume, and a
    fresh run (``last_epoch`` 0) starts an empty log."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if record.get("epoch", last_epoch + 1) <= last_epoch:
            kept.append(line)
    if not kept:
        path.unlink()
        return
    with atomic_path(path) as temp:
        temp.write_text("".join(line + "\n" for line in kept))


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise RuntimeError("--tensorboard needs the tensorboard package: pip install tensorboard") from error
    return SummaryWriter(str(run_dir / "tensorboard"))
