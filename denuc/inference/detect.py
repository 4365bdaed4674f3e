"""The point detector users run: ``Detector.from_pretrained("default").detect(image, mpp=0.5)``.

A ``Detector`` holds the network's weights and settings and a *backend* that runs its forward pass:
``TorchBackend`` (PyTorch, any device) or ``denuc.inference.runtime.OnnxBackend`` (ONNX Runtime, CPU), chosen by
``make_detector``. Tiling and ownership live in ``denuc.inference.tiling``, point NMS in ``nms``, test-time views
in ``tta``; model names in ``denuc.hub``.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from functools import partial
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from denuc import hub
from denuc.config import RUNTIMES, DetectorConfig
from denuc.errors import InputError
from denuc.inference.nms import point_nms
from denuc.inference.tiling import iter_tiles, predict_image
from denuc.inference.tta import fuse_views, unview_points, view_tiles
from denuc.io.atomic import atomic_path
from denuc.models.detector import PointDetector
from denuc.nuclei import Nuclei, concat

BUNDLE_DETECTOR = "detector."
"""The prefix of the detector's tensors in a bundle (``denuc.inference.pipeline``)."""


class Backend(Protocol):
    """Runs a detector network: nucleus probability (B, A) and position (B, A, 2) of every anchor, for RGB uint8
    tiles (B, H, W, 3)."""

    runtime: str  # "torch" or "onnx"

    def __call__(self, tiles: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class TorchBackend:
    """The network in PyTorch on ``device``."""

    runtime = "torch"

    def __init__(self, model: PointDetector, device: torch.device) -> None:
        self.model, self.device = model, device

    def __call__(self, tiles: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.as_tensor(tiles, device=self.device).permute(0, 3, 1, 2).float()
        logits, points = self.model(batch.contiguous(memory_format=torch.channels_last))
        return logits.softmax(-1)[..., 1], points


class Detector:
    """A trained point detector with its working resolution and thresholds.

    ``backend`` runs the network (default: ``TorchBackend`` on ``device``); ``make_detector`` picks one for a
    runtime name.
    """

    def __init__(self, model: PointDetector, device: str | torch.device = "cpu", backend: Backend | None = None
                 ) -> None:
        # channels-last weights, as the tiles are fed: measured several times faster on CPU than contiguous
        # ones (docs/benchmarks.md); the model is taken over, as eval() already does
        self.model = model.eval().to(device, memory_format=torch.channels_last)
        self.device = torch.device(device)
        self.backend = TorchBackend(self.model, self.device) if backend is None else backend

    @property
    def runtime(self) -> str:
        """Where the network runs: "torch" or "onnx"."""
        return self.backend.runtime

    @property
    def config(self) -> DetectorConfig:
        return self.model.config

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike = "default", device: str = "cpu",
                        runtime: str = "torch") -> "Detector":
        """Load a detector: a shipped name (``denuc.hub``: "default", "fast", a tag, ...) or a ``.safetensors``
        file written by ``save``. A bundle (``Pipeline.save``) gives its own detector, with the bundle's tiles.

        ``runtime``: "torch", "onnx" to run the network in ONNX Runtime (CPU only), or "auto" (ONNX Runtime on a
        CPU, PyTorch on a GPU; see ``make_detector``).
        """
        path = hub.resolve(path_or_name, kind="detector")
        metadata = hub.read_metadata(path)
        kind = hub.kind_of(metadata, path)
        state = read_tensors(path)
        if kind == "bundle":
            state = {k[len(BUNDLE_DETECTOR):]: v for k, v in state.items() if k.startswith(BUNDLE_DETECTOR)}
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
        # a bundle's float16 tensors are cast to the model's float32 by load_state_dict
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(source, f"weights do not fit a {config.backbone} detector: missing {missing[:5]}, "
                                     f"unexpected {unexpected[:5]}")
        return make_detector(model, device, runtime)

    def save(self, path: str | os.PathLike, extra_metadata: dict | None = None, tag: str | None = None) -> None:
        """Write the detector: its tensors, and in the metadata its config, ``extra_metadata`` (as JSON), this
        denuc's version and ``tag``."""
        metadata = {"denuc_detector": self.config.to_json(), "format": hub.DETECTOR_FORMAT}
        metadata.update({k: json.dumps(v) for k, v in (extra_metadata or {}).items()})
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=hub.stamp(metadata, tag))

    def with_settings(self, **changes) -> "Detector":
        """Change inference settings (score_threshold, nms_radius_um, tile_size, ...) in place; returns self.
        Thresholds given without ``large_tile_thresholds`` hold at every tile size (those chosen for larger tiles
        are dropped)."""
        if {"score_threshold", "score_threshold_40x"} & changes.keys():
            changes.setdefault("large_tile_thresholds", None)
        self.model.config = replace(self.config, **changes)
        return self

    @torch.inference_mode()
    def forward(self, tiles: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nucleus probability (B, A) and position (B, A, 2) of every anchor, for RGB uint8 tiles (B, H, W, 3)."""
        return self.backend(tiles)

    @torch.inference_mode()
    def detect_tiles(self, tiles: np.ndarray | torch.Tensor, scan_mpp: float | None = None) -> list[Nuclei]:
        """Points of a batch of RGB uint8 tiles (B, H, W, 3) at the model's pixel size, H and W multiples of 32,
        cut from an image scanned at ``scan_mpp`` um/px (None: unknown), which sets the score threshold
        (``DetectorConfig.threshold_for``).

        Returns per tile the points (with scores) in tile pixels, above the score threshold and after point NMS
        within the tile (so overlapping tiles mostly agree on which of two close points survives).
        """
        cfg = self.config
        radius = cfg.nms_radius_um / cfg.mpp
        threshold = cfg.threshold_for(scan_mpp)
        if cfg.test_time_views == 1:
            scores, points = self.forward(tiles)
            keep = scores > threshold
            candidates = [(points[k][keep[k]].cpu().numpy(), scores[k][keep[k]].cpu().numpy())
                          for k in range(len(scores))]
        else:
            candidates = self._fused_candidates(torch.as_tensor(tiles), radius, threshold)
        results = []
        for xy, s in candidates:
            xy, s = xy.astype(np.float64).reshape(-1, 2), s.astype(np.float64)
            kept = point_nms(xy, s, radius)
            results.append(Nuclei(xy=xy[kept], scores=s[kept], mpp=cfg.mpp))
        return results

    def _fused_candidates(self, tiles: torch.Tensor, radius: float, threshold: float
                          ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per tile, the points of all ``test_time_views`` views fused (``fuse_views``) and above ``threshold``."""
        cfg = self.config
        floor = min(0.1, threshold)  # weaker points barely move a fused score; dropping them saves time
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
            candidates.append((xy[s > threshold], s[s > threshold]))
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

        The image is resampled to the model's working resolution, detected tile by tile (at the score threshold
        for its pixel size), and the points are mapped back to the input image's pixels. The result's labels are
        all "unlabelled".
        """
        return predict_image(image, mpp, self.config, partial(self.detect_tiles, scan_mpp=mpp), batch_size)


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
        from denuc.inference.runtime import OnnxBackend  # imported only when asked for: onnx loads slowly

        return Detector(model, "cpu", OnnxBackend(model))
    return Detector(model, device)


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (on the CPU); InputError naming the file if it cannot be read."""
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types
        raise InputError(path, f"not a readable safetensors file: {error}") from None
