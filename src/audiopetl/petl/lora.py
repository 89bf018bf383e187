"""LoRA: a frozen projection plus a trainable, scaled low-rank update (paper Eq. 5).

``LoRALinear`` wraps one ``nn.Linear`` (kept as ``.base`` so fingerprints read its
weights under the plain name); :func:`inject_lora` puts one on every named projection
of every block through ``Block.replace_linear``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone.ast import AST, LowRankUpdate
from .config import LoRAConfig, reduced_size


class LoRALinear(LowRankUpdate):
    """``y = base(x) + scaling * x A B``, with A: (in, r), B: (r, out).

    As a :class:`~audiopetl.backbone.ast.LowRankUpdate`, a LoRA on q, k or v lets the
    attention run its frozen ``base`` inside the fused q/k/v GEMM and add its update there.

    ``lora_down`` holds A and ``lora_up`` holds B, stored as ``nn.Linear`` weights
    ((out, in) layout). ``init="default"``: A as ``nn.Linear`` would (kaiming-uniform,
    a=sqrt(5)) and B with zeros, so the wrapped layer starts as the pre-trained one.
    ``init="paper"``: both trunc-normal(std 0.02), what the published runs had (their
    A and B were ``nn.Linear`` layers that transformers' ``from_pretrained`` re-initialised).
    """

    def __init__(self, base: nn.Linear, rank: int, scaling: float, init: str = "default") -> None:
        super().__init__()
        if rank > min(base.in_features, base.out_features):
            raise ValueError(f"LoRA rank {rank} exceeds the projection size {tuple(base.weight.shape)}")
        self.base = base
        self.scaling = scaling
        self.lora_down = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_up = nn.Parameter(torch.zeros(base.out_features, rank))
        if init == "paper":
            nn.init.trunc_normal_(self.lora_down, std=0.02)
            nn.init.trunc_normal_(self.lora_up, std=0.02)
        else:
            nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_up @ self.lora_down) * self.scaling

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_down, self.lora_up * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:  # the update already lives in base.weight
            return out
        low_rank = F.linear(F.linear(x, self.lora_down), self.lora_up)
        return out + low_rank * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the frozen weight: inference then costs nothing extra."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.lora_down.shape[0]}, scaling={self.scaling:g}, merged={self.merged}"


def inject_lora(backbone: AST, config: LoRAConfig) -> list[nn.Module]:
    """Wrap ``config.targets`` of every block; returns the new modules."""
    rank = reduced_size(backbone.config.hidden_size, config.reduction_rate, "LoRAConfig")
    added = []
    for block in backbone.blocks:
        for target in config.targets:
            base = block.linear(target)
            if not isinstance(base, nn.Linear):
                raise ValueError(
                    f"projection {target!r} is already wrapped ({type(base).__name__}); one LoRA per projection"
                )
            wrapped = LoRALinear(base, rank, config.scaling, init=config.init)
            block.replace_linear(target, wrapped)
            added.append(wrapped)
    return added
