"""Atomic, pickle-free, checksummed training checkpoints (for ``--resume``) and small file helpers.

A checkpoint holds the trainable tensors, optimizer and scheduler state, the state of the
generator that draws the batch order and SpecAugment masks, the epoch and the best weights
so far (copies, never references to live parameters), plus a SHA-256 of all its tensors
and values. It is written to a temporary file in the same directory and
renamed, so a run killed while saving leaves the previous checkpoint intact; it is read
with ``weights_only=True`` and refused, naming the file, when the checksum disagrees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import WriteError, atomic_path, write_error
from ..integrity import tensor_checksum

CHECKSUM = "checksum"


class CheckpointError(ValueError):
    """A training checkpoint that cannot be read or fails its checksum."""


def write_json(path: str | Path, payload: Any) -> None:
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def save_checkpoint(path: str | Path, state: dict) -> None:
    state = {**state, CHECKSUM: tensor_checksum(state)}
    try:
        with atomic_path(path) as temp:
            torch.save(state, temp)
    except WriteError:
        raise
    except RuntimeError as error:  # torch's writer reports a full disk as "enforce fail ... unexpected pos"
        raise write_error(path, error) from error


def load_checkpoint(path: str | Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"cannot read training checkpoint {str(path)!r}: {error}") from error
    stored = state.pop(CHECKSUM, None) if isinstance(state, dict) else None
    if stored is None or stored != tensor_checksum(state):
        raise CheckpointError(
            f"training checkpoint {str(path)!r} is corrupt (its tensors do not match their checksum); "
            "delete it to train this split from the start"
        )
    return state


def copy_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies: a 'best' snapshot must not follow later updates."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in tensors.items()}
