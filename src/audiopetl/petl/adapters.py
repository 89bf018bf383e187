"""Adapters: the Bottleneck, Convpass and Conformer modules, and where they sit in a layer.

Placement uses the sub-layer taps of :class:`~audiopetl.backbone.ast.SublayerTaps`. With
``n = LN(x)`` the sub-layer's normalised input, ``f`` the sub-layer, ``A`` the adapter and
``[+ z]`` the residual (``AdapterConfig.residual``), the sub-layer output ``y`` is:

* sequential-after  (Eq. 6):  ``y = A(f(n)) [+ f(n)]``          -> an output transform;
* sequential-before:          ``y = f(A(n)) [+ A(n)]``          -> an input transform, plus
  a branch adding the transformed input (the published code's wiring, Table III);
* parallel-before   (Eq. 7):  ``y = f(n) + A(n) [+ n]``         -> a branch reading ``n``;
* parallel-after:             ``y = f(n) + A(f(n)) [+ f(n)]``   -> a branch reading ``f(n)``;
and the block adds ``x + y``. Eq. 7 writes the parallel adapter's input as the
un-normalised X^; like the published code we feed it LN(X^), the sub-layer's own input.
Sequential-after with residual equals parallel-after without, hence Table III's
"Seq/Par-After" rows. Sequential-before's residual skips the sub-layer, not the adapter,
so it is not the identity at initialisation: ``f(0) + 0`` where the adapter outputs zeros.

Post-LN blocks (the base wav2vec 2.0 / HuBERT / WavLM models, whose sub-layers compute
``LN(x + f(x))``; :class:`~audiopetl.backbone.wav2vec2.PostNormTaps`) use the same taps with
``n = x``, the sub-layer input (the previous LayerNorm's output), and return ``LN(x + y)``:
every placement's ``y`` above joins the residual sum before the sub-layer's LayerNorm, and
the LayerNorm trained with an adapter is that one.

Initialisation (``AdapterConfig.init``): ``default`` starts every adapter at zero output
with a gradient on ``up`` (see each module); ``paper`` is what the published runs had:
transformers' ``from_pretrained`` re-initialised every module missing from the checkpoint,
so each new ``nn.Linear`` (down and up) ran with trunc-normal(std 0.02) weights and zero
biases, whatever the published source sets; Convpass's ``nn.Conv1d`` kept its own xavier init.

Padding: every adapter module takes ``valid``, the (batch, tokens) mask of real tokens or
None (see :class:`~audiopetl.backbone.ast.FrameMask`; the placements pass their block's).
Convpass and Conformer zero the padded frames before convolving over time, and the
Conformer's BatchNorm leaves them out of its statistics, so a clip's output is the same
however much padding its batch adds; the Bottleneck works per token.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbone.ast import AST, FrameMask
from .config import AdapterConfig, reduced_size


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, Convpass's activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def paper_init_(module: nn.Module) -> None:
    """transformers' init of every new ``nn.Linear`` in ``module``: weight trunc-normal(std 0.02), bias zero."""
    for linear in module.modules():
        if isinstance(linear, nn.Linear):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)


class Bottleneck(nn.Module):
    """Down-projection, GELU, up-projection.

    Default init: ``down`` keeps ``nn.Linear``'s default and ``up`` starts at zero, so the
    adapter outputs zeros at initialisation yet ``up`` gets a gradient at the first step.
    (Zeroing both, as the published source writes, would leave every gradient zero; its
    runs never had that init, see the module docstring.)
    """

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.up(self.act(self.down(x)))  # per token: padding cannot reach a real token


def _zero_padding(h: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(batch, channels, tokens) with padded tokens zeroed: a convolution over time then reads
    zeros past a clip's last frame, as past the sequence's end, however long the batch pads."""
    return h if valid is None else h.masked_fill(~valid[:, None], 0.0)


class Convpass(nn.Module):
    """1x1 down, QuickGELU, 3-tap convolution over the token axis, QuickGELU, 1x1 up.

    The convolution runs over the whole token sequence as the published code does, so it
    mixes neighbouring tokens in sequence order: [CLS], distillation and prompt tokens with
    the first patches, and the last patch of one frequency row with the first of the next.
    By default its output feeds ``up``. ``conv=False`` is the published function: that code
    computed the convolution, discarded it and returned ``up(QuickGELU(QuickGELU(down(x))))``;
    the convolution's weights are kept (and counted, as the paper counts them) but unused.
    Default init: ``up`` is zero so the adapter starts as the identity of its placement.
    """

    def __init__(self, dim: int, rank: int, conv: bool = True) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.conv = nn.Conv1d(rank, rank, kernel_size=3, padding=1)
        self.act = QuickGELU()
        self.up = nn.Linear(rank, dim)
        self.use_conv = conv
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        h = self.act(self.down(x))  # (batch, tokens, rank)
        if self.use_conv:
            h = self.conv(_zero_padding(h.transpose(1, 2), valid)).transpose(1, 2)
        return self.up(self.act(h))

    def extra_repr(self) -> str:
        return f"use_conv={self.use_conv}"


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

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        h = self.glu(self.pointwise1(self.norm(x).transpose(1, 2)))  # (batch, rank, tokens)
        h = self.act(self._batch_norm(self.depthwise(_zero_padding(h, valid)), valid))
        return self.dropout(self.pointwise2(h)).transpose(1, 2)

    def _batch_norm(self, h: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """BatchNorm over real frames only: in training, padding stays out of the batch statistics
        (and so of the running ones); padded frames pass through unnormalised, unused."""
        if valid is None:
            return self.batch_norm(h)
        frames = h.transpose(1, 2)  # (batch, tokens, rank)
        return frames.masked_scatter(valid[..., None], self.batch_norm(frames[valid])).transpose(1, 2)


ADAPTER_MODULES = {"bottleneck": Bottleneck, "convpass": Convpass, "conformer": Conformer}


def _valid(frame_mask: FrameMask | None) -> torch.Tensor | None:
    return None if frame_mask is None else frame_mask.value


class SequentialAdapter(nn.Module):
    """A transform ``z -> A(z) [+ z]`` (an input or output transform of a sub-layer).

    ``frame_mask``: the block's (:class:`~audiopetl.backbone.ast.FrameMask`), whose value
    the adapter gets as ``valid``; None: every token is real.
    """

    def __init__(self, adapter: nn.Module, residual: bool, frame_mask: FrameMask | None = None) -> None:
        super().__init__()
        self.adapter = adapter
        self.residual = residual
        self.frame_mask = frame_mask

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.adapter(z, _valid(self.frame_mask))
        return out + z if self.residual else out


class SublayerInput(nn.Module):
    """A branch returning the sub-layer's (transformed) input: sequential-before's ``+ A(n)``."""

    def forward(self, normed: torch.Tensor, sublayer_out: torch.Tensor) -> torch.Tensor:
        return normed


class ParallelAdapter(nn.Module):
    """A branch ``(n, f(n)) -> A(z) [+ z]`` with ``z = n`` (before) or ``z = f(n)`` (after);
    ``frame_mask`` as :class:`SequentialAdapter`'s."""

    def __init__(self, adapter: nn.Module, residual: bool, position: str, frame_mask: FrameMask | None = None) -> None:
        super().__init__()
        self.adapter = adapter
        self.residual = residual
        self.position = position
        self.frame_mask = frame_mask

    def forward(self, normed: torch.Tensor, sublayer_out: torch.Tensor) -> torch.Tensor:
        z = normed if self.position == "before" else sublayer_out
        out = self.adapter(z, _valid(self.frame_mask))
        return out + z if self.residual else out

    def extra_repr(self) -> str:
        return f"position={self.position}, residual={self.residual}"


def make_adapter(config: AdapterConfig, dim: int, rank: int) -> nn.Module:
    """One adapter module of ``config``, initialised as ``config.init`` says."""
    adapter = ADAPTER_MODULES[config.module](dim, rank, **config.module_options())
    if config.init == "paper":
        paper_init_(adapter)
    return adapter


def inject_adapters(backbone: AST, config: AdapterConfig) -> list[nn.Module]:
    """Insert the adapters of ``config`` into every block; returns the new modules."""
    dim = backbone.config.hidden_size
    rank = reduced_size(dim, config.reduction_rate, "AdapterConfig")
    added: list[nn.Module] = []
    for block in backbone.blocks:
        for sublayer, insertion, position in config.placements():
            taps = getattr(block, sublayer)
            adapter = make_adapter(config, dim, rank)
            residual = config.uses_residual(insertion)
            if insertion == "parallel":
                placed: nn.Module = ParallelAdapter(adapter, residual, position, block.frame_mask)
                taps.branches.append(placed)
            elif position == "after":
                placed = SequentialAdapter(adapter, residual, block.frame_mask)
                taps.output_transforms.append(placed)
            else:  # before: n -> A(n) feeds f; the residual adds A(n) to f's output
                placed = SequentialAdapter(adapter, residual=False, frame_mask=block.frame_mask)
                taps.input_transforms.append(placed)
                if residual:
                    taps.branches.append(SublayerInput())
            added.append(placed)
    return added


def adapter_norms(backbone: AST, config: AdapterConfig) -> list[nn.Parameter]:
    """LayerNorm parameters ``config`` trains: the norm of each sub-layer holding an adapter."""
    if not config.train_norm:
        return []
    sublayers = dict.fromkeys(sublayer for sublayer, _, _ in config.placements())  # ordered set
    return [p for block in backbone.blocks for s in sublayers for p in block.sublayer_norm(s).parameters()]
