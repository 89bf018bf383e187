"""Adapters: the Bottleneck and Convpass modules, and where they sit in a layer.

Placement uses the sub-layer taps of :class:`~audiopetl.backbone.ast.SublayerTaps`. With
``n = LN(x)`` the sub-layer's normalised input, ``f`` the sub-layer, ``A`` the adapter
and ``[+ z]`` the optional residual (the reference implementation's wiring):

* sequential-after  (Eq. 6):  ``y = A(f(n)) [+ f(n)]``          -> an output transform;
* sequential-before:          ``y = f(A(n) [+ n])``             -> an input transform;
* parallel-before   (Eq. 7):  ``y = f(n) + A(n) [+ n]``         -> a branch reading ``n``;
* parallel-after:             ``y = f(n) + A(f(n)) [+ f(n)]``   -> a branch reading ``f(n)``;
and the block adds ``x + y``. Eq. 7 writes the parallel adapter's input as the
un-normalised X^; like the reference code we feed it LN(X^), the sub-layer's own input.
Sequential-after with residual equals parallel-after without, hence Table III's
"Seq/Par-After" rows.

Post-LN blocks (the base wav2vec 2.0 / HuBERT / WavLM models, whose sub-layers compute
``LN(x + f(x))``; :class:`~audiopetl.backbone.wav2vec2.PostNormTaps`) use the same taps with
``n = x``, the sub-layer input (the previous LayerNorm's output), and return ``LN(x + y)``:
every placement's ``y`` above joins the residual sum before the sub-layer's LayerNorm, and
the LayerNorm trained with an adapter is that one.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbone.ast import AST
from .config import AdapterConfig, reduced_size


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, Convpass's activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Bottleneck(nn.Module):
    """Down-projection, GELU, up-projection.

    ``down`` keeps ``nn.Linear``'s default init and ``up`` starts at zero: the adapter
    outputs zeros at initialisation but ``up`` gets a gradient at the first step. (The
    reference zero-initialises both, which leaves every adapter gradient zero.)
    """

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class Convpass(nn.Module):
    """1x1 down, QuickGELU, 3-tap convolution over the token axis, QuickGELU, 1x1 up.

    The convolution runs over the whole token sequence as the reference does, so it mixes
    neighbouring tokens in sequence order: [CLS], distillation and prompt tokens with the
    first patches, and the last patch of one frequency row with the first of the next.
    Its output feeds ``up`` (the published code computed it, then discarded it).
    ``up`` is zero-initialised so the adapter starts as the identity of its placement.
    """

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.conv = nn.Conv1d(rank, rank, kernel_size=3, padding=1)
        self.act = QuickGELU()
        self.up = nn.Linear(rank, dim)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.down(x))  # (batch, tokens, rank)
        h = self.act(self.conv(h.transpose(1, 2)).transpose(1, 2))
        return self.up(h)


class Conformer(nn.Module):
    """The Conformer convolution module as an adapter (Gulati et al. 2020; the paper's code base).

    LayerNorm, pointwise conv to ``2 * rank`` channels, GLU, depthwise conv over the token
    axis (``kernel_size`` taps, "same" padding), BatchNorm, SiLU, pointwise conv back to
    ``dim``, dropout. The convolutions run on the LayerNorm's output (one published variant
    computes it and then convolves the raw input). ``pointwise2`` is zero-initialised so the
    adapter starts as the identity of its placement. The BatchNorm uses batch statistics
    while the model trains (``PETLModel.train`` switches injected modules only, the frozen
    backbone stays in eval mode) and its running statistics at inference; they are saved
    in adapter files with the trained tensors.
    """

    def __init__(self, dim: int, rank: int, kernel_size: int = 31, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pointwise1 = nn.Conv1d(dim, 2 * rank, kernel_size=1)
        self.glu = nn.GLU(dim=1)
        self.depthwise = nn.Conv1d(rank, rank, kernel_size, padding="same", groups=rank)
        self.batch_norm = nn.BatchNorm1d(rank)
        self.act = nn.SiLU()
        self.pointwise2 = nn.Conv1d(rank, dim, kernel_size=1)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.pointwise2.weight)
        nn.init.zeros_(self.pointwise2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).transpose(1, 2)  # (batch, dim, tokens)
        h = self.act(self.batch_norm(self.depthwise(self.glu(self.pointwise1(h)))))
        return self.dropout(self.pointwise2(h)).transpose(1, 2)


ADAPTER_MODULES = {"bottleneck": Bottleneck, "convpass": Convpass, "conformer": Conformer}


class SequentialAdapter(nn.Module):
    """A transform ``z -> A(z) [+ z]`` (an input or output transform of a sub-layer)."""

    def __init__(self, adapter: nn.Module, residual: bool) -> None:
        super().__init__()
        self.adapter = adapter
        self.residual = residual

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.adapter(z)
        return out + z if self.residual else out


class ParallelAdapter(nn.Module):
    """A branch ``(n, f(n)) -> A(z) [+ z]`` with ``z = n`` (before) or ``z = f(n)`` (after)."""

    def __init__(self, adapter: nn.Module, residual: bool, position: str) -> None:
        super().__init__()
        self.adapter = adapter
        self.residual = residual
        self.position = position

    def forward(self, normed: torch.Tensor, sublayer_out: torch.Tensor) -> torch.Tensor:
        z = normed if self.position == "before" else sublayer_out
        out = self.adapter(z)
        return out + z if self.residual else out

    def extra_repr(self) -> str:
        return f"position={self.position}, residual={self.residual}"


def inject_adapters(backbone: AST, config: AdapterConfig) -> list[nn.Module]:
    """Insert the adapters of ``config`` into every block; returns the new modules."""
    dim = backbone.config.hidden_size
    rank = reduced_size(dim, config.reduction_rate, "AdapterConfig")
    added: list[nn.Module] = []
    for block in backbone.blocks:
        for sublayer, insertion, position in config.placements():
            taps = getattr(block, sublayer)
            adapter = ADAPTER_MODULES[config.module](dim, rank, **config.module_options())
            residual = config.uses_residual(insertion)
            if insertion == "parallel":
                placed: nn.Module = ParallelAdapter(adapter, residual, position)
                taps.branches.append(placed)
            else:
                placed = SequentialAdapter(adapter, residual)
                (taps.input_transforms if position == "before" else taps.output_transforms).append(placed)
            added.append(placed)
    return added


def adapter_norms(backbone: AST, config: AdapterConfig) -> list[nn.Parameter]:
    """LayerNorm parameters ``config`` trains: the norm of each sub-layer holding an adapter."""
    if not config.train_norm:
        return []
    sublayers = dict.fromkeys(sublayer for sublayer, _, _ in config.placements())  # ordered set
    return [p for block in backbone.blocks for s in sublayers for p in block.sublayer_norm(s).parameters()]
