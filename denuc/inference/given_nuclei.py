"""The classifier of a model at nuclei another tool found: the decoupled design, with their points for the
detector's.

The slide is cut as ``denuc predict`` cuts it (``slide_grid.Grid``: the model's working resolution, the detector's
overlapping tiles); each nucleus is classified in the one tile that owns it, so it sees at least half the tile
overlap of context on every side, as the model's own detections do. Only the tiles that own a nucleus are read.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from denuc.inference.pipeline import Pipeline
from denuc.inference.slide_grid import Grid, Tile
from denuc.io.slides import Slide
from denuc.nuclei import Nuclei


def classify_given_nuclei(slide: Slide, model: Pipeline, nuclei: Nuclei, *, batch_size: int = 8, workers: int = 2,
                          progress: bool = False) -> tuple[Nuclei, np.ndarray]:
    """Classify ``nuclei`` (level-0 pixels of ``slide``, inside it) with ``model``'s classifier.

    Returns the nuclei, in their order, with the most probable class as label, ``probs`` (the class probabilities
    given that the point is a nucleus), the taxonomy, and as ``scores`` the classifier's probability that the
    point is a nucleus at all (1 - P("not a nucleus")); and the mask of those it calls "not a nucleus" (see
    ``Pipeline.name_classes``). Outlines and the rest are kept.
    """
    from tqdm.auto import tqdm

    if model.classifier is None:
        raise ValueError("a detector-only model has no classifier")
    grid = Grid.for_slide(slide, model)
    working = (nuclei.xy + 0.5) * grid.scale - 0.5
    # each tile owns [low, high) of its row and column; the bounds are contiguous, the outer ones infinite
    col = np.searchsorted([high for _, high in grid.xbounds[:-1]], working[:, 0], side="right")
    row = np.searchsorted([high for _, high in grid.ybounds[:-1]], working[:, 1], side="right")
    tile_of = row * len(grid.xs) + col
    order = np.argsort(tile_of, kind="stable")
    tiles, starts = np.unique(tile_of[order], return_index=True)
    members = np.split(order, starts[1:])  # the nuclei of each tile, in tile order

    probs = np.zeros((len(nuclei), len(model.classes) + 1))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="denuc-read") if workers > 0 else None

    def read(tile: Tile) -> np.ndarray:
        return grid.read(slide, tile)

    bar = tqdm(total=len(tiles), unit="tile", desc=slide.path.stem, disable=not progress, dynamic_ncols=True)
    try:
        for first in range(0, len(tiles), batch_size):
            batch = [(int(t) // len(grid.xs), int(t) % len(grid.xs)) for t in tiles[first:first + batch_size]]
            pixels = np.stack(list(pool.map(read, batch) if pool else map(read, batch)))
            points = [working[index] - (grid.xs[c], grid.ys[r])
                      for (r, c), index in zip(batch, members[first:first + batch_size])]
            for index, (tile_probs, _) in zip(members[first:first + batch_size],
                                              model.classify_tiles(pixels, points)):
                probs[index] = tile_probs
            bar.update(len(batch))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    labels, class_probs, rejected = model.name_classes(probs)
    named = Nuclei(xy=nuclei.xy, labels=labels, scores=1.0 - probs[:, -1], probs=class_probs, classes=model.classes,
                   mpp=slide.mpp, image_size=slide.dimensions, outlines=nuclei.outlines)
    return named, rejected
