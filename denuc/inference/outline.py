"""Outlines for detected nuclei: ``Outliner.from_pretrained("default-outlines").outline(image, nuclei, mpp)``.

Any points will do (denuc's detector's, or another tool's): the outline head (``denuc.models.outline``) reads a
small stem's features around each point at the working pixel size. Large images are done in tiles whose margin
covers everything a point's outline reads, so the result does not depend on the tiling.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

import numpy as np
import torch
from safetensors.torch import load_file

from denuc import hub
from denuc.config import OutlineConfig
from denuc.errors import InputError
from denuc.inference.detect import choose_runtime
from denuc.inference.runtime import OnnxOutlineStem
from denuc.io.images import pad_to_multiple, resample, resample_tiles, scale_to
from denuc.models.outline import OutlineHead, polygons, trim_to_neighbours
from denuc.nuclei import Nuclei
from denuc.outlines import measure

TILE = 1024  # working pixels per tile (the stem's features of a tile: 16 x 512^2 + 32 x 256^2 floats, 25 MB)


class Outliner:
    """An outline head, the device it runs on, and where its stem runs: "torch", or "onnx" (ONNX Runtime, CPU:
    about 4x faster there), or "auto" (ONNX Runtime on a CPU, PyTorch on a GPU, as for the detector)."""

    def __init__(self, model: OutlineHead, device: str | torch.device = "cpu", runtime: str = "torch") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.runtime = choose_runtime(runtime, self.device)
        if self.runtime == "onnx" and self.device.type != "cpu":
            raise ValueError(f'runtime "onnx" runs on the CPU, not {self.device}: use runtime "torch" or "auto"')
        self._onnx_stem = OnnxOutlineStem(self.model) if self.runtime == "onnx" else None

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stem's features of (B, 3, H, W) float RGB 0-255 tiles, H and W multiples of 4."""
        if self._onnx_stem is not None:
            return self._onnx_stem(pixels)
        return self.model.features(pixels)

    @property
    def config(self) -> OutlineConfig:
        return self.model.config

    def fingerprint(self) -> str:
        """SHA-256 of the weights and config: whether a saved run used this outline head."""
        digest = hashlib.sha256(self.config.to_json().encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().numpy().tobytes())
        return digest.hexdigest()

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike = "default-outlines", device: str = "cpu",
                        runtime: str = "torch") -> "Outliner":
        """Load an outline head: a shipped name (``denuc.hub``) or a file written by ``save_outline_head``."""
        path = hub.resolve(path_or_name, kind="outline")
        metadata = hub.read_metadata(path)
        if hub.kind_of(metadata, path) != "outline":
            raise InputError(path, "not a denuc outline head")
        model = OutlineHead(OutlineConfig.from_json(metadata["config"]))
        try:
            model.load_state_dict(load_file(str(path)))
        except RuntimeError as error:
            raise InputError(path, f"weights do not fit the outline head's config: {error}") from None
        return cls(model, device, runtime)

    @torch.inference_mode()
    def radii(self, work: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """Radii (n, rays) in working pixels of points ``xy`` (n, 2) of an RGB uint8 image ``work`` already at the
        working pixel size. Tiles of TILE pixels, each read with a margin that holds everything its points'
        outlines read (``OutlineConfig.reach`` plus the stem's receptive field)."""
        out = np.zeros((len(xy), self.config.rays), dtype=np.float32)
        if not len(xy):
            return out
        h, w = work.shape[:2]
        margin = int(np.ceil(self.config.reach)) + 16
        margin += -margin % 4
        # each point belongs to the tile its pixel lies in (points just past the image: the nearest tile)
        tile_x = np.clip(np.floor((xy[:, 0] + 0.5) / TILE), 0, (w - 1) // TILE).astype(int)
        tile_y = np.clip(np.floor((xy[:, 1] + 0.5) / TILE), 0, (h - 1) // TILE).astype(int)
        for ty, tx in sorted(set(zip(tile_y.tolist(), tile_x.tolist()))):
            own = (tile_x == tx) & (tile_y == ty)
            # regions start on multiples of 4 (TILE and margin are), so the stem's grid is the same in every tile
            rx0, ry0 = max(0, tx * TILE - margin), max(0, ty * TILE - margin)
            rx1, ry1 = min(w, (tx + 1) * TILE + margin), min(h, (ty + 1) * TILE + margin)
            region = pad_to_multiple(work[ry0:ry1, rx0:rx1], 4)
            pixels = torch.tensor(region, device=self.device).permute(2, 0, 1).float()[None]  # a copy: may be a view
            local = torch.from_numpy(xy[own] - (rx0, ry0)).float().to(self.device)
            out[own] = self.model.read(self.features(pixels), [local]).cpu().numpy()
        return out

    def outline(self, image: np.ndarray, nuclei: Nuclei, mpp: float) -> Nuclei:
        """``nuclei`` (points in ``image``'s pixels, pixel size ``mpp``) with their ``outlines`` in the same
        pixels, trimmed where they would overlap (``trim_to_neighbours``); they may reach past the image
        (``denuc.outlines.clip_outlines`` clips them)."""
        factor = scale_to(mpp, self.config.mpp)
        work = resample(image, factor)
        fx, fy = work.shape[1] / image.shape[1], work.shape[0] / image.shape[0]
        xy = np.c_[(nuclei.xy[:, 0] + 0.5) * fx - 0.5, (nuclei.xy[:, 1] + 0.5) * fy - 0.5]
        vertices = polygons(xy, trim_to_neighbours(xy, self.radii(work, xy).astype(np.float64)))
        to_image = np.array([fx, fy])
        return replace(nuclei, outlines=[(v + 0.5) / to_image - 0.5 for v in vertices])

    @torch.inference_mode()
    def outline_tiles(self, tiles: np.ndarray, found: list[Nuclei], mpp: float | None = None
                      ) -> list[tuple[Nuclei, dict[str, np.ndarray]]]:
        """Per tile of a batch (B, H, W, 3) uint8 of pixel size ``mpp`` (default: the head's working pixel size;
        H, W multiples of 4), its ``found`` nuclei (tile pixels) with outlines (trimmed where they would overlap)
        and their measurements (``denuc.outlines.measure``). The stem runs once over the batch. Tiles at another
        pixel size (a detector working at a finer resolution) are resampled to the head's for the stem; outlines
        stay in tile pixels. A nucleus is measured on its tile's pixels: one reaching past the tile (possible only
        for one wider than the tile overlap, 16 um by default, at a tile's edge) is measured on its part inside."""
        mpp = self.config.mpp if mpp is None else mpp
        work, fxy = resample_tiles(tiles, scale_to(mpp, self.config.mpp), 4)
        pixels = torch.from_numpy(work).to(self.device).permute(0, 3, 1, 2).float()
        points = [torch.from_numpy((nuclei.xy + 0.5) * fxy - 0.5).float().to(self.device) for nuclei in found]
        radii = self.model.read(self.features(pixels), points).cpu().numpy().astype(np.float64) / np.sqrt(fxy.prod())
        out = []
        for tile, nuclei, tile_radii in zip(tiles, found, np.split(radii, np.cumsum([len(n) for n in found])[:-1])):
            outlined = replace(nuclei, outlines=polygons(nuclei.xy, trim_to_neighbours(nuclei.xy, tile_radii)))
            out.append((outlined, measure(outlined, tile, mpp)))
        return out

