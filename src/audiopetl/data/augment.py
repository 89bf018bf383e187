"""SpecAugment for training batches: one frequency mask and one time mask per clip,
drawn afresh on every call, so it is never cached with the features."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SpecAugment(nn.Module):
    """Mask up to `freq_mask` mel bins and up to `time_mask` frames of each (B, T, F) clip.

    As in the reference implementation (torchaudio's masking on normalised features), masked
    values become `fill` = 0, the dataset mean after normalisation. Widths are drawn
    uniformly from [0, max], positions uniformly where the mask fits.
    """

    def __init__(self, freq_mask: int = 24, time_mask: int = 80, fill: float = 0.0):
        super().__init__()
        if freq_mask < 0 or time_mask < 0:
            raise ValueError(f"mask widths must be >= 0, got freq_mask={freq_mask}, time_mask={time_mask}")
        self.freq_mask = freq_mask
        self.time_mask = time_mask
        self.fill = fill

    def forward(self, features: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if features.ndim != 3:
            raise ValueError(f"expected (batch, frames, mel bins) features, got shape {tuple(features.shape)}")
        batch, frames, bins = features.shape
        time = _band(batch, frames, self.time_mask, generator).to(features.device)
        freq = _band(batch, bins, self.freq_mask, generator).to(features.device)
        masked = time[:, :, None] | freq[:, None, :]
        return features.masked_fill(masked, self.fill)


def _band(batch: int, size: int, max_width: int, generator: torch.Generator | None) -> Tensor:
    """(batch, size) boolean masks, each one band of width uniform in [0, min(max_width, size)]."""
    width = (torch.rand(batch, generator=generator) * (min(max_width, size) + 1)).long()
    start = (torch.rand(batch, generator=generator) * (size - width + 1)).long()
    position = torch.arange(size)
    return (position >= start[:, None]) & (position < (start + width)[:, None])
