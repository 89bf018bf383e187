"""Prompt tuning (shallow SPT, deep DPT) and prefix tuning.

Prompts are tokens placed at positions ``[s, s + p)`` with ``s = backbone.prompt_start``
(AST: right after [CLS] and the distillation token; speech encoders: first, right after
the positional convolution), through ``Block.insert_tokens``. SPT inserts
``p`` prompts before the first layer; DPT inserts before the first layer and, before each
later layer, overwrites those positions with that layer's own fresh prompts (VPT-deep).
With ``PromptConfig.distillation_token=False`` (AST, the published code) the first layer's
module replaces the distillation token instead: the sequence becomes [CLS, prompts,
patches] and the prompts live at ``[1, 1 + p)``.
Prefix tuning gives every layer's attention ``p / 2`` extra keys and ``p / 2`` extra values
through ``Attention.prefix``.

All are initialised uniform(-v, v), v = sqrt(6 / (fan_in + hidden)), VPT's xavier-style
bound with ``fan_in = backbone.input_fan_in`` (AST: patch_size**2, one input channel;
speech encoders: the feature encoder's width, the fan-in of their feature projection).
``init="paper"`` on the AST triples ``fan_in``: VPT's RGB bound
sqrt(6 / (3 * patch_size**2 + hidden)), which the published AST code kept. The published
code ran no speech encoder, and no RGB factor applies to one: there ``paper`` keeps the
backbone's own fan-in (the same bound as ``default``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..backbone.ast import AST, NUM_SPECIAL_TOKENS
from .config import PrefixConfig, PromptConfig


def _init_bound(backbone: AST, init: str) -> float:
    fan_in = backbone.input_fan_in
    if init == "paper" and isinstance(backbone, AST):
        fan_in *= 3  # VPT's three RGB input channels, kept by the published (AST-only) code
    return math.sqrt(6.0 / (fan_in + backbone.config.hidden_size))


class PromptTokens(nn.Module):
    """Inserts (``replace=False``) or overwrites (``replace=True``) the prompt positions.

    ``start``: tokens kept before the prompts; ``dropped``: tokens after those that inserting
    drops (1 for AST without the distillation token: ``[CLS, dist, patches] -> [CLS, prompts,
    patches]``).
    """

    def __init__(
        self, num_prompts: int, dim: int, bound: float, replace: bool, start: int = NUM_SPECIAL_TOKENS, dropped: int = 0
    ) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(1, num_prompts, dim).uniform_(-bound, bound))
        self.replace = replace
        self.start = start
        self.dropped = dropped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prompts = self.prompts.expand(len(x), -1, -1).to(x.dtype)
        start = self.start
        rest = x[:, start + prompts.shape[1] :] if self.replace else x[:, start + self.dropped :]
        return torch.cat([x[:, :start], prompts, rest], dim=1)

    def extra_repr(self) -> str:
        return f"num_prompts={self.prompts.shape[1]}, replace={self.replace}, start={self.start}, dropped={self.dropped}"


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
    dim, bound = backbone.config.hidden_size, _init_bound(backbone, config.init)
    start, dropped = backbone.prompt_start, 0
    if not config.distillation_token:
        if getattr(backbone, "dist_token", None) is None:
            raise ValueError("PromptConfig.distillation_token=False applies to backbones with a distillation token (AST)")
        start, dropped = backbone.prompt_start - 1, 1  # the distillation token sits just before the prompts
    blocks = backbone.blocks if config.deep else backbone.blocks[:1]
    added = []
    for index, block in enumerate(blocks):
        if block.insert_tokens is not None:
            raise ValueError(f"block {index} already holds prompt tokens; a model takes one prompt method")
        block.insert_tokens = PromptTokens(
            config.num_prompts, dim, bound, replace=index > 0, start=start, dropped=dropped
        )
        added.append(block.insert_tokens)
    return added


def inject_prefix(backbone: AST, config: PrefixConfig) -> list[nn.Module]:
    """A :class:`PrefixKV` in every block's attention; returns them."""
    dim, bound = backbone.config.hidden_size, _init_bound(backbone, config.init)
    added = []
    for index, block in enumerate(backbone.blocks):
        if block.attn.prefix is not None:
            raise ValueError(f"block {index} already holds a prefix; a model takes one prefix method")
        block.attn.prefix = PrefixKV(config.num_tokens, dim, bound)
        added.append(block.attn.prefix)
    return added
