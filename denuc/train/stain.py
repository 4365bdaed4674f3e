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

from denuc.colour import images_statistics, restain

# Ruifrok & Johnston's H&E-DAB stain vectors, as in scikit-image's rgb2hed: stain jitter perturbs each
# stain's optical density, which mimics scanner and staining variation better than RGB jitter alone.
_HED_FROM_RGB = np.linalg.inv(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]))
_RGB_FROM_HED = np.linalg.inv(_HED_FROM_RGB)

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


@dataclass
class StainTemplates:
    """A normal distribution over images' tissue CIELAB statistics (3 means, 3 standard deviations), fitted
    to the training images; ``sample`` draws one virtual template from it."""

    centre: np.ndarray  # (2, 3): mean over images of [channel means, channel stds]
    spread: np.ndarray  # (2, 3): standard deviation over images of the same

    @classmethod
    def fit(cls, images: list[np.ndarray]) -> "StainTemplates":
        stats = images_statistics(images)
        if len(stats) < 2:
            raise ValueError(f"RandStainNA needs at least two images with tissue, got {len(stats)}")
        return cls(stats.mean(0), stats.std(0))

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        mean, std = rng.normal(self.centre, self.spread * TEMPLATE_SPREAD)
        return mean, np.maximum(std, 0.25 * self.centre[1])  # a draw far in the tail must not flatten the image

    def apply(self, crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``crop`` re-stained to a freshly sampled template (float32 RGB 0-255 in and out)."""
        return restain(crop, *self.sample(rng))

    def to_dict(self) -> dict:
        return {"centre": self.centre.tolist(), "spread": self.spread.tolist(), "template_spread": TEMPLATE_SPREAD}
