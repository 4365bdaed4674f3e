"""Outlines for detected nuclei: ``Outliner.from_pretrained("default-outlines").outline(image, nuclei, mpp)``.

Any points will do (denuc's detector's, or another tool's): the outline head (``denuc.models.outline``) reads its
detector's feature maps around each point at the working pixel size. When that detector is also the one finding the
points (``Outliner.sharing``), one pass of the network gives both, and outlining costs the reads (the head's few
convs, on a window around each point, and its MLP). Large images are done in tiles with a margin of 64 um; the
network's receptive field is wider still, so where the tiling cuts it moves radii a little (a tenth of a pixel at
most with tiles a quarter of the size, tested).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

import numpy as np
import torch
from safetensors.torch import load_file

from denuc import hub
from denuc.config import DetectorConfig, OutlineConfig
from denuc.errors import InputError
from denuc.inference.detect import Detector, choose_runtime
from denuc.inference.runtime import DetectorWithOutlineMaps, OnnxOutlineFeatures
from denuc.io.images import pad_to_multiple, resample, resample_tiles, scale_to
from denuc.models.outline import MAPS, OutlineHead, polygons, trim_to_neighbours
from denuc.nuclei import Nuclei
from denuc.outlines import measure

TILE = 1024  # working pixels per tile
MARGIN = 128  # working pixels of context around a tile (a multiple of the detector's largest stride, 32)


class Outliner:
    """An outline head, the device it runs on, and where its network runs: "torch", or "onnx" (ONNX Runtime, CPU),
    or "auto" (ONNX Runtime on a CPU, PyTorch on a GPU, as for the detector)."""

    def __init__(self, model: OutlineHead, device: str | torch.device = "cpu", runtime: str = "torch") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.runtime = choose_runtime(runtime, self.device)
        if self.runtime == "onnx" and self.device.type != "cpu":
            raise ValueError(f'runtime "onnx" runs on the CPU, not {self.device}: use runtime "torch" or "auto"')
        self._network = OnnxOutlineFeatures(self.model) if self.runtime == "onnx" else self._torch_network
        self._last: tuple[np.ndarray, dict[str, torch.Tensor]] | None = None  # (tiles, maps) of the last pass

    @property
    def config(self) -> OutlineConfig:
        return self.model.config

    def _torch_network(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        scores, points, *maps = DetectorWithOutlineMaps(self.model)(pixels.to(self.device))
        return scores, points, dict(zip(MAPS, maps))

    def features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The maps the head reads of (B, 3, H, W) float RGB 0-255 tiles, H and W multiples of 32."""
        return self._network(pixels)[2]

    def fingerprint(self) -> str:
        """SHA-256 of the weights and config: whether a saved run used this outline head."""
        digest = hashlib.sha256(self.config.to_json().encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().numpy().tobytes())
        return digest.hexdigest()

    def sharing(self, detector: Detector) -> Detector:
        """``detector``, or when it is the head's own detector (same architecture and weights) a ``Detector`` on
        the same network whose forward pass also keeps the head's maps, which ``outline_tiles`` then reads
        instead of running the network again: detection and outlines from one pass."""
        same = _reads_maps_of(self.model, detector)
        return Detector(detector.model, detector.device, backend=_SharedPass(self)) if same else detector

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike = "default-outlines", device: str = "cpu",
                        runtime: str = "torch") -> "Outliner":
        """Load an outline head: a shipped name (``denuc.hub``) or a file written by ``save_outline_head``."""
        return cls(_load_head(path_or_name), device, runtime)

    @classmethod
    def for_detector(cls, detector: Detector, device: str = "cpu", runtime: str = "torch") -> tuple["Outliner", str]:
        """The shipped outline head that reads ``detector``'s own maps (``precise-outlines`` behind `precise`), so
        that one pass gives points and outlines, else ``default-outlines``; and its tag."""
        heads = {model.tag: _load_head(model.tag) for model in hub.MODELS if model.kind == "outline"}
        tag = next((tag for tag, head in heads.items() if _reads_maps_of(head, detector)),
                   hub.shipped("default-outlines").tag)
        return cls(heads[tag], device, runtime), tag

    @torch.inference_mode()
    def radii(self, work: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """Radii (n, rays) in working pixels of points ``xy`` (n, 2) of an RGB uint8 image ``work`` already at the
        working pixel size. Tiles of TILE pixels, each run with a margin of MARGIN pixels."""
        out = np.zeros((len(xy), self.config.rays), dtype=np.float32)
        if not len(xy):
            return out
        h, w = work.shape[:2]
        # each point belongs to the tile its pixel lies in (points just past the image: the nearest tile)
        tile_x = np.clip(np.floor((xy[:, 0] + 0.5) / TILE), 0, (w - 1) // TILE).astype(int)
        tile_y = np.clip(np.floor((xy[:, 1] + 0.5) / TILE), 0, (h - 1) // TILE).astype(int)
        for ty, tx in sorted(set(zip(tile_y.tolist(), tile_x.tolist()))):
            own = (tile_x == tx) & (tile_y == ty)
            # regions start on multiples of 32 (TILE and MARGIN are), so the network's grid is the same in every tile
            rx0, ry0 = max(0, tx * TILE - MARGIN), max(0, ty * TILE - MARGIN)
            rx1, ry1 = min(w, (tx + 1) * TILE + MARGIN), min(h, (ty + 1) * TILE + MARGIN)
            region = pad_to_multiple(work[ry0:ry1, rx0:rx1], 32)
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
    def outline_tiles(self, tiles: np.ndarray, found: list[Nuclei], mpp: float | None = None,
                      wanted: list[np.ndarray] | None = None) -> list[tuple[Nuclei, dict[str, np.ndarray]]]:
        """Per tile of a batch (B, H, W, 3) uint8 of pixel size ``mpp`` (default: the head's working pixel size;
        any H, W), its ``found`` nuclei (tile pixels) with outlines (trimmed where they would overlap)
        and their measurements (``denuc.outlines.measure``). The network runs once over the batch, or not at all
        when the detector that found the nuclei ran it on these very tiles (``sharing``). Tiles at another pixel
        size (a detector working at a finer resolution) are resampled to the head's; outlines stay in tile pixels.
        A nucleus is measured on its tile's pixels: one reaching past the tile (possible only for one wider than
        the tile overlap, 16 um by default, at a tile's edge) is measured on its part inside.

        ``wanted``: per tile, a boolean mask of the nuclei to outline and measure (default: all); only those are
        returned. The others' points still trim their outlines, which need only their neighbours' points: a slide's
        tile keeps only the nuclei it owns, and those of its overlap that a neighbour owns need no outline here.
        Measured without the others' outlines, a nucleus gains the few pixels where its own outline crosses the
        bisector with such a neighbour by a fraction of a pixel (``trim_to_neighbours``)."""
        mpp = self.config.mpp if mpp is None else mpp
        wanted = [np.ones(len(nuclei), dtype=bool) for nuclei in found] if wanted is None else wanted
        factor = scale_to(mpp, self.config.mpp)
        last, self._last = self._last, None
        if last is not None and last[0] is tiles and factor == 1.0:
            maps, fxy = last[1], np.ones(2)
        else:
            work, fxy = resample_tiles(tiles, factor, 32)
            maps = self.features(torch.from_numpy(work).to(self.device).permute(0, 3, 1, 2).float())
        points = [torch.from_numpy((nuclei.xy[keep] + 0.5) * fxy - 0.5).float().to(self.device)
                  for nuclei, keep in zip(found, wanted)]
        radii = self.model.read(maps, points).cpu().numpy().astype(np.float64) / np.sqrt(fxy.prod())
        out = []
        for tile, nuclei, keep, own_radii in zip(tiles, found, wanted,
                                                 np.split(radii, np.cumsum([len(p) for p in points])[:-1])):
            every = np.zeros((len(nuclei), self.config.rays))  # the others' radii: unused, their points trim
            every[keep] = own_radii
            kept = nuclei.subset(keep)
            outlined = replace(kept, outlines=polygons(kept.xy, trim_to_neighbours(nuclei.xy, every)[keep]))
            out.append((outlined, measure(outlined, tile, mpp)))
        return out


def _load_head(path_or_name: str | os.PathLike) -> OutlineHead:
    """An outline head from a shipped name (``denuc.hub``) or a file written by ``save_outline_head``."""
    path = hub.resolve(path_or_name, kind="outline")
    metadata = hub.read_metadata(path)
    if hub.kind_of(metadata, path) != "outline":
        raise InputError(path, "not a denuc outline head")
    try:
        model = OutlineHead(OutlineConfig.from_json(metadata["config"]),
                            DetectorConfig.from_json(metadata["denuc_detector"]))
        model.load_state_dict(load_file(str(path)))
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise InputError(path, f"not an outline head of this denuc version, or damaged: {error}") from None
    return model


def _reads_maps_of(head: OutlineHead, detector: Detector) -> bool:
    """Whether ``detector`` is ``head``'s own detector: the same pixel size, architecture and weights."""
    ours, theirs = head.detector.state_dict(), detector.model.state_dict()
    return (head.config.mpp == detector.config.mpp and ours.keys() == theirs.keys()
            and all(torch.equal(tensor, theirs[name].to(tensor.device)) for name, tensor in ours.items()))


class _SharedPass:
    """A detector backend (``denuc.inference.detect.Backend``) running an ``Outliner``'s network: it returns the
    detector's probabilities and points, and leaves the maps the outline head reads of these tiles with the outliner."""

    def __init__(self, outliner: Outliner) -> None:
        self.outliner = outliner
        self.runtime = outliner.runtime

    def __call__(self, tiles: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.as_tensor(tiles).permute(0, 3, 1, 2).float()
        scores, points, maps = self.outliner._network(pixels)
        self.outliner._last = (tiles, maps)
        return scores, points
