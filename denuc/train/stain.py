"""Colour augmentations for training: stain jitter, and re-staining to templates drawn from the training images.

Both take and return float32 RGB in 0-255. ``color_jitter`` perturbs each stain's optical density (HED) and the
brightness and contrast, and optionally the stains' colours themselves (their optical density vectors: by
Macenko's estimate, CMU-1-Small-Region's haematoxylin vector is 17 degrees from BRCAM2C's, and BRCAM2C's and
CRCHisto's differ by 12); ``StainTemplates`` is RandStainNA (Shen et al., MICCAI 2022) in CIELAB: each crop's
tissue colour statistics are moved (Reinhard's transfer) to a virtual template sampled from a normal
distribution fitted to the training images' own statistics, so the network sees every plausible lab's colours
between and around those of its datasets, not only small perturbations of each image's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Ruifrok & Johnston's H&E-DAB stain vectors, as in scikit-image's rgb2hed: stain jitter perturbs each
# stain's optical density, which mimics scanner and staining variation better than RGB jitter alone.
_HED_FROM_RGB = np.linalg.inv(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]))
_RGB_FROM_HED = np.linalg.inv(_HED_FROM_RGB)

# sRGB (D65) <-> CIE XYZ <-> CIELAB, the same constants as scikit-image's rgb2lab / lab2rgb.
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]], np.float32)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB).astype(np.float32)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883], np.float32)
TISSUE_MAX_L = 90.0  # CIELAB lightness above this is glass / background, not stain
# RandStainNA's recommended setting: the fitted distribution's standard deviation scaled by 1 + (-0.3).
TEMPLATE_SPREAD = 0.7


def color_jitter(crop: np.ndarray, strength: float, rng: np.random.Generator, vector_jitter: float = 0.0
                 ) -> np.ndarray:
    """Stain (HED optical density) scale/shift, then brightness and contrast; float32 RGB 0-255 in and out.

    ``vector_jitter`` > 0 also re-colours the stains: the haematoxylin and eosin optical density vectors the
    crop is rebuilt with get normal noise of this standard deviation per component (then their length again;
    0.1 turns them by 6-7 degrees on average, 10-12 at the 90th percentile): a linear change of optical density
    that keeps glass white.
    """
    od = -np.log(np.clip(crop, 1.0, 255.0) / 255.0)
    hed = od @ _HED_FROM_RGB
    hed = hed * rng.uniform(1 - strength, 1 + strength, 3) + rng.uniform(-strength, strength, 3) * 0.05
    rgb_from_hed = _RGB_FROM_HED
    if vector_jitter > 0:  # drawn only when asked for: recipes without it keep their random stream
        rgb_from_hed = _RGB_FROM_HED.copy()
        for stain in (0, 1):  # haematoxylin, eosin; DAB (absent from H&E) stays
            vector = np.abs(rgb_from_hed[stain] + rng.normal(0, vector_jitter, 3))
            rgb_from_hed[stain] = vector / np.linalg.norm(vector) * np.linalg.norm(_RGB_FROM_HED[stain])
    rgb = 255.0 * np.exp(-np.clip(hed @ rgb_from_hed, 0, None))
    rgb = rgb * rng.uniform(1 - strength, 1 + strength) + rng.uniform(-strength, strength) * 64
    mean = rgb.mean()
    rgb = (rgb - mean) * rng.uniform(1 - strength, 1 + strength) + mean
    return np.clip(rgb, 0, 255).astype(np.float32)


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


def restain(rgb: np.ndarray, target_mean: np.ndarray, target_std: np.ndarray) -> np.ndarray:
    """Reinhard's colour transfer: ``rgb``'s tissue CIELAB mean and spread moved to the target's (float RGB)."""
    lab = rgb_to_lab(rgb)
    own = tissue_statistics(lab)
    if own is None:
        return np.asarray(rgb, np.float32)
    return lab_to_rgb((lab - own[0]) / own[1] * target_std + target_mean).astype(np.float32)


@dataclass
class StainTemplates:
    """A normal distribution over images' tissue CIELAB statistics (3 means, 3 standard deviations), fitted
    to the training images; ``sample`` draws one virtual template from it."""

    centre: np.ndarray  # (2, 3): mean over images of [channel means, channel stds]
    spread: np.ndarray  # (2, 3): standard deviation over images of the same

    @classmethod
    def fit(cls, images: list[np.ndarray]) -> "StainTemplates":
        stats = [s for s in (tissue_statistics(rgb_to_lab(image)) for image in images) if s is not None]
        if len(stats) < 2:
            raise ValueError(f"RandStainNA needs at least two images with tissue, got {len(stats)}")
        stats = np.array([np.stack(s) for s in stats])  # (n, 2, 3)
        return cls(stats.mean(0), stats.std(0))

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        mean, std = rng.normal(self.centre, self.spread * TEMPLATE_SPREAD)
        return mean, np.maximum(std, 0.25 * self.centre[1])  # a draw far in the tail must not flatten the image

    def apply(self, crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``crop`` re-stained to a freshly sampled template (float32 RGB 0-255 in and out)."""
        return restain(crop, *self.sample(rng))

    def to_dict(self) -> dict:
        return {"centre": self.centre.tolist(), "spread": self.spread.tolist(), "template_spread": TEMPLATE_SPREAD}
