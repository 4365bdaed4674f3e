"""Crowded nuclei: those with several other nuclei close around them (dense lymphocyte aggregates, say).

A detector can score well overall and still leave most nuclei of a dense cluster without a point; recall over the
crowded ground-truth nuclei alone shows it (``denuc.metrics.evaluate`` reports it beside the overall recall).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

CROWDED_RADIUS_UM = 8.0
"""Centre-to-centre distance within which other nuclei count as neighbours: about one nucleus diameter (a
lymphocyte's is about 7 um), so neighbours this close touch or nearly touch."""
CROWDED_MIN_NEIGHBOURS = 3
"""A nucleus is crowded when at least this many other nuclei lie within CROWDED_RADIUS_UM of it."""


def crowded_nuclei(xy: np.ndarray, radius_px: float, min_neighbours: int = CROWDED_MIN_NEIGHBOURS) -> np.ndarray:
    """Boolean mask of the points of ``xy`` (n, 2) with at least ``min_neighbours`` other points at a distance
    ``<= radius_px``."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if len(xy) == 0:
        return np.zeros(0, dtype=bool)
    within = cKDTree(xy).query_ball_point(xy, r=radius_px, return_length=True)
    return within - 1 >= min_neighbours  # each point finds itself
