"""The outline head: a nucleus's star-convex outline, predicted at its detected point.

StarDist predicts, densely, the distance from every pixel to its nucleus's boundary along N directions. Here only
the detected points are asked (the decoupled design: the detector finds the points; everything else is read at
them), and from the detector's own feature maps: its stride-2 and stride-4 maps and its point head's hidden map,
read by an MLP on a lattice around each point. The detector has computed them already when it found the points
(``denuc.inference.outline`` runs both in one pass). The head's own convs on the stride-2 and stride-4 maps run only
on a window around each point, just large enough for its lattice (``_read_windows``), not over the whole maps,
which took a fifth of the detector's time on a CPU; the windows' reads take about as much more (docs/outlines.md,
"Cost"), so the total is the same, and wider lattices cost little more. The detector is a frozen
copy inside the head: any points can be outlined, the detector's or another tool's. The output ``radii`` (working
pixels) along ``ray_angles`` turn into a polygon with ``polygons``.

Measured before this design (docs/outlines.md): a CNN on a patch per point (0.5-3x the detector's time: neighbouring
patches overlap several times over), then a stem of the head's own (0.3-0.4x the detector's time for the stem alone).

Directions follow the image frame: angle 0 points along +x, angles grow towards +y (clockwise on screen).
Flipping or transposing a patch permutes the rays (``dihedral_ray_order``), which is how training augments.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from denuc.config import DetectorConfig, OutlineConfig
from denuc.models.detector import BACKBONES, PointDetector

MAPS = ("stride2", "stride4", "head")  # the detector's maps read, in the order of ``OutlineConfig.lattices``
_BLOCK = 6  # modules per depthwise-separable conv (``_separable``)


def ray_angles(rays: int) -> np.ndarray:
    """The ``rays`` directions (radians), evenly spaced from 0."""
    return 2 * np.pi * np.arange(rays) / rays


class OutlineHead(nn.Module):
    """A frozen point detector (``detector``) and what reads its maps: ``fine`` and ``coarse``, depthwise-separable
    convs (``OutlineConfig.fine_convs``, ``coarse_convs``) on its stride-2 and stride-4 maps, and an MLP that reads
    their output and the point head's hidden map on lattices around each point (``OutlineConfig.lattices``) and
    predicts the point's radii (working pixels, positive)."""

    def __init__(self, config: OutlineConfig, detector: PointDetector | DetectorConfig) -> None:
        super().__init__()
        self.config = config
        self.detector = detector if isinstance(detector, PointDetector) else PointDetector(detector)
        self.detector.requires_grad_(False)
        if self.detector.config.mpp != config.mpp:
            raise ValueError(f"the outline head works at {config.mpp} um/px, its detector at "
                             f"{self.detector.config.mpp}")
        channels = BACKBONES[self.detector.config.backbone][1][0]
        self.fine = nn.Sequential(*(module for _ in range(config.fine_convs) for module in _separable(channels)))
        self.coarse = nn.Sequential(*(module for _ in range(config.coarse_convs) for module in _separable(channels)))
        width = {"stride2": channels, "stride4": channels, "head": self.detector.config.neck_channels}
        self.strides = {"stride2": 2, "stride4": 4, "head": self.detector.stride}
        for name, (grid, spacing) in zip(MAPS, config.lattices):
            steps = torch.arange(grid, dtype=torch.float32) - (grid - 1) / 2
            lattice = torch.stack(torch.meshgrid(steps, steps, indexing="xy"), dim=-1).reshape(-1, 2) * spacing
            self.register_buffer(f"{name}_offsets", lattice, persistent=False)
        inputs = sum(grid * grid * width[name] for name, (grid, _) in zip(MAPS, config.lattices))
        self.regress = nn.Sequential(nn.Linear(inputs, config.hidden), nn.ReLU(inplace=True),
                                     nn.Linear(config.hidden, config.rays))

    def train(self, mode: bool = True) -> "OutlineHead":
        """Training mode for what the head trains; the detector stays frozen, batch-norm statistics included."""
        super().train(mode)
        self.detector.eval()
        return self

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The detector's maps the head reads (``MAPS``, of ``PointDetector.trunk``) of images (B, 3, H, W) float
        RGB 0-255, H and W multiples of 32."""
        trunk = self.detector.trunk(images)
        return {name: trunk[name] for name in MAPS}

    def read(self, features: dict[str, torch.Tensor], points: list[torch.Tensor]) -> torch.Tensor:
        """Radii (n_1 + ... + n_B, rays) of the points ``points[b]`` (n_b, 2, working pixels) of image b of a
        batch's maps (``features``), images in order."""
        first = features[MAPS[0]]
        if not sum(len(p) for p in points):
            return first.new_zeros((0, self.config.rays))
        image = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(points)]).to(first.device)
        xy = torch.cat(list(points)).to(first.device)
        convs = {"stride2": self.fine, "stride4": self.coarse, "head": nn.Sequential()}
        x = torch.cat([_read_windows(features[name], image, xy, getattr(self, f"{name}_offsets"), self.strides[name],
                                     convs[name]) for name in MAPS], -1)
        # softplus keeps radii positive; +4 starts the untrained head near a 4-pixel radius
        return F.softplus(self.regress(x) + 4.0)


def _separable(channels: int) -> list[nn.Module]:
    """A depthwise 3x3 then a pointwise conv: a wider receptive field for a ninth of a full conv's arithmetic."""
    return [nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True)]


def _read_windows(features: torch.Tensor, image: torch.Tensor, xy: torch.Tensor, offsets: torch.Tensor, stride: int,
                  convs: nn.Sequential) -> torch.Tensor:
    """Bilinear reads (N, M * C) of the stride-``stride`` maps (B, C, h, w) after ``convs`` (depthwise-separable
    blocks, 3x3 padding 1), at points ``xy`` (N, 2) of images ``image`` (N,) plus ``offsets`` (M, 2), in image pixels
    (feature cell j covers image pixels stride * j .. stride * (j + 1) - 1); zero outside the map.

    The convs run on a window around each point only: the cells its reads touch plus one ring per conv block. Each
    block's output is zeroed outside the map, as the next block's zero padding sees it there when run on the whole
    map, so the reads equal those of the convs run on the whole map (tests/test_outline_head.py)."""
    h, w = features.shape[-2:]
    blocks = len(convs) // _BLOCK
    cells = (xy[:, None, :] + offsets + 0.5) / stride - 0.5  # (N, M, 2) in cells: cell j's centre at j
    span = float((offsets.max(0).values - offsets.min(0).values).max()) / stride
    size = int(np.ceil(span)) + 2 + 2 * blocks  # bilinear reads touch floor(c) and floor(c) + 1
    origin = cells.amin(1).floor().long() - blocks  # (N, 2) the window's first cell, x and y
    steps = torch.arange(size, device=xy.device)
    cols, rows = origin[:, 0, None] + steps, origin[:, 1, None] + steps  # (N, size)
    inside = (((cols >= 0) & (cols < w))[:, None, :] & ((rows >= 0) & (rows < h))[:, :, None])[:, None]
    window = features[image[:, None, None], :, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    window = window.permute(0, 3, 1, 2) * inside  # (N, C, size, size)
    for first in range(0, len(convs), _BLOCK):
        window = convs[first:first + _BLOCK](window) * inside
    grid = (cells - origin[:, None, :] + 0.5) / size * 2 - 1  # in the window, align_corners=False
    sampled = F.grid_sample(window, grid[:, :, None, :], mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # (N, C, M, 1)
    return sampled[..., 0].permute(0, 2, 1).reshape(len(xy), -1)


def dihedral_ray_order(rays: int, transpose: bool, flip_x: bool, flip_y: bool) -> np.ndarray:
    """Index into a patch's radii giving the radii of the patch transformed by (transpose, then flip x, then flip
    y): ray j of the transformed patch is ray ``order[j]`` of the original."""
    j = np.arange(rays)
    # each operation maps the direction of angle a to another; applying the inverses to the new ray's angle
    # finds the original ray. In ray units (rays / 4 per right angle): flip y: a -> -a; flip x: a -> n/2 - a;
    # transpose: a -> n/4 - a.
    if flip_y:
        j = (-j) % rays
    if flip_x:
        j = (rays // 2 - j) % rays
    if transpose:
        j = (rays // 4 - j) % rays
    return j


def polygons(xy: np.ndarray, radii: np.ndarray) -> list[np.ndarray]:
    """Outline vertices (k = rays, 2) per nucleus from its centre ``xy`` (N, 2) and ``radii`` (N, rays), all in
    the same pixels."""
    angles = ray_angles(radii.shape[1])
    directions = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (rays, 2)
    vertices = xy[:, None, :] + radii[:, :, None] * directions[None]
    return list(vertices)


def trim_to_neighbours(xy: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """``radii`` (N, rays) shortened so that no outline crosses the perpendicular bisector between its centre and
    a neighbour's: each pixel then lies in at most one outline, the nearer centre's (the rule of
    ``denuc.outlines.rasterise``), and outlines stay star-convex. Exact at the vertices; an edge between two
    vertices may cut a bisector's corner by a fraction of a pixel."""
    if len(xy) < 2:
        return radii
    from scipy.spatial import cKDTree

    angles = ray_angles(radii.shape[1])
    directions = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (rays, 2)
    reach = 2 * float(radii.max())
    trimmed = radii.copy()
    pairs = cKDTree(xy).query_pairs(reach, output_type="ndarray")
    if not len(pairs):
        return radii
    i, j = np.r_[pairs[:, 0], pairs[:, 1]], np.r_[pairs[:, 1], pairs[:, 0]]
    order = np.argsort(i, kind="stable")
    i, j = i[order], j[order]
    delta = xy[j] - xy[i]  # (P, 2)
    along = delta @ directions.T  # (P, rays): how far each ray advances towards the neighbour
    # the ray from centre i along d meets the bisector at t = |delta|^2 / (2 d . delta), where d . delta > 0
    with np.errstate(divide="ignore"):
        t = np.where(along > 0, (delta ** 2).sum(1, keepdims=True) / (2 * along), np.inf)
    starts = np.r_[0, np.nonzero(np.diff(i))[0] + 1]
    trimmed[i[starts]] = np.minimum(trimmed[i[starts]], np.minimum.reduceat(t, starts, axis=0))
    return trimmed
