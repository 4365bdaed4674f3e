"""Running a point detector on images of any size: sliding window, tile ownership, point NMS.

``Detector`` is the user-facing object: ``Detector.from_pretrained("default").detect(image, mpp=0.5)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy.spatial import cKDTree

from denuc.config import RUNTIMES, DetectorConfig
from denuc.errors import InputError
from denuc.io.atomic import atomic_path
from denuc.io.images import read_image, resample, scale_to, to_rgb_uint8
from denuc.models.detector import PointDetector
from denuc.nuclei import Nuclei, concat

PRETRAINED = {"default": "detector_default.safetensors", "fast": "detector_fast.safetensors",
              "stain-robust": "detector_stain_robust.safetensors"}
"""Detectors shipped inside the package (denuc/weights): "default" (ShuffleNetV2 1.0x), "fast" (0.5x, about
three quarters of the time for 1-2 points less F1), both fine-tuned with RandStainNA colour augmentation, and
"stain-robust" (1.0x trained with RandStainNA from the start: 1-4 points less F1 on our test splits, 2 points more
on images in another lab's colours); see DETECTOR_CARD.md."""

ALIGN = 32  # the backbone's total stride: tile origins and sizes are multiples of it so grids line up


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


def view_tiles(tiles: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` (0-7) of a (B, H, W, C) batch: bit 4 transposes, then bit 1 flips x and bit 2 flips y.
    Views 0, 1, 2, 3 are the identity and the flips, 4-7 the same after a transpose (the eight symmetries of
    a square, which H&E has: tissue has no up or left)."""
    if view & 4:
        tiles = tiles.transpose(1, 2)
    if view & 1:
        tiles = tiles.flip(2)
    if view & 2:
        tiles = tiles.flip(1)
    return tiles


def view_points(points: torch.Tensor, view: int, height: int, width: int) -> torch.Tensor:
    """Points (..., 2) of a ``height`` x ``width`` tile where they are in its view ``view``."""
    points = points.clone()
    if view & 4:
        points, height, width = points.flip(-1), width, height
    if view & 1:
        points[..., 0] = width - 1 - points[..., 0]
    if view & 2:
        points[..., 1] = height - 1 - points[..., 1]
    return points


def unview_points(points: torch.Tensor, view: int, height: int, width: int) -> torch.Tensor:
    """Points (..., 2) found in view ``view`` of a ``height`` x ``width`` view, in the original tile's pixels
    (pixel centres at integers, so a flip maps x to width - 1 - x)."""
    # the inverse view: flips undo themselves; after a transpose, the x and y flips trade places
    inverse = view if not view & 4 else 4 | (view & 1) << 1 | (view & 2) >> 1
    return view_points(points, inverse, height, width)


def fuse_views(xy: np.ndarray, scores: np.ndarray, views: np.ndarray, n_views: int, radius: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Fuse points found in ``n_views`` views of one tile into one set (weighted point fusion).

    Strongest first, each unused point gathers the unused points within ``radius`` (at most the strongest one
    per view); the fused point is their score-weighted mean position, its score the sum of their scores over
    ``n_views`` (a nucleus found in one view of eight at 0.8 scores 0.1). Averaging score maps anchor by
    anchor instead measured worse: the anchor that claims a nucleus changes with the view.
    """
    if len(xy) == 0:
        return xy.reshape(0, 2), scores
    order = np.argsort(-scores, kind="stable")
    neighbours = cKDTree(xy).query_ball_point(xy[order], radius)
    used = np.zeros(len(xy), dtype=bool)
    fused_xy, fused_scores = [], []
    for i, near in zip(order, neighbours):
        if used[i]:
            continue
        near = np.array([j for j in near if not used[j]])
        near = near[np.argsort(-scores[near], kind="stable")]
        _, first = np.unique(views[near], return_index=True)  # the strongest point of each view
        members = near[first]
        used[members] = True
        weights = scores[members]
        fused_xy.append(weights @ xy[members] / weights.sum())
        fused_scores.append(weights.sum() / n_views)
    return np.array(fused_xy), np.array(fused_scores)


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


def _ownership_bounds(starts: list[int], tile: int, length: int) -> list[tuple[float, float]]:
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
    ybounds, xbounds = _ownership_bounds(ys, tile_h, h), _ownership_bounds(xs, tile_w, w)
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


class Detector:
    """A trained point detector with its working resolution and thresholds."""

    runtime = "torch"  # where the network runs (subclasses: "onnx")

    def __init__(self, model: PointDetector, device: str | torch.device = "cpu") -> None:
        # channels-last weights, as the tiles are fed: measured several times faster on CPU than contiguous
        # ones (docs/benchmarks.md); the model is taken over, as eval() already does
        self.model = model.eval().to(device, memory_format=torch.channels_last)
        self.device = torch.device(device)

    @property
    def config(self) -> DetectorConfig:
        return self.model.config

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike = "default", device: str = "cpu",
                        runtime: str = "torch") -> "Detector":
        """Load a detector from a ``.safetensors`` file written by ``save`` or a shipped name ("default").

        ``runtime``: "torch", "onnx" to run the network in ONNX Runtime (CPU only), or "auto" (ONNX Runtime on a
        CPU, PyTorch on a GPU; see ``make_detector``).
        """
        if str(path_or_name) in PRETRAINED:
            path = resources.files("denuc") / "weights" / PRETRAINED[str(path_or_name)]
        else:
            path = Path(path_or_name)
        if not Path(str(path)).is_file():
            raise InputError(path_or_name, f"no such detector file (shipped names: {sorted(PRETRAINED)})")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            state = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise InputError(path, f"not a readable safetensors file: {error}") from None
        if "denuc_detector" not in metadata:
            raise InputError(path, "safetensors file has no 'denuc_detector' config: not a denuc detector")
        return cls.from_state(state, metadata, path, device, runtime)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], metadata: dict[str, str], source: str | os.PathLike,
                   device: str = "cpu", runtime: str = "torch") -> "Detector":
        """A detector from its tensors and the safetensors metadata holding its config (``source`` names the
        file in errors)."""
        try:
            config = DetectorConfig.from_json(metadata["denuc_detector"])
        except (KeyError, ValueError, TypeError) as error:
            raise InputError(source, f"bad detector metadata: {error!r}") from None
        model = PointDetector(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(source, f"weights do not fit a {config.backbone} detector: missing {missing[:5]}, "
                                     f"unexpected {unexpected[:5]}")
        return make_detector(model, device, runtime)

    def save(self, path: str | os.PathLike, extra_metadata: dict | None = None) -> None:
        metadata = {"denuc_detector": self.config.to_json(), "format": "denuc-detector-1"}
        metadata.update({k: json.dumps(v) for k, v in (extra_metadata or {}).items()})
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=metadata)

    def with_settings(self, **changes) -> "Detector":
        """Change inference settings (score_threshold, nms_radius_um, tile_size, ...) in place; returns self."""
        self.model.config = replace(self.config, **changes)
        return self

    @torch.inference_mode()
    def forward(self, tiles: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nucleus probability (B, A) and position (B, A, 2) of every anchor, for RGB uint8 tiles (B, H, W, 3)."""
        batch = torch.as_tensor(tiles, device=self.device).permute(0, 3, 1, 2).float()
        logits, points = self.model(batch.contiguous(memory_format=torch.channels_last))
        return logits.softmax(-1)[..., 1], points

    @torch.inference_mode()
    def detect_tiles(self, tiles: np.ndarray | torch.Tensor) -> list[Nuclei]:
        """Points of a batch of RGB uint8 tiles (B, H, W, 3) at the model's pixel size, H and W multiples of 32.

        Returns per tile the points (with scores) in tile pixels, above the score threshold and after point NMS
        within the tile (so overlapping tiles mostly agree on which of two close points survives).
        """
        cfg = self.config
        radius = cfg.nms_radius_um / cfg.mpp
        if cfg.test_time_views == 1:
            scores, points = self.forward(tiles)
            keep = scores > cfg.score_threshold
            candidates = [(points[k][keep[k]].cpu().numpy(), scores[k][keep[k]].cpu().numpy())
                          for k in range(len(scores))]
        else:
            candidates = self._fused_candidates(torch.as_tensor(tiles), radius)
        results = []
        for xy, s in candidates:
            xy, s = xy.astype(np.float64).reshape(-1, 2), s.astype(np.float64)
            kept = point_nms(xy, s, radius)
            results.append(Nuclei(xy=xy[kept], scores=s[kept], mpp=cfg.mpp))
        return results

    def _fused_candidates(self, tiles: torch.Tensor, radius: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per tile, the points of all ``test_time_views`` views fused (``fuse_views``) and above the threshold."""
        cfg = self.config
        floor = min(0.1, cfg.score_threshold)  # weaker points barely move a fused score; dropping them saves time
        found = [[] for _ in range(len(tiles))]
        for view in range(cfg.test_time_views):
            viewed = view_tiles(tiles, view)
            scores, points = self.forward(viewed.contiguous())
            points = unview_points(points, view, viewed.shape[1], viewed.shape[2])
            for k in range(len(tiles)):
                keep = scores[k] > floor
                found[k].append((points[k][keep].cpu().numpy(), scores[k][keep].cpu().numpy(), view))
        candidates = []
        for parts in found:
            xy, s = fuse_views(np.concatenate([p[0] for p in parts]).astype(np.float64),
                               np.concatenate([p[1] for p in parts]).astype(np.float64),
                               np.concatenate([np.full(len(p[1]), p[2]) for p in parts]), cfg.test_time_views, radius)
            candidates.append((xy[s > cfg.score_threshold], s[s > cfg.score_threshold]))
        return candidates

    def detect_resampled(self, image: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Detect on an RGB uint8 image already at the model's pixel size; returns (xy, scores).

        The image is cut into tiles of ``tile_size`` with ``tile_overlap``; each point is kept only by the tile
        that owns its position (overlaps are split at their midpoint), so none is lost or doubled at borders.
        """
        found = concat(list(iter_tiles(image, self.config, self.detect_tiles, batch_size)))
        return found.xy, found.scores

    def detect(self, image: np.ndarray | str | os.PathLike, mpp: float | None = None, batch_size: int = 8) -> Nuclei:
        """Detect nuclei in an RGB image (array or file) whose pixel size is ``mpp`` um/px.

        The image is resampled to the model's working resolution, detected tile by tile, and the points are
        mapped back to the input image's pixels. The result's labels are all "unlabelled".
        """
        return predict_image(image, mpp, self.config, self.detect_tiles, batch_size)


def choose_runtime(runtime: str, device: str | torch.device = "cpu") -> str:
    """The runtime "torch" or "onnx" that ``runtime`` (one of ``RUNTIMES``) means on ``device``: "auto" is
    ONNX Runtime on a CPU and PyTorch elsewhere."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {RUNTIMES}")
    if runtime == "auto":
        return "onnx" if torch.device(device).type == "cpu" else "torch"
    return runtime


def make_detector(model: PointDetector, device: str | torch.device = "cpu", runtime: str = "torch") -> Detector:
    """A ``Detector`` for inference on ``model``: "torch" runs it in PyTorch on ``device``; "onnx" exports it
    to ONNX Runtime (CPU), the fastest CPU path measured (docs/benchmarks.md), with the same outputs within
    float32 rounding (tests/test_onnx.py); "auto" picks one of the two for ``device`` (``choose_runtime``)."""
    runtime = choose_runtime(runtime, device)
    if runtime == "onnx":
        if torch.device(device).type != "cpu":
            raise ValueError(f'runtime="onnx" runs on the CPU; use runtime="torch" for device {device!r}')
        from denuc.engine.onnx_runtime import OnnxDetector  # imported only when asked for: onnx loads slowly

        return OnnxDetector(model)
    return Detector(model, device)


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
