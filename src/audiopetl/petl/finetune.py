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
    """Every backbone weight but the frontend's (a speech encoder's cached feature encoder)."""
    frozen = {id(p) for p in backbone.frontend_parameters()}
    return [p for p in backbone.parameters() if id(p) not in frozen]


def linear_parameters(backbone: AST, config: LinearProbeConfig) -> list[nn.Parameter]:
    return []  # the head and final LayerNorm, trained with every method, are all it trains


def bitfit_parameters(backbone: AST, config: BitFitConfig) -> list[nn.Parameter]:
    """Biases of every Linear and LayerNorm of the encoder: the input embedding's
    (``backbone.embedding_biases()`` that belong to one: the speech encoders' feature
    projection and LayerNorm), the blocks' and the final LayerNorm's.

    The published code's set: at ViT-B, 12 layers x 8,448 biases (q, k, v, o: 4 x 768;
    FFN: 3,072 + 768; two LayerNorms: 2 x 768) + the final LayerNorm's 768 = 102,144, the
    paper's 102K. Convolutions (AST's patch embedding, the speech encoders' positional
    convolution) keep their biases frozen; so does the final LayerNorm its weight (see
    ``build_model``).
    """
    linear_or_norm = {
        id(module.bias)
        for module in backbone.modules()
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None
    }
    biases = [bias for bias in backbone.embedding_biases() if id(bias) in linear_or_norm]
    biases += [
        module.bias
        for module in backbone.blocks.modules()
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None
    ]
    return [*biases, backbone.norm.bias]


def extra_parameters(backbone: AST, names: Iterable[str]) -> list[nn.Parameter]:
    """Parameters named by ``extra_trainable``: ``final_norm``, ``block.N``, and the backbone's
    own groups (``backbone.trainable_groups()``: AST ``pos_embed``; speech encoders
    ``pos_conv``, ``feature_projection``).

    ``final_norm``: trained with every method anyway, except BitFit alone, which trains its
    bias only (as published); naming it there trains its weight too.
    """
    selected: list[nn.Parameter] = []
    groups = backbone.trainable_groups()
    for name in names:
        match = re.fullmatch(r"block\.(\d+)", name)
        if name in groups:
            selected.extend(groups[name])
        elif name == "final_norm":
            selected.extend(backbone.norm.parameters())
        elif match and int(match[1]) < len(backbone.blocks):
            selected.extend(backbone.blocks[int(match[1])].parameters())
        else:
            raise ValueError(
                f"unknown extra_trainable {name!r}; valid: {', '.join(map(repr, groups))}, 'final_norm', "
                f"'block.N' with N in 0..{len(backbone.blocks) - 1}"
            )
    return selected
