"""Methods that add nothing and only unfreeze backbone tensors: full, linear probing, BitFit;
and the ``extra_trainable`` names any method can switch on.

Each function returns the backbone parameters to train. They run on the plain backbone,
before any module is injected, so a later wrapper (LoRA keeps the projection as ``.base``)
carries the same ``Parameter`` objects and their ``requires_grad``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from ..backbone.ast import AST
from .config import BitFitConfig, FullFinetuneConfig, LinearProbeConfig

def full_parameters(backbone: AST, config: FullFinetuneConfig) -> list[nn.Parameter]:
    return list(backbone.parameters())


def linear_parameters(backbone: AST, config: LinearProbeConfig) -> list[nn.Parameter]:
    return []  # the head and final LayerNorm, trained with every method, are all it trains


def bitfit_parameters(backbone: AST, config: BitFitConfig) -> list[nn.Parameter]:
    """Biases of every Linear and LayerNorm of the encoder, the final LayerNorm's included.

    The published code's set: at ViT-B, 12 layers x 8,448 biases (q, k, v, o: 4 x 768;
    FFN: 3,072 + 768; two LayerNorms: 2 x 768) + the final LayerNorm's 768 = 102,144, the
    paper's 102K. The patch-embedding conv is not a Linear and keeps its bias frozen; so
    does the final LayerNorm its weight (see ``build_model``).
    """
    return [
        module.bias
        for module in (*backbone.blocks.modules(), backbone.norm)
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None
    ]


def extra_parameters(backbone: AST, names: Iterable[str]) -> list[nn.Parameter]:
    """Parameters named by ``extra_trainable``: ``pos_embed``, ``final_norm``, ``block.N``.

    ``final_norm``: trained with every method anyway, except BitFit alone, which trains its
    bias only (as published); naming it there trains its weight too.
    """
    selected: list[nn.Parameter] = []
    for name in names:
        match = re.fullmatch(r"block\.(\d+)", name)
        if name == "pos_embed":
            selected.append(backbone.pos_embed)
        elif name == "final_norm":
            selected.extend(backbone.norm.parameters())
        elif match and int(match[1]) < len(backbone.blocks):
            selected.extend(backbone.blocks[int(match[1])].parameters())
        else:
            raise ValueError(
                f"unknown extra_trainable {name!r}; valid: 'pos_embed', 'final_norm', "
                f"'block.N' with N in 0..{len(backbone.blocks) - 1}"
            )
    return selected
