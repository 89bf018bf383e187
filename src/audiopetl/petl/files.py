"""Adapter files: the trained tensors as safetensors, with everything needed to rebuild the model.

The safetensors metadata holds one JSON entry, ``audiopetl``: format version, method
configs, head size, pooling, extra trainable names, class names, the backbone's source,
config and weight fingerprint, the caller's metadata (frontend settings, dataset, the
precision it was trained in...) and a SHA-256 of the tensors. Saving refuses NaN/Inf tensors.
Loading verifies the checksum and finiteness, rebuilds the model on the backbone the file
names (or the one given) and refuses a backbone whose config or fingerprint differs, and
files that cannot be read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..atomic import WriteError, atomic_path, write_error
from ..integrity import non_finite, tensor_checksum
from .registry import method_from_dict

if TYPE_CHECKING:
    from ..backbone.ast import AST
    from .model import PETLModel

HEADER_KEY = "audiopetl"
FORMAT = "audiopetl-adapter"
FORMAT_VERSION = 1


class AdapterFileError(ValueError):
    """An adapter file that is unreadable, malformed, or made for another backbone."""


STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_adapter(
    model: PETLModel, path: str | Path, extra_metadata: dict | None = None, dtype: str = "fp32"
) -> Path:
    """Write ``model``'s trained tensors and metadata to ``path`` atomically; returns the path.

    ``dtype="fp16"`` (or ``"bf16"``) halves the file for shipping; loading casts back to
    the model's dtype, so outputs then match to half precision instead of exactly.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown adapter dtype {dtype!r}; valid: {list(STORAGE_DTYPES)}")
    if any(layer.merged for layer in model.lora_layers()):
        raise ValueError("LoRA is merged into the backbone weights; call unmerge_lora() before save_adapter()")
    if model.backbone_record["fingerprint"] is None:
        raise ValueError("cannot save an adapter of a model without weights (built on the meta device)")
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "methods": [m.to_dict() for m in model.methods],
        "num_classes": model.num_classes,
        "pooling": model.pooling,
        "extra_trainable": list(model.extra_trainable),
        "class_names": model.class_names,
        "backbone": model.backbone_record,
        "metadata": {**model.metadata, **(extra_metadata or {})},
    }
    stored = STORAGE_DTYPES[dtype]
    tensors = {
        # Integer buffers (BatchNorm's step count) keep their dtype.
        name: t.detach().cpu().to(stored if t.is_floating_point() else t.dtype).contiguous()
        for name, t in model.adapter_state_dict().items()
    }
    bad = non_finite(tensors)
    if bad:
        raise ValueError(f"not saving {str(path)!r}: tensors {bad[:5]} hold NaN or infinite values")
    header["checksum"] = tensor_checksum(tensors)
    path = Path(path)
    try:
        with atomic_path(path) as temp:
            save_file(tensors, temp, metadata={HEADER_KEY: json.dumps(header)})
    except WriteError:
        raise
    except Exception as error:  # safetensors reports write failures with its own error type
        raise write_error(path, error) from error
    return path


def read_adapter_metadata(path: str | Path) -> dict:
    """The file's JSON header (see the module docstring), without loading tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(HEADER_KEY)
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise AdapterFileError(f"{path}: not a readable safetensors file ({err})") from err
    if raw is None:
        raise AdapterFileError(f"{path}: no '{HEADER_KEY}' metadata; not an audiopetl adapter file")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{path}: corrupt '{HEADER_KEY}' metadata ({err})") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise AdapterFileError(f"{path}: not an audiopetl adapter file")
    if header.get("version") != FORMAT_VERSION:
        raise AdapterFileError(
            f"{path}: adapter format version {header.get('version')!r}, this audiopetl reads version {FORMAT_VERSION}"
        )
    return header


def load_adapter(path: str | Path, backbone: AST | None = None, map_location: str | torch.device = "cpu") -> PETLModel:
    """Rebuild the model saved at ``path``.

    Without ``backbone`` the one the file names is loaded (``load_backbone``) onto
    ``map_location``. A backbone with another config or other weights is refused.
    """
    from .model import build_model

    header = read_adapter_metadata(path)
    try:
        tensors = load_file(str(path), device=str(map_location))
    except Exception as err:
        raise AdapterFileError(f"{path}: cannot read the tensors ({err})") from err
    record = header["backbone"]
    if backbone is None:
        backbone = load_recorded_backbone(path, record).to(map_location)
    _check_backbone(path, record, backbone)
    try:
        methods = [method_from_dict(values) for values in header["methods"]]
    except ValueError as err:
        raise AdapterFileError(f"{path}: invalid method config ({err})") from err
    model = build_model(
        backbone,
        methods,
        num_classes=header["num_classes"],
        pooling=header["pooling"],
        extra_trainable=header["extra_trainable"],
        class_names=header["class_names"],
        metadata=header["metadata"],
    )
    _load_trained(path, model, tensors)
    _check_integrity(path, header, tensors)
    return model


def load_recorded_backbone(path: str | Path, record: dict) -> torch.nn.Module:
    """The backbone an adapter file's ``backbone`` record names, of any family (CPU).

    ``max_frames`` and ``pos_embed`` are recorded for AST only; speech encoders take neither.
    """
    from ..backbone.checkpoint import load_backbone

    if not record.get("source"):
        raise AdapterFileError(f"{path}: the file names no backbone to load; pass backbone=")
    return load_backbone(
        record["source"], max_frames=record["config"].get("max_frames"), pos_embed=record.get("pos_embed") or "adapt"
    )


def _check_backbone(path: str | Path, record: dict, backbone: AST) -> None:
    from ..backbone.registry import fingerprint

    made_for = record.get("source") or "an unnamed backbone"
    config = backbone.config.to_dict()
    differing = {k: (v, config.get(k)) for k, v in record["config"].items() if config.get(k) != v}
    if differing:
        detail = ", ".join(f"{k}: file {a!r} vs backbone {b!r}" for k, (a, b) in differing.items())
        raise AdapterFileError(f"{path}: made for {made_for} with another backbone config ({detail})")
    digest = fingerprint(backbone)
    if digest != record["fingerprint"]:
        raise AdapterFileError(
            f"{path}: made for {made_for} (weights fingerprint {record['fingerprint']}), but the given backbone "
            f"{getattr(backbone, 'source', '')!r} has fingerprint {digest}; load the backbone it was trained on"
        )


def _check_integrity(path: str | Path, header: dict, tensors: dict[str, torch.Tensor]) -> None:
    if "checksum" not in header:  # not a damaged file: one written before files carried a checksum
        raise AdapterFileError(
            f"{path}: the file has no tensor checksum (written by an older audiopetl), so it cannot be "
            "verified; save the adapter again with this version"
        )
    if header["checksum"] != tensor_checksum(tensors):
        raise AdapterFileError(f"{path}: the file is corrupt (its tensors do not match the checksum in its header)")
    bad = non_finite(tensors)
    if bad:
        raise AdapterFileError(f"{path}: tensors {bad[:5]} hold NaN or infinite values; the adapter is unusable")


def _load_trained(path: str | Path, model: PETLModel, tensors: dict[str, torch.Tensor]) -> None:
    expected = model.adapter_state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(f"{path}: tensors do not match the method (missing {missing}, unexpected {unexpected})")
    wrong = [k for k, t in tensors.items() if t.shape != expected[k].shape]
    if wrong:
        raise AdapterFileError(f"{path}: tensors with wrong shapes: {wrong}")
    with torch.no_grad():
        for name, tensor in (*model.named_parameters(), *model.named_buffers()):
            if name in tensors:
                tensor.copy_(tensors[name])
