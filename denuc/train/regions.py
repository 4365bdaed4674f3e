"""Unlabelled tissue to pretrain on: regions of slides and images, and the nuclei the detector finds in each.

A source (a slide, an image, or an image of a dataset's train split) is cut into square regions of
``region_um`` micrometres, overlapping a little so that they cover it whole; a region is kept when the tissue
mask of the source's thumbnail (``denuc.inference.tissue``) covers at least ``min_tissue`` of it. A source no
larger than one region is one region, taken whole: an image is a field somebody chose. At most
``regions_per_source`` regions of a source are kept, drawn at random.

Each region's nuclei are found once, by the detector, at its working resolution, and kept in the run folder
(``nuclei_<detector sha256>.npz``, level-0 pixel coordinates of the source), so that a resumed or restarted run
and every process of a distributed one share them; the processes each detect their share of the regions and
the main process writes the file.
"""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

import denuc.datasets as datasets
from denuc.config import PretrainConfig
from denuc.errors import InputError
from denuc.inference.detect import Detector
from denuc.inference.tissue import detect_tissue
from denuc.io.atomic import atomic_path
from denuc.io.slides import Slide, open_slide

THUMBNAIL_SIZE = 2048  # longest side of the thumbnail the tissue is found on
DETECTION_CHUNK = 32  # regions each process detects between two writes of the cache


@dataclass(frozen=True)
class Region:
    """A square (or, at a source's edge, the source's whole side) of a source, in its level-0 pixels."""

    source: str
    mpp: float  # the source's level-0 pixel size, um/px
    x: int
    y: int
    width: int
    height: int

    @property
    def key(self) -> str:
        return f"{self.source}#{self.x},{self.y},{self.width},{self.height}"


class OpenSources:
    """Open slides by path, at most ``limit`` at once (the least recently used is closed): an image is held in
    memory while it is open."""

    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self._open: OrderedDict[str, Slide] = OrderedDict()

    def get(self, region: Region) -> Slide:
        slide = self._open.pop(region.source, None)
        if slide is None:
            slide = open_slide(region.source, mpp_required=False)
            slide.mpp = region.mpp
        self._open[region.source] = slide
        while len(self._open) > self.limit:
            self._open.popitem(last=False)[1].close()
        return slide


def pretraining_regions(cfg: PretrainConfig) -> list[Region]:
    """Every region of ``cfg``'s images and of its datasets' train splits (never validation or test images)."""
    sources = [(path, None) for path in cfg.images]
    for spec in cfg.datasets:
        for sample in datasets.get_dataset(spec.name, spec.root).samples("train"):
            if sample.image_index is not None:
                raise InputError(spec.root, f"{spec.name} keeps its images in an array file; pretraining reads "
                                            "image files (export them, or pass the folder with --images)")
            sources.append((str(sample.image_path), sample.nuclei.mpp))
    regions = [r for path, mpp in sources for r in source_regions(path, mpp, cfg)]
    if not regions:
        raise InputError(", ".join(cfg.images + [d.root for d in cfg.datasets]) or "--images",
                         f"no region with at least {cfg.min_tissue:.0%} tissue")
    return regions


def source_regions(path: str, mpp: float | None, cfg: PretrainConfig) -> list[Region]:
    """The regions of one source; ``mpp`` overrides its metadata (a dataset's pixel size), else the metadata's,
    else ``cfg.images_mpp``."""
    with open_slide(path, mpp_required=False) as slide:
        if mpp is None and math.isnan(slide.mpp):
            if cfg.images_mpp is None:
                raise InputError(path, "states no pixel size: pass --mpp with the um/px of such images")
            mpp = cfg.images_mpp
        mpp = slide.mpp if mpp is None else mpp
        width, height = slide.dimensions
        side = max(1, round(cfg.region_um / mpp))
        if width <= side and height <= side:
            return [Region(path, mpp, 0, 0, width, height)]
        thumbnail = slide.thumbnail(THUMBNAIL_SIZE)
    scale = thumbnail.shape[1] / width  # thumbnail pixels per level-0 pixel
    tissue = detect_tissue(thumbnail, mpp / scale).mask
    regions = []
    for y in _starts(height, side):
        for x in _starts(width, side):
            w, h = min(side, width), min(side, height)
            window = tissue[int(y * scale):max(int(y * scale) + 1, int((y + h) * scale)),
                            int(x * scale):max(int(x * scale) + 1, int((x + w) * scale))]
            if window.mean() >= cfg.min_tissue:
                regions.append(Region(path, mpp, x, y, w, h))
    if len(regions) > cfg.regions_per_source:
        rng = np.random.default_rng([cfg.seed, zlib.crc32(path.encode())])  # the same draw in every process
        regions = [regions[i] for i in sorted(rng.choice(len(regions), cfg.regions_per_source, replace=False))]
    return regions


def _starts(length: int, side: int) -> list[int]:
    """Starts of the fewest windows of ``side`` that cover ``length``, evenly spread (overlapping a little)."""
    count = max(1, math.ceil(length / side))
    return sorted({int(round(v)) for v in np.linspace(0, max(length - side, 0), count)})


def detect_region(slide: Slide, region: Region, detector: Detector) -> np.ndarray:
    """(n, 2) float32 nucleus centres of ``region`` in the source's level-0 pixels, found at the detector's
    working resolution (read from the coarsest level no coarser than it)."""
    level = slide.best_level(detector.config.mpp)
    downsample = slide.level_downsamples[level]
    x0, y0 = math.floor(region.x / downsample), math.floor(region.y / downsample)
    x1 = math.ceil((region.x + region.width) / downsample)
    y1 = math.ceil((region.y + region.height) / downsample)
    image = slide.read_region(x0, y0, level, x1 - x0, y1 - y0)
    xy = (detector.detect(image, mpp=slide.mpp * downsample).xy + (x0, y0) + 0.5) * downsample - 0.5
    inside = ((xy[:, 0] >= region.x - 0.5) & (xy[:, 0] < region.x + region.width - 0.5)
              & (xy[:, 1] >= region.y - 0.5) & (xy[:, 1] < region.y + region.height - 0.5))
    return xy[inside].astype(np.float32)


def region_nuclei(regions: list[Region], detector: Detector, cache: Path, progress: bool = True, rank: int = 0,
                  world: int = 1) -> list[np.ndarray]:
    """Each region's nuclei: from ``cache`` where it has them, else detected (each process its share) and
    added to it by process 0."""
    found = read_nuclei(cache)
    todo = [r for r in dict.fromkeys(regions) if r.key not in found]
    sources = OpenSources()
    step = DETECTION_CHUNK * world
    chunks = range(0, len(todo), step)
    for first in tqdm(chunks, desc="finding nuclei", unit=f"x{step} regions", disable=not (progress and rank == 0)):
        mine = {r.key: detect_region(sources.get(r), r, detector) for r in todo[first:first + step][rank::world]}
        if world > 1:
            shares = [None] * world
            dist.all_gather_object(shares, mine)
            mine = {k: v for share in shares for k, v in share.items()}
        found.update(mine)
        if rank == 0:
            write_nuclei(cache, found)
    return [found[r.key] for r in regions]


def read_nuclei(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        return {}
    with np.load(path, allow_pickle=False) as data:
        ends = np.cumsum(data["counts"])
        return {str(k): data["xy"][e - n:e] for k, n, e in zip(data["keys"], data["counts"], ends)}


def write_nuclei(path: Path, found: dict[str, np.ndarray]) -> None:
    keys = list(found)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, keys=np.array(keys, dtype=str), counts=np.array([len(found[k]) for k in keys], dtype=np.int64),
                 xy=np.concatenate([found[k] for k in keys]).reshape(-1, 2).astype(np.float32))
