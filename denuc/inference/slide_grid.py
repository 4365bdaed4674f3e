"""The model's working grid over a slide: which tiles there are, which hold tissue, what each tile reads and owns.

The slide is seen at the model's working resolution (``model.mpp`` um/px) and cut into the detector's
overlapping tiles, laid out exactly as ``denuc.inference.tiling`` lays them out on an image. Each tile owns the
half of every overlap nearest to it (``tiling.ownership_bounds``), so a nucleus is kept by exactly one tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from denuc.inference.pipeline import Pipeline
from denuc.inference.tiling import ALIGN, ownership_bounds, tile_origins
from denuc.inference.tissue import TissueMask
from denuc.io.images import scale_to
from denuc.io.slides import Slide
from denuc.nuclei import Nuclei

Tile = tuple[int, int]
"""(row, column) of a tile in the grid."""


@dataclass
class Grid:
    """The model's working grid over a slide, and where its tiles come from.

    Working pixels are ``scale`` times level-0 pixels; the read level's pixels are ``ratio`` per working pixel
    (>= 1: the level is never coarser than the model needs; exactly 1 when the level's pixel size is within
    RESAMPLE_TOLERANCE of the model's, and then scale = slide mpp / model mpp only approximately).
    """

    scale: float
    level: int
    ratio: float
    extent: tuple[float, float]  # working-pixel width and height of the slide (not rounded)
    tile_size: tuple[int, int]  # (width, height)
    xs: list[int]
    ys: list[int]
    xbounds: list[tuple[float, float]]
    ybounds: list[tuple[float, float]]

    @classmethod
    def for_slide(cls, slide: Slide, model: Pipeline) -> "Grid":
        cfg = model.detector.config
        level = slide.best_level(model.mpp)
        downsample = slide.level_downsamples[level]
        ratio = scale_to(model.mpp, slide.mpp * downsample)  # 1: the level's pixels are read as they are
        scale = 1.0 / (ratio * downsample)
        width, height = slide.dimensions[0] * scale, slide.dimensions[1] * scale
        # Like iter_tiles: pad to a multiple of the backbone stride, tiles no larger than the padded image.
        padded_w, padded_h = (math.ceil(math.ceil(v) / ALIGN) * ALIGN for v in (width, height))
        tile_w, tile_h = min(cfg.tile_size, padded_w), min(cfg.tile_size, padded_h)
        xs = tile_origins(padded_w, tile_w, cfg.tile_overlap)
        ys = tile_origins(padded_h, tile_h, cfg.tile_overlap)
        return cls(scale, level, ratio, (width, height), (tile_w, tile_h), xs, ys,
                   ownership_bounds(xs, tile_w, padded_w), ownership_bounds(ys, tile_h, padded_h))

    def owned_box(self, tile: Tile) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1): the working-pixel edges of the part of the slide a tile owns."""
        (ylo, yhi), (xlo, xhi) = self.ybounds[tile[0]], self.xbounds[tile[1]]
        return (max(xlo + 0.5, 0.0), max(ylo + 0.5, 0.0), min(xhi + 0.5, self.extent[0]),
                min(yhi + 0.5, self.extent[1]))

    def read(self, slide: Slide, tile: Tile) -> np.ndarray:
        """The tile's pixels (RGB uint8, tile_size) at the working resolution."""
        x0, y0 = self.xs[tile[1]], self.ys[tile[0]]
        width, height = self.tile_size
        if self.ratio == 1.0:
            return slide.read_region(x0, y0, self.level, width, height)
        # Read the level pixels under the tile plus a margin for the bicubic filter's support, then resample
        # exactly the tile's footprint (PIL's box is in source pixels, fractional).
        r = self.ratio
        margin = math.ceil(2 * r) + 1
        ax, ay = math.floor(x0 * r) - margin, math.floor(y0 * r) - margin
        bx, by = math.ceil((x0 + width) * r) + margin, math.ceil((y0 + height) * r) + margin
        region = slide.read_region(ax, ay, self.level, bx - ax, by - ay)
        box = (x0 * r - ax, y0 * r - ay, (x0 + width) * r - ax, (y0 + height) * r - ay)
        return np.asarray(Image.fromarray(region).resize((width, height), Image.Resampling.BICUBIC, box=box,
                                                         reducing_gap=None))

    def ownership(self, tile: Tile, xy: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
        """Which points ``xy`` (tile pixels) of a tile the tile owns, and which lie within ``radius`` working
        pixels of a border shared with another tile (where the neighbour may have placed the same nucleus)."""
        row, col = tile
        u, v = xy[:, 0] + self.xs[col], xy[:, 1] + self.ys[row]
        (xlo, xhi), (ylo, yhi) = self.xbounds[col], self.ybounds[row]
        width, height = self.extent
        owned = ((u >= xlo) & (u < xhi) & (v >= ylo) & (v < yhi)
                 & (u >= -0.5) & (u <= width - 0.5) & (v >= -0.5) & (v <= height - 0.5))
        seam = np.minimum.reduce([u - xlo, xhi - u, v - ylo, yhi - v]) <= radius if len(u) else np.zeros(0, bool)
        return owned, seam

    def to_level0(self, tile: Tile, nuclei: Nuclei, level0_size: tuple[int, int]) -> Nuclei:
        """``nuclei`` of a tile (tile pixels) moved to level-0 pixels, with their outlines; points clipped to the
        slide."""
        origin = np.array([self.xs[tile[1]], self.ys[tile[0]]], dtype=np.float64)

        def move(xy: np.ndarray) -> np.ndarray:
            return (xy + origin + 0.5) / self.scale - 0.5

        outlines = None if nuclei.outlines is None else [None if o is None else move(o) for o in nuclei.outlines]
        return replace(nuclei, xy=np.clip(move(nuclei.xy), -0.5, np.array(level0_size) - 0.5).reshape(-1, 2),
                       outlines=outlines)

def tissue_tiles(grid: Grid, mask: TissueMask, level0_size: tuple[int, int]) -> list[Tile]:
    """Tiles, row by row, whose owned area touches the mask (grown by one mask pixel, not to miss edges)."""
    mh, mw = mask.mask.shape
    fx, fy = mw / (level0_size[0] * grid.scale), mh / (level0_size[1] * grid.scale)  # mask px per working px
    tiles = []
    for row in range(len(grid.ys)):
        for col in range(len(grid.xs)):
            x0, y0, x1, y1 = grid.owned_box((row, col))
            if x1 <= x0 or y1 <= y0:
                continue
            a, b = max(int(x0 * fx) - 1, 0), min(math.ceil(x1 * fx) + 1, mw)
            c, d = max(int(y0 * fy) - 1, 0), min(math.ceil(y1 * fy) + 1, mh)
            if mask.mask[c:d, a:b].any():
                tiles.append((row, col))
    return tiles
