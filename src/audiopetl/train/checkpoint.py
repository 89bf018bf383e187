"""Atomic, pickle-free training checkpoints (for ``--resume``) and small file helpers.

A checkpoint holds the trainable tensors, optimizer and scheduler state, RNG states, the
epoch and the best weights so far (copies, never references to live parameters). It is
written to a temporary file in the same directory and renamed, so a run killed while
saving leaves the previous checkpoint intact; it is read with ``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path


def write_json(path: str | Path, payload: Any) -> None:
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def save_checkpoint(path: str | Path, state: dict) -> None:
    with atomic_path(path) as temp:
        torch.save(state, temp)


def load_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"cannot read training checkpoint {str(path)!r}: {error}") from error


def copy_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies: a 'best' snapshot must not follow later updates."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in tensors.items()}
