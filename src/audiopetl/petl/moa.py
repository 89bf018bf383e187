"""Mixtures of adapters (Cappellazzo, Falavigna, Brutti, Interspeech 2024): Dense-MoA and Soft-MoA.

A mixture replaces the single adapter of a placement by ``N`` experts (Bottleneck or
Convpass modules). It sits in parallel to a sub-layer and reads the sub-layer's normalised
input ``n``, without residual: the sub-layer computes ``y = f(n) + M(n)`` (through the
``branches`` of :class:`~audiopetl.backbone.ast.SublayerTaps`, so it runs unchanged on
every backbone offering those taps).

* Dense-MoA: ``M(n) = sum_i softmax(W n + b)_i A_i(n)``, a router over the experts per token;
  every expert processes every token.
* Soft-MoA (after Soft MoE): slot parameters ``Phi`` (hidden x N x p); ``logits = n Phi``,
  per (token, expert, slot). Dispatch weights are the softmax of the logits over the tokens,
  combine weights their softmax over all ``N * p`` slots. Slot ``(i, j)`` is the
  dispatch-weighted average of the tokens; expert ``i`` processes its ``p`` slots as a
  sequence; each token's output is the combine-weighted sum of all slot outputs. Experts
  see ``N * p`` slots instead of every token.

On padded batches (the speech encoders that mask padding) a mixture gets its block's mask of
real tokens (:class:`~audiopetl.backbone.ast.FrameMask`): Soft-MoA's slots average real tokens
only, and Dense-MoA hands the mask to its experts (Convpass convolves over time), so a clip's
output does not depend on the padding of its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone.ast import AST, FrameMask
from .adapters import ADAPTER_MODULES
from .config import DenseMoAConfig, MixtureConfig, SoftMoAConfig, reduced_size


def _experts(config: MixtureConfig, dim: int, rank: int) -> nn.ModuleList:
    return nn.ModuleList(ADAPTER_MODULES[config.module](dim, rank) for _ in range(config.num_adapters))


class DenseMixture(nn.Module):
    """Router-weighted sum of all experts' outputs: (batch, tokens, hidden) -> same shape."""

    def __init__(self, dim: int, rank: int, config: DenseMoAConfig) -> None:
        super().__init__()
        self.router = nn.Linear(dim, config.num_adapters)
        self.experts = _experts(config, dim, rank)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        weights = torch.softmax(self.router(x), dim=-1)  # (batch, tokens, experts)
        # (batch, tokens, hidden, experts); each expert gets the mask: Convpass convolves over time
        outputs = torch.stack([expert(x, valid) for expert in self.experts], dim=-1)
        return torch.einsum("bldn,bln->bld", outputs, weights)


class SoftMixture(nn.Module):
    """Soft-MoA: experts process dispatch-weighted slots; tokens combine the slot outputs.

    ``slots`` is Phi, (hidden, experts, slots per expert), Glorot-normal as
    ``nn.init.xavier_normal_`` computes it for that shape (as the reference code).
    With ``normalize`` the logits are ``scale * <n / |n|, Phi / |Phi|>`` (norms over the
    hidden axis, ``scale`` learned, starting at 1); the slots still average the
    un-normalised tokens, as in Soft MoE. (The reference code normalises Phi over the
    expert axis and builds the slots from normalised tokens; its authors did not use it.)
    """

    def __init__(self, dim: int, rank: int, config: SoftMoAConfig) -> None:
        super().__init__()
        self.experts = _experts(config, dim, rank)
        self.slots = nn.Parameter(torch.empty(dim, config.num_adapters, config.num_slots))
        nn.init.xavier_normal_(self.slots)
        self.scale = nn.Parameter(torch.ones(())) if config.normalize else None

    def weights(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dispatch and combine weights, each (batch, tokens, experts, slots).

        ``valid`` (batch, tokens): real tokens; padded ones get no dispatch weight. Their
        combine weights (their own outputs, which nothing reads) are left as they are.
        """
        phi = self.slots.to(x.dtype)
        if self.scale is not None:
            x = F.normalize(x, dim=-1, eps=1e-6)
            phi = F.normalize(phi, dim=0, eps=1e-6) * self.scale
        logits = torch.einsum("bmd,dnp->bmnp", x, phi)
        masked = logits if valid is None else logits.masked_fill(~valid[:, :, None, None], float("-inf"))
        dispatch = torch.softmax(masked, dim=1)
        combine = torch.softmax(logits.flatten(2), dim=-1).view_as(logits)
        return dispatch, combine

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        dispatch, combine = self.weights(x, valid)
        slots = torch.einsum("bmd,bmnp->bnpd", x, dispatch)  # the experts see slots: no padding
        outputs = torch.stack([expert(slots[:, i]) for i, expert in enumerate(self.experts)], dim=1)
        return torch.einsum("bnpd,bmnp->bmd", outputs, combine)


class _Carry:
    """The last output of a mixture, handed to :class:`RepeatedMixture` (not a module: no state)."""

    value: torch.Tensor | None = None


class MixtureBranch(nn.Module):
    """A parallel branch ``(n, f(n)) -> M(n)``; optionally keeps ``M(n)`` for a repeat.

    ``frame_mask``: the block's, whose value the mixture gets as ``valid``; None: no padding.
    """

    def __init__(self, mixture: nn.Module, carry: _Carry | None = None, frame_mask: FrameMask | None = None) -> None:
        super().__init__()
        self.mixture = mixture
        self.carry = carry
        self.frame_mask = frame_mask

    def forward(self, normed: torch.Tensor, sublayer_out: torch.Tensor) -> torch.Tensor:
        out = self.mixture(normed, None if self.frame_mask is None else self.frame_mask.value)
        if self.carry is not None:
            self.carry.value = out
        return out


class RepeatedMixture(nn.Module):
    """The published code's second addition: the MHSA mixture's output, added to the FFN output.

    Holds no parameters; the block runs its MHSA sub-layer (which sets the carried value)
    before its FFN sub-layer, also when gradient checkpointing recomputes the block.
    """

    def __init__(self, carry: _Carry) -> None:
        super().__init__()
        self.carry = carry

    def forward(self, normed: torch.Tensor, sublayer_out: torch.Tensor) -> torch.Tensor:
        if self.carry.value is None:
            raise RuntimeError("published_double_add: the FFN sub-layer ran before its block's MHSA mixture")
        return self.carry.value


MIXTURES = {DenseMoAConfig: DenseMixture, SoftMoAConfig: SoftMixture}


def inject_mixtures(backbone: AST, config: DenseMoAConfig | SoftMoAConfig) -> list[nn.Module]:
    """Add a mixture branch to every block's sub-layer(s) in ``config``; returns the new modules."""
    dim = backbone.config.hidden_size
    rank = reduced_size(dim, config.reduction_rate, type(config).__name__)
    added: list[nn.Module] = []
    for block in backbone.blocks:
        for sublayer in config.sublayers():
            carry = _Carry() if config.published_double_add else None
            branch = MixtureBranch(MIXTURES[type(config)](dim, rank, config), carry, block.frame_mask)
            getattr(block, sublayer).branches.append(branch)
            added.append(branch)
            if carry is not None:
                repeat = RepeatedMixture(carry)
                block.ffn.branches.append(repeat)
                added.append(repeat)
    return added


def mixture_norms(backbone: AST, config: DenseMoAConfig | SoftMoAConfig) -> list[nn.Parameter]:
    """LayerNorm parameters ``config`` trains: the norm of each sub-layer holding a mixture."""
    if not config.train_norm:
        return []
    return [p for block in backbone.blocks for s in config.sublayers() for p in block.sublayer_norm(s).parameters()]
