"""Backbone families and the interface every backbone model provides.

A family is one module that defines ``MODEL_TYPES`` (the ``model_type`` values of the
transformers ``config.json`` files it reads), ``CONFIG`` / ``MODEL`` (its config dataclass
and model class), ``config_from_transformers(config_json, source)``,
``from_transformers(state, config_json, source) -> (model, ignored keys)`` and ``PRESETS`` / ``preset(name)`` (offline models with fixed-seed weights). Adding a
backbone is that module plus one line in :data:`FAMILIES`. AST, whose original release has
no ``config.json``, is read by :mod:`~audiopetl.backbone.checkpoint` itself.

Every model class provides what the PETL methods use, so that no method needs to know the
backbone it runs on:

* ``config`` (``hidden_size``, ``to_dict()``), ``blocks`` (each with the extension points of
  :class:`~audiopetl.backbone.ast.Block`; a model whose input has padding sets each block's
  ``frame_mask``), ``norm`` (the last LayerNorm before pooling,
  trained with every method; BitFit alone trains its bias only), ``encode(x)`` /
  ``forward(x) = norm(encode(x))``, ``gradient_checkpointing``;
* ``prompt_start`` (sequence position of inserted prompt tokens) and ``input_fan_in`` (fan-in
  of one input token, for the prompt init bound);
* ``embedding_biases()`` (the input embedding's biases; BitFit trains those of Linear and
  LayerNorm modules, not AST's patch convolution), ``trainable_groups()``
  (named parameter groups for ``extra_trainable``), ``poolings`` and
  ``pool(hidden, inputs, mode)``;
* ``frontend(max_frames)``: the :class:`~audiopetl.frontend.Frontend` that turns audio into
  this model's input, and ``frontend_parameters()``: the weights it runs (frozen by every
  method, full fine-tuning included, since the feature cache keeps their output).
"""

from __future__ import annotations

import re
from types import ModuleType

import torch
from torch import nn

from ..integrity import digest_tensors
from . import wav2vec2
from .ast import AST, ASTConfig

# One line per backbone family.
FAMILIES: tuple[ModuleType, ...] = (wav2vec2,)

MODEL_CLASSES: dict[type, type] = {ASTConfig: AST, **{family.CONFIG: family.MODEL for family in FAMILIES}}


def family_for_type(model_type: str | None) -> ModuleType | None:
    return next((f for f in FAMILIES if model_type in f.MODEL_TYPES), None)


def family_for_preset(name: str) -> ModuleType | None:
    return next((f for f in FAMILIES if name in f.PRESETS), None)


def preset_names() -> list[str]:
    return [name for family in FAMILIES for name in family.PRESETS]


def build_backbone(config) -> nn.Module:
    """A randomly initialised model for ``config`` (under ``torch.device("meta")``: shapes only)."""
    if type(config) not in MODEL_CLASSES:
        raise ValueError(f"no backbone for config type {type(config).__name__}; known: {list(MODEL_CLASSES)}")
    return MODEL_CLASSES[type(config)](config)


def fingerprint(model: nn.Module) -> str:
    """First 16 hex digits of a sha256 over the backbone's own tensors, of any family.

    The tensor names are those of a plain model of the same config (``X.base.weight``, a
    wrapped projection such as LoRA's, counts as ``X.weight``); injected modules are
    ignored. Each tensor is hashed by sorted name, shape and float32 bytes. For AST this
    equals :func:`~audiopetl.backbone.checkpoint.fingerprint_state_dict`.
    """
    with torch.device("meta"):
        names = set(build_backbone(model.config).state_dict())
    state = {re.sub(r"\.base\.(weight|bias)$", r".\1", k): t for k, t in model.state_dict().items()}
    return digest_tensors({key: state[key] for key in names})



__all__ = [
    "FAMILIES",
    "build_backbone",
    "family_for_preset",
    "family_for_type",
    "fingerprint",
    "preset_names",
]
