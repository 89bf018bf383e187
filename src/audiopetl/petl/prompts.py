"""Prompt tuning (shallow SPT, deep DPT) and prefix tuning.

Prompts are tokens placed right after [CLS] and the distillation token, at positions
``[2, 2 + p)``, through ``Block.insert_tokens``. SPT inserts ``p`` prompts before the first
layer; DPT inserts before the first layer and, before each later layer, overwrites those
positions with that layer's own fresh prompts (VPT-deep). With
``PromptConfig.distillation_token=False`` (the published code) the first layer's module
replaces the distillation token instead: the sequence becomes [CLS, prompts, patches] and
the prompts live at ``[1, 1 + p)``.
Prefix tuning gives every layer's attention ``p / 2`` extra keys and ``p / 2`` extra values
through ``Attention.prefix``.

All are initialised uniform(-v, v). ``init="default"``: v = sqrt(6 / (patch_size**2 + hidden)),
VPT's xavier-style bound with one input channel (spectrograms, not RGB); ``init="paper"``:
v = sqrt(6 / (3 * patch_size**2 + hidden)), VPT's RGB bound, as the published code kept it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..backbone.ast import AST, NUM_SPECIAL_TOKENS, ASTConfig
from .config import PrefixConfig, PromptConfig


def _init_bound(config: ASTConfig, init: str) -> float:
    channels = 3 if init == "paper" else 1
    return math.sqrt(6.0 / (channels * config.patch_size**2 + config.hidden_size))


class PromptTokens(nn.Module):
    """Inserts (``replace=False``) or overwrites (``replace=True``) the prompt positions.

    ``distillation_token=False``: prompts start at position 1, and inserting drops the
    distillation token (``[CLS, dist, patches] -> [CLS, prompts, patches]``).
    """

    def __init__(self, num_prompts: int, dim: int, bound: float, replace: bool, distillation_token: bool = True) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(1, num_prompts, dim).uniform_(-bound, bound))
        self.replace = replace
        self.distillation_token = distillation_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prompts = self.prompts.expand(len(x), -1, -1).to(x.dtype)
        start = NUM_SPECIAL_TOKENS if self.distillation_token else 1  # tokens kept before the prompts
        rest = x[:, start + prompts.shape[1] :] if self.replace else x[:, NUM_SPECIAL_TOKENS:]
        return torch.cat([x[:, :start], prompts, rest], dim=1)

    def extra_repr(self) -> str:
        return (
            f"num_prompts={self.prompts.shape[1]}, replace={self.replace}, "
            f"distillation_token={self.distillation_token}"
        )


class PrefixKV(nn.Module):
    """Learned keys and values, (1, p / 2, hidden) each, returned per batch for ``Attention.prefix``."""

    def __init__(self, num_tokens: int, dim: int, bound: float) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.empty(1, num_tokens // 2, dim).uniform_(-bound, bound))
        self.values = nn.Parameter(torch.empty(1, num_tokens // 2, dim).uniform_(-bound, bound))

    def forward(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys.expand(batch, -1, -1), self.values.expand(batch, -1, -1)


def inject_prompts(backbone: AST, config: PromptConfig) -> list[nn.Module]:
    """Prompt modules on the first block (SPT) or on every block (DPT); returns them."""
    dim, bound = backbone.config.hidden_size, _init_bound(backbone.config, config.init)
    blocks = backbone.blocks if config.deep else backbone.blocks[:1]
    added = []
    for index, block in enumerate(blocks):
        if block.insert_tokens is not None:
            raise ValueError(f"block {index} already holds prompt tokens; a model takes one prompt method")
        block.insert_tokens = PromptTokens(
            config.num_prompts, dim, bound, replace=index > 0, distillation_token=config.distillation_token
        )
        added.append(block.insert_tokens)
    return added


def inject_prefix(backbone: AST, config: PrefixConfig) -> list[nn.Module]:
    """A :class:`PrefixKV` in every block's attention; returns them."""
    dim, bound = backbone.config.hidden_size, _init_bound(backbone.config, config.init)
    added = []
    for index, block in enumerate(backbone.blocks):
        if block.attn.prefix is not None:
            raise ValueError(f"block {index} already holds a prefix; a model takes one prefix method")
        block.attn.prefix = PrefixKV(config.num_tokens, dim, bound)
        added.append(block.attn.prefix)
    return added
