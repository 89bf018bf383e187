"""Linear probing on cached embeddings: one frozen forward pass, then seconds of head training.

Linear probing trains the head and the final LayerNorm. The LayerNorm's affine part is
elementwise, so it commutes with token pooling:
``pool(gamma * z + beta) = gamma * pool(z) + beta`` with ``z`` the normalised tokens.
We therefore cache ``pool(z)`` once and train ``head(gamma * e + beta)`` on it, which is
exactly the plain loop's function without re-running the backbone every epoch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..backbone import AST
from .loop import autocast


@torch.no_grad()
def pooled_embeddings(backbone: AST, features: np.ndarray, pooling: str, settings) -> np.ndarray:
    """``pool(LayerNorm-without-affine(encode(x)))`` for every clip, as float32 (clips, hidden)."""
    backbone = backbone.to(settings.device).eval()
    norm = backbone.norm
    rows = []
    for start in tqdm(
        range(0, len(features), settings.batch_size), desc="embeddings", disable=not settings.progress, leave=False
    ):
        batch = torch.from_numpy(np.array(features[start : start + settings.batch_size]))  # copy: the cache is read-only
        batch = batch.to(settings.device)
        with autocast(settings):
            hidden = backbone.encode(batch).float()
        normalised = F.layer_norm(hidden, norm.normalized_shape, eps=norm.eps)
        rows.append(backbone.pool(normalised, batch, pooling).float().cpu())
    return torch.cat(rows).numpy()


class LinearProbeForward(nn.Module):
    """Cached embedding -> logits through the model's own final-norm affine and head."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        norm = self.model.backbone.norm
        return self.model.head(embedding * norm.weight + norm.bias)
