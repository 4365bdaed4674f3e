"""Colour in CIELAB: conversions, an image's tissue colour statistics, Reinhard's colour transfer, and moving
images to a model's training colours (``StainNormaliser``, ``denuc predict --normalise-stain``).

Reinhard's transfer (Reinhard et al. 2001, as used for H&E since) moves the mean and standard deviation of each
CIELAB channel over an image's tissue pixels (L < 90: not glass) to a target's. Training uses it to re-stain crops
(RandStainNA, ``denuc.train.stain``); inference can use it the other way, to move a slide from another lab to the
colours the model was trained on. Numpy only: the lower layers and the command line use it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# sRGB (D65) <-> CIE XYZ <-> CIELAB, the same constants as scikit-image's rgb2lab / lab2rgb.
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]], np.float32)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB).astype(np.float32)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883], np.float32)
TISSUE_MAX_L = 90.0  # CIELAB lightness above this is glass / background, not stain


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """RGB 0-255 (any shape ending in 3) to CIELAB (L 0-100), D65 white; float32 (half the time of float64,
    within 1e-4 of scikit-image's rgb2lab)."""
    c = np.asarray(rgb, np.float32) / np.float32(255)
    linear = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    t = (linear @ _XYZ_FROM_RGB.T) / _WHITE_D65
    f = np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB to RGB 0-255 float (clipped to the sRGB gamut), the inverse of ``rgb_to_lab``."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, np.maximum(fy - lab[..., 2] / 200, 0)], -1)
    t = np.where(f > 6 / 29, f ** 3, (f - 16 / 116) / 7.787)
    linear = np.clip((t * _WHITE_D65) @ _RGB_FROM_XYZ.T, 0, 1)
    c = np.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear)
    return np.clip(c, 0, 1) * 255.0


def tissue_statistics(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel mean and standard deviation of the tissue pixels (L < 90) of a CIELAB image; None when
    fewer than 1% of its pixels are tissue (a blank crop has no stain to move). Sums in the image's dtype:
    float32 is exact enough for a crop or one image; pass float64 to pool millions of pixels."""
    tissue = lab[lab[..., 0] < TISSUE_MAX_L]
    if len(tissue) < 0.01 * lab[..., 0].size or len(tissue) < 2:
        return None
    return tissue.mean(0), tissue.std(0) + 1e-6


def restain(rgb: np.ndarray, target_mean: np.ndarray, target_std: np.ndarray,
            source: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Reinhard's colour transfer: ``rgb``'s tissue CIELAB mean and spread (``source``, default its own) moved to
    the target's (float RGB); unchanged without tissue to take its own statistics from."""
    lab = rgb_to_lab(rgb)
    source = tissue_statistics(lab) if source is None else source
    if source is None:
        return np.asarray(rgb, np.float32)
    return lab_to_rgb((lab - source[0]) / source[1] * target_std + target_mean).astype(np.float32)


def images_statistics(images: list[np.ndarray]) -> np.ndarray:
    """(n, 2, 3): each RGB image's tissue statistics (CIELAB means, then standard deviations), images without
    tissue left out."""
    stats = [s for s in (tissue_statistics(rgb_to_lab(image)) for image in images) if s is not None]
    return np.array([np.stack(s) for s in stats]).reshape(-1, 2, 3)


@dataclass(frozen=True)
class StainNormaliser:
    """Reinhard's transfer to one target: ``mean`` and ``std`` (3 each) of CIELAB over tissue pixels. A slide is
    moved as a whole, by one transfer from its own statistics (``statistics``) to the target, so that every tile
    of it moves alike; an image alone, from its own."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, images: list[np.ndarray]) -> "StainNormaliser":
        """The centre of ``images``' own statistics (each image weighs the same): a model's training colours."""
        stats = images_statistics(images)
        if not len(stats):
            raise ValueError("no image with tissue to take colours from")
        mean, std = stats.astype(np.float64).mean(0)
        return cls(mean, std)

    @classmethod
    def from_dict(cls, values: dict) -> "StainNormaliser":
        """From ``to_dict``'s form (how ``denuc.hub`` records a model's training colours)."""
        return cls(np.array(values["mean"], np.float64), np.array(values["std"], np.float64))

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": [round(float(v), 4) for v in self.mean], "std": [round(float(v), 4) for v in self.std]}

    @staticmethod
    def statistics(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The tissue statistics of ``rgb`` (an image, or pixels pooled from a slide's tiles), what ``apply``
        moves from; None without tissue."""
        return tissue_statistics(rgb_to_lab(rgb).astype(np.float64))

    def apply(self, rgb: np.ndarray, source: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """``rgb`` (uint8 RGB, any shape ending in 3) moved from ``source`` (default: its own statistics) to the
        target, uint8; unchanged when there is no tissue to take statistics from."""
        source = self.statistics(rgb) if source is None else source
        if source is None:
            return rgb
        # float32 throughout: a slide's tiles are many pixels
        mean, std = (np.asarray(v, np.float32) for v in source)
        return np.rint(restain(rgb, self.mean.astype(np.float32), self.std.astype(np.float32), (mean, std))
                       ).astype(np.uint8)
