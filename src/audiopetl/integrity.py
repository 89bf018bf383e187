"""Integrity checks of what we store: checksums of tensors and files, and non-finite values.

Checkpoints, adapter files and feature-cache entries carry a checksum written with them
and verified when they are read, so a flipped byte is refused (or rebuilt) with the file
named instead of training or predicting NaN.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

CHUNK = 1 << 22


def _leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every tensor and plain value in a nested dict/list/tuple, with a path name, in a stable order."""
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _leaves(value[key], f"{prefix}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{prefix}/{i}")
    else:
        yield prefix, value


def digest_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """First 16 hex digits of a sha256 over ``tensors`` by sorted name, shape and float32 bytes
    (so it does not depend on dtype, device or key order): the backbone fingerprints'
    and the waveform frontend's encoder digest."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def tensor_checksum(value: Any) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of every tensor in ``value`` (a tensor
    or a nested dict/list of them), and the ``repr`` of every plain value beside them."""
    digest = hashlib.sha256()
    for name, leaf in _leaves(value):
        if isinstance(leaf, torch.Tensor):
            tensor = leaf.detach().to("cpu").contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{name}={leaf!r}\n".encode())
    return digest.hexdigest()


def file_checksum(path: str | Path) -> str:
    """BLAKE2b of a file's bytes, read in chunks (feature caches can be gigabytes)."""
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold NaN or infinite values."""
    return [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
