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
    """Biases of every Linear and LayerNorm in the blocks, and of the patch-embedding conv.

    The final LayerNorm's bias is left out here: it is trained with every method, and the
    paper's 102K excludes it.
    """
    biases = [backbone.patch_embed.proj.bias]
    for module in backbone.blocks.modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
            biases.append(module.bias)
    return biases


def extra_parameters(backbone: AST, names: Iterable[str]) -> list[nn.Parameter]:
    """Parameters named by ``extra_trainable``: ``pos_embed``, ``final_norm``, ``block.N``.

    ``final_norm`` is accepted for explicitness; it is trained with every method anyway.
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
