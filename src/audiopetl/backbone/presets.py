"""Backbones that need no download: ``tiny-random``, a small randomly initialised AST.

It stands in for a pre-trained checkpoint in the offline demo and in tests. Its weights
come from a fixed seed, so every machine builds the same ones and adapter files trained
on it can be reloaded (and fingerprint-checked) anywhere. Like the AudioSet checkpoints
its native input is 1024 frames; other clip lengths adapt its position table the same way.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

from .ast import AST, ASTConfig

T = TypeVar("T")

TINY_RANDOM = "tiny-random"
TINY_CONFIG = ASTConfig(hidden_size=96, num_layers=4, num_heads=4, mlp_size=384, max_frames=1024)
_SEED = 20231202


def seeded(seed: int, build: Callable[[], T]) -> T:
    """``build()`` under ``torch.manual_seed(seed)``, leaving the caller's random state as it was:
    a preset's weights are the same on every machine and in every test order."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return build()
    finally:
        torch.random.set_rng_state(state)


def tiny_random_state() -> dict[str, torch.Tensor]:
    """The deterministic state dict of ``tiny-random`` at its native 1024 frames."""
    return seeded(_SEED, lambda: AST(TINY_CONFIG).state_dict())
