"""Classification heads: a feature vector sampled at a nucleus point in, one logit per class out.

The last output of every head is "not a nucleus" (see ``denuc.nuclei.NOT_A_NUCLEUS``); the others follow the
taxonomy's order. A linear head is the paper's default ("Linear" probe); the MLP adds one hidden layer.
"""

from __future__ import annotations

from torch import nn

from denuc.config import HEADS


def create_head(kind: str, in_features: int, num_outputs: int, hidden: int = 256) -> nn.Module:
    """A head mapping (n, ``in_features``) to (n, ``num_outputs``) logits.

    The input is layer-normalised first (no affine part): the concatenated levels of an encoder have very
    different scales, and a frozen encoder's features are otherwise left as they are.
    """
    if kind == "linear":
        return nn.Sequential(nn.LayerNorm(in_features, elementwise_affine=False), nn.Linear(in_features, num_outputs))
    if kind == "mlp":
        return nn.Sequential(nn.LayerNorm(in_features, elementwise_affine=False), nn.Linear(in_features, hidden),
                             nn.GELU(), nn.Linear(hidden, num_outputs))
    raise ValueError(f"unknown head {kind!r}; choose from {list(HEADS)}")

