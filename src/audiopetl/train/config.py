"""The typed configuration of one training run, validated before any work starts.

Everything a run needs is here, with the paper's setup as defaults: AdamW (0.9, 0.98),
eps 1e-6, weight decay 0.1, cosine schedule per step, learning rate by method family,
epochs/batch size/clip length by dataset. ``None`` fields mean "the dataset's or the
method's default" and are filled in by :func:`resolve`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..backbone import POS_EMBED_MODES
from ..backbone.ast import ATTENTION_KERNELS
from ..dataclass_dict import from_dict
from ..frontend.audio import CHANNEL_POLICIES
from ..petl.files import STORAGE_DTYPES
from .loop import SELECTIONS
from .precision import PRECISIONS

# Paper Sec. III-A and the reference hyper-parameters.
LEARNING_RATES = {"adapter": 5e-3, "prompt": 1e-2, "linear": 1e-3, "full": 5e-5}
# "default": our setup; "paper": what the published code ran (see train/setups.py).
SETUPS = ("default", "paper")


@dataclass
class TrainConfig:
    dataset: str
    data_root: str
    method: Any = "lora"  # preset name, a method dict, or a list of them (combinations)
    backbone: str = "MIT/ast-finetuned-audioset-10-10-0.4593"
    setup: str = "default"  # "paper": reproduce the published setup (fixes the fields setups.py lists)
    pos_embed: str = "adapt"
    pooling: str = "mean"
    extra_trainable: tuple[str, ...] = ()
    protocol: str = "default"
    folds: tuple[int, ...] | None = None  # which splits of the protocol to run (1-based); None = all
    few_shot: int | None = None
    few_shot_seed: int = 0
    max_frames: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_accum: int = 1
    specaugment: bool | None = None
    channels: str = "mean"  # multi-channel files: "mean" of the channels or the "first" one
    selection: str | None = None  # tested weights: "best" valid epoch, "last"; None: best if the split validates
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    grad_checkpointing: bool = False
    compile: bool | None = None  # torch.compile the blocks (the whole model if the backbone cannot); None: on for CUDA, off on CPU
    fused_qkv: bool | None = None  # one q/k/v GEMM (AST); None: on for CUDA, off on CPU (measured slower there)
    fused_adamw: bool | None = None  # one fused AdamW kernel; None: on for CUDA, off on CPU
    attention_kernel: str | None = None  # AST: "sdpa" or "matmul"; None: backbone.ast.attention_kernel's choice
    embedding_cache: bool = True  # linear probing: train the head on cached embeddings
    adapter_dtype: str = "fp32"  # storage of the shipped adapter file: fp32 (exact), fp16 or bf16 (half size)
    skip_bad_audio: bool = False
    cache_dir: str | None = None
    num_workers: int = 0
    tensorboard: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes stored with the run

    def __post_init__(self) -> None:
        self.extra_trainable = tuple(self.extra_trainable)
        self.betas = tuple(self.betas)
        if self.folds is not None:
            self.folds = tuple(int(f) for f in self.folds)
        _check_choice("setup", self.setup, SETUPS)
        _check_choice("channels", self.channels, CHANNEL_POLICIES)
        if self.selection is not None:
            _check_choice("selection", self.selection, SELECTIONS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("pos_embed", self.pos_embed, POS_EMBED_MODES)
        _check_choice("adapter_dtype", self.adapter_dtype, STORAGE_DTYPES)
        if self.attention_kernel is not None:
            _check_choice("attention_kernel", self.attention_kernel, ATTENTION_KERNELS)
        for name in ("epochs", "batch_size", "max_frames", "few_shot"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.grad_accum < 1:
            raise ValueError(f"TrainConfig.grad_accum must be >= 1, got {self.grad_accum}")
        # `not (low <= x < high)` also refuses NaN, which every comparison fails.
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ValueError(f"TrainConfig.lr must be a finite positive number, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"TrainConfig.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 < self.eps < math.inf:
            raise ValueError(f"TrainConfig.eps must be a finite positive number, got {self.eps}")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return from_dict(cls, values, what="training options")


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"TrainConfig.{name}={value!r} is not valid; choose one of {list(choices)}")
