"""Two views of one tissue region at different pixel sizes, with the nuclei they share (MUSE's cross-scale pairs).

A view is a ``size`` x ``size`` crop read from a source at ``mpp`` um/px: its square in the source is
``size * mpp / source_mpp`` level-0 pixels wide, read from the coarsest level no coarser than ``mpp`` and
resampled (antialiased bicubic) onto exactly that square, so that a point at level-0 pixel-centre coordinate
``p`` is at ``(p + 0.5 - edge) * scale - 0.5`` in the view (``edge``: the square's left or top edge, ``scale``:
view pixels per level-0 pixel; denuc's pixel-centre convention, see denuc.nuclei). One view is at the working
pixel size, the other at a pixel size drawn log-uniformly in a range, centred within the middle half of the
first; each is then flipped, turned and recoloured on its own. A nucleus detected in the region and inside
both views is known in both: those are the pairs the nucleus-level loss compares.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from denuc.config import PretrainConfig
from denuc.io.slides import Slide
from denuc.train.augment import flip_rotate
from denuc.train.regions import OpenSources, Region
from denuc.train.stain import color_jitter


@dataclass
class View:
    """A crop (float32 RGB 0-255) and where it lies in its source: level-0 left/top edge and view pixels per
    level-0 pixel."""

    image: np.ndarray
    edge: np.ndarray  # (2,) level-0 edge coordinates (x, y) of the crop's left and top sides
    scale: float

    def points(self, xy: np.ndarray) -> np.ndarray:
        """Level-0 pixel-centre coordinates (n, 2) -> this view's."""
        return (xy + 0.5 - self.edge) * self.scale - 0.5


def read_view(slide: Slide, centre: np.ndarray, mpp: float, size: int) -> View:
    """The ``size``-pixel view at ``mpp`` um/px centred on ``centre`` (level-0 pixel-centre coordinates); what
    lies outside the source is white."""
    span = size * mpp / slide.mpp  # level-0 pixels
    edge = np.asarray(centre, dtype=np.float64) + 0.5 - span / 2
    level = slide.best_level(mpp)
    downsample = slide.level_downsamples[level]
    low, extent = edge / downsample, span / downsample  # in the level's pixels
    margin = math.ceil(2 * extent / size) + 1  # the bicubic filter's reach beyond the square
    x0, y0 = (math.floor(v) - margin for v in low)
    x1, y1 = (math.ceil(v + extent) + margin for v in low)
    window = Image.fromarray(slide.read_region(x0, y0, level, x1 - x0, y1 - y0))
    box = (low[0] - x0, low[1] - y0, low[0] - x0 + extent, low[1] - y0 + extent)
    image = window.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=None)
    return View(np.asarray(image, dtype=np.float32), edge, size / span)


@dataclass
class ViewPair:
    """Two augmented views (float32 RGB 0-255, ``size`` x ``size``) and the nuclei they share: row i of
    ``points_a`` and of ``points_b`` is the same nucleus, in each view's pixels, the region's nucleus
    ``shared[i]``."""

    image_a: np.ndarray
    image_b: np.ndarray
    points_a: np.ndarray
    points_b: np.ndarray
    shared: np.ndarray


def view_pair(slide: Slide, region: Region, nuclei: np.ndarray, cfg: PretrainConfig, rng: np.random.Generator,
              augment: bool = True) -> ViewPair:
    """Two views of ``region`` (at ``cfg.mpp`` and at a pixel size drawn in ``cfg.other_mpp``) with the shared
    nuclei among ``nuclei`` (level-0 coordinates; at most ``cfg.max_nuclei``, drawn at random). ``augment``
    False: no flips, turns nor colour changes (to check the geometry)."""
    low, high = cfg.other_mpp
    mpp_b = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    span_a = cfg.crop_size * cfg.mpp / slide.mpp
    span_b = cfg.crop_size * mpp_b / slide.mpp
    origin = np.array([region.x, region.y], dtype=np.float64)
    extent = np.array([region.width, region.height], dtype=np.float64)
    centre_a = _centre_within(origin, extent, span_a, rng.uniform(0, 1, 2))
    centre_b = centre_a + rng.uniform(-span_a / 4, span_a / 4, 2)
    # the second view stays in the region where it fits (nuclei are known there), else it is centred on it
    low_b = origin - 0.5 + span_b / 2
    high_b = origin + extent - 0.5 - span_b / 2
    centre_b = np.where(low_b <= high_b, np.clip(centre_b, low_b, high_b), origin + extent / 2 - 0.5)
    a = read_view(slide, centre_a, cfg.mpp, cfg.crop_size)
    b = read_view(slide, centre_b, mpp_b, cfg.crop_size)
    xy_a, xy_b = a.points(nuclei), b.points(nuclei)
    shared = np.flatnonzero(_inside(xy_a, cfg.crop_size) & _inside(xy_b, cfg.crop_size))
    if len(shared) > cfg.max_nuclei:
        shared = np.sort(rng.choice(shared, cfg.max_nuclei, replace=False))
    image_a, xy_a = a.image, xy_a[shared]
    image_b, xy_b = b.image, xy_b[shared]
    if augment:
        image_a, xy_a = _augment(image_a, xy_a, cfg, rng)
        image_b, xy_b = _augment(image_b, xy_b, cfg, rng)
    return ViewPair(np.ascontiguousarray(image_a), np.ascontiguousarray(image_b), xy_a.reshape(-1, 2),
                    xy_b.reshape(-1, 2), shared)


def _centre_within(origin: np.ndarray, extent: np.ndarray, span: float, u: np.ndarray) -> np.ndarray:
    """A centre (pixel-centre coordinates) at fraction ``u`` of the positions that keep a ``span`` square inside
    the region, per axis; the region's centre on an axis shorter than the square."""
    low = origin - 0.5 + span / 2
    room = extent - span
    return np.where(room >= 0, low + u * np.maximum(room, 0), origin + extent / 2 - 0.5)


def _inside(xy: np.ndarray, size: int) -> np.ndarray:
    return (xy >= -0.5).all(1) & (xy <= size - 0.5).all(1)


def _augment(image: np.ndarray, xy: np.ndarray, cfg: PretrainConfig, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    image, xy = flip_rotate(image, xy, rng)
    if cfg.color_jitter > 0 or cfg.stain_vector_jitter > 0:
        image = color_jitter(image, cfg.color_jitter, rng, cfg.stain_vector_jitter)
    return image, xy


class ViewPairBatches(IterableDataset):
    """One epoch's ``batches`` batches of view pairs for process ``rank``: batch b is drawn from its own
    generator, seeded by (seed, rank, epoch, b), so it is the same however many loader workers share the epoch
    (worker w makes batches w, w + workers, ...; the loader hands them out in order) and after a resume.

    A batch: images_a, images_b (B, 3, S, S) float32 0-255; points_a, points_b lists of (n_i, 2) float64.
    """

    def __init__(self, regions: list[Region], nuclei: list[np.ndarray], cfg: PretrainConfig, epoch: int,
                 batches: int, rank: int = 0) -> None:
        self.regions, self.nuclei, self.cfg = regions, nuclei, cfg
        self.epoch, self.batches, self.rank = epoch, batches, rank

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        first, step = (0, 1) if worker is None else (worker.id, worker.num_workers)
        sources = OpenSources()  # opened in the process that reads them
        for b in range(first, self.batches, step):
            rng = np.random.default_rng([self.cfg.seed, self.rank, self.epoch, b])
            pairs = []
            for i in rng.integers(0, len(self.regions), self.cfg.batch_size):
                region = self.regions[i]
                pairs.append(view_pair(sources.get(region), region, self.nuclei[i], self.cfg, rng))
            yield collate(pairs)


def collate(pairs: list[ViewPair]) -> dict:
    def images(arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    return {"images_a": images([p.image_a for p in pairs]), "images_b": images([p.image_b for p in pairs]),
            "points_a": [torch.from_numpy(p.points_a.astype(np.float64)) for p in pairs],
            "points_b": [torch.from_numpy(p.points_b.astype(np.float64)) for p in pairs]}
