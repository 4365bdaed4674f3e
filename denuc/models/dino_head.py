"""DINO's projection head (Caron et al., ICCV 2021): features -> scores against learnt prototypes.

An MLP maps a feature vector to a bottleneck, which is L2-normalised and compared (cosine) with ``prototypes``
unit vectors; the scores, divided by a temperature, are the logits of a softmax over the prototypes. DINO's
weight-normalised last layer with its norm fixed to 1 is the same cosine, written here without a
parametrisation so that a teacher's moving average of the student is a plain average of tensors.

Unlike DINO's ViT heads, the input first goes through a batch norm without affine parameters: a CNN's pooled or
sampled ReLU features share a large mean, so at initialisation every input embeds alike (cosine about 0.9 between
regions, measured on the shipped compact encoder), the teacher's centring then leaves uniform targets, and the
student learns to be uniform too (what our first CPU runs showed: loss = ln(prototypes) throughout).
Normalising each channel over the batch removes the shared part (cosine about 0 at initialisation). On its own
it did not get a short CPU run out of the uniform state (660 steps of 16 pairs; docs/pretraining.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """(N, in_dim) features -> (N, prototypes) cosine scores in [-1, 1]."""

    def __init__(self, in_dim: int, prototypes: int, hidden: int = 2048, bottleneck: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.BatchNorm1d(in_dim, affine=False), nn.Linear(in_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        embedded = F.normalize(self.mlp(features), dim=-1)
        return embedded @ F.normalize(self.prototypes, dim=-1).T
