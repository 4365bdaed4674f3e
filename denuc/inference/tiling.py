"""Cutting an image into overlapping tiles at the model's working resolution, and who owns each point.

One ownership rule serves whole images (``iter_tiles``, ``predict_image``) and slides (``denuc.inference.slide``):
overlaps are split at their midpoint (``ownership_bounds``), so each point is kept by exactly one tile.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

from denuc.config import DetectorConfig
from denuc.errors import InputError
from denuc.inference.nms import point_nms
from denuc.io.images import read_image, resample, scale_to, to_rgb_uint8
from denuc.nuclei import Nuclei, concat

ALIGN = 32  # the backbone's total stride: tile origins and sizes are multiples of it so grids line up


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Tile start positions covering [0, length) with at least ``overlap`` pixels of overlap.

    ``length`` and ``tile`` are multiples of ALIGN (images are padded to one), so every start is too.
    """
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, tile - overlap))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def ownership_bounds(starts: list[int], tile: int, length: int) -> list[tuple[float, float]]:
    """For each tile, the interval of coordinates it owns: split overlaps at their midpoint."""
    bounds = []
    for k, start in enumerate(starts):
        low = -np.inf if k == 0 else (start + starts[k - 1] + tile) / 2 - 0.5
        high = np.inf if k == len(starts) - 1 else (starts[k + 1] + start + tile) / 2 - 0.5
        bounds.append((low, high))
    return bounds


def iter_tiles(image: np.ndarray, config: DetectorConfig,
               predict: Callable[[np.ndarray], list[Nuclei]], batch_size: int = 8) -> Iterator[Nuclei]:
    """Run ``predict`` (a (B, H, W, 3) batch of tiles -> Nuclei per tile, in tile pixels) over an image in
    overlapping tiles of ``config.tile_size``; yield per tile the nuclei it owns, in image pixels.

    Overlaps are split at their midpoint, so each point is kept by exactly one tile. The image is padded with
    white (like glass: no tissue) to a multiple of ALIGN; points in the padding are dropped.
    """
    h, w = image.shape[:2]
    padded_h, padded_w = -(-h // ALIGN) * ALIGN, -(-w // ALIGN) * ALIGN
    tile_h, tile_w = min(config.tile_size, padded_h), min(config.tile_size, padded_w)
    if (padded_h, padded_w) != (h, w):
        image = np.pad(image, ((0, padded_h - h), (0, padded_w - w), (0, 0)), constant_values=255)
    ys = tile_origins(padded_h, tile_h, config.tile_overlap)
    xs = tile_origins(padded_w, tile_w, config.tile_overlap)
    ybounds, xbounds = ownership_bounds(ys, tile_h, h), ownership_bounds(xs, tile_w, w)
    jobs = [(y, x, yb, xb) for y, yb in zip(ys, ybounds) for x, xb in zip(xs, xbounds)]
    for first in range(0, len(jobs), batch_size):
        batch = jobs[first:first + batch_size]
        tiles = np.stack([image[y:y + tile_h, x:x + tile_w] for y, x, _, _ in batch])
        for (y, x, (ylo, yhi), (xlo, xhi)), nuclei in zip(batch, predict(tiles)):
            gx, gy = nuclei.xy[:, 0] + x, nuclei.xy[:, 1] + y
            owned = ((gx >= xlo) & (gx < xhi) & (gy >= ylo) & (gy < yhi)
                     & (gx >= -0.5) & (gx <= w - 0.5) & (gy >= -0.5) & (gy <= h - 0.5))
            kept = nuclei.subset(owned)
            kept.xy = kept.xy + (x, y)
            yield kept


def predict_image(image: np.ndarray | str | os.PathLike, mpp: float | None, config: DetectorConfig,
                  predict: Callable[[np.ndarray], list[Nuclei]], batch_size: int = 8) -> Nuclei:
    """Run a tile predictor (see ``iter_tiles``) over a whole image of pixel size ``mpp``: resample to
    ``config.mpp``, tile, keep owned points, point NMS across tiles, and map back to the image's pixels."""
    source = str(image) if not isinstance(image, np.ndarray) else "<array>"
    if mpp is None:
        raise InputError(source, "pixel size unknown: pass mpp (um/px), e.g. 0.5 for 20x or 0.25 for 40x scans")
    if not (np.isfinite(mpp) and mpp > 0):
        raise InputError(source, f"pixel size must be a positive number of um/px, got {mpp}")
    rgb = read_image(image) if source != "<array>" else to_rgb_uint8(image, source)
    h, w = rgb.shape[:2]
    work = resample(rgb, scale_to(mpp, config.mpp))
    fy, fx = work.shape[0] / h, work.shape[1] / w
    found = concat(list(iter_tiles(work, config, predict, batch_size)))
    found = found.subset(point_nms(found.xy, found.scores, config.nms_radius_um / config.mpp))
    xy = np.stack([(found.xy[:, 0] + 0.5) / fx - 0.5, (found.xy[:, 1] + 0.5) / fy - 0.5], axis=1).reshape(-1, 2)
    xy[:, 0] = np.clip(xy[:, 0], -0.5, w - 0.5)
    xy[:, 1] = np.clip(xy[:, 1], -0.5, h - 0.5)
    return replace(found, xy=xy, mpp=mpp, image_size=(w, h))
