"""Greedy point non-maximum suppression: one point per nucleus."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def point_nms(xy: np.ndarray, scores: np.ndarray, radius: float) -> np.ndarray:
    """Indices of points kept by greedy point NMS: in descending score, drop points within ``radius``
    (<=) of an already kept point. Ties in score keep the earlier point."""
    if len(xy) == 0 or radius <= 0:
        return np.arange(len(xy))
    order = np.argsort(-scores, kind="stable")
    pairs = cKDTree(xy).query_pairs(radius, output_type="ndarray")
    if len(pairs) == 0:
        return order
    rank = np.empty(len(xy), dtype=np.int64)
    rank[order] = np.arange(len(xy))
    # orient each pair (stronger, weaker); only a kept stronger point suppresses
    stronger = np.where(rank[pairs[:, 0]] < rank[pairs[:, 1]], pairs[:, 0], pairs[:, 1])
    weaker = pairs[:, 0] + pairs[:, 1] - stronger
    by_stronger = np.argsort(stronger, kind="stable")
    stronger, weaker = stronger[by_stronger], weaker[by_stronger]
    heads, starts = np.unique(stronger, return_index=True)
    ends = np.append(starts[1:], len(stronger))
    # walk the points that have weaker neighbours, strongest first; a suppressed point suppresses nothing
    suppressed = np.zeros(len(xy), dtype=bool)
    for k in np.argsort(rank[heads], kind="stable"):
        if not suppressed[heads[k]]:
            suppressed[weaker[starts[k]:ends[k]]] = True
    return order[~suppressed[order]]
