"""Training crops: where a crop is taken, its flips and quarter turns, and its colours (``denuc.train.stain``).

The detector's crops (``random_crop``) are scale-jittered and keep every nucleus centre; the classifier's
(``labelled_crop``) keep each point's class. Both draw from the run's numpy generator only, in a fixed order,
so a resumed run draws the same crops.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from denuc.config import ClassifierTrainConfig, DetectorTrainConfig
from denuc.errors import InputError
from denuc.io.atomic import write_json
from denuc.io.images import resample
from denuc.train.data import SplitImage
from denuc.train.stain import StainTemplates, color_jitter

if TYPE_CHECKING:
    from denuc.train.points import PointImage


def recolour(crop: np.ndarray, cfg: DetectorTrainConfig | ClassifierTrainConfig, rng: np.random.Generator,
             templates: StainTemplates | None = None) -> np.ndarray:
    """A training crop's colour augmentation as a training config sets it: re-stained to a random template with
    probability ``cfg.randstainna`` (RandStainNA; only with ``templates``), then ``color_jitter`` with strength
    ``cfg.color_jitter`` and stain colour noise ``cfg.stain_vector_jitter`` (both 0: not at all)."""
    if templates is not None and rng.random() < cfg.randstainna:
        crop = templates.apply(crop, rng)
    if cfg.color_jitter > 0 or cfg.stain_vector_jitter > 0:
        crop = color_jitter(crop, cfg.color_jitter, rng, cfg.stain_vector_jitter)
    return crop


def flip_rotate(crop: np.ndarray, xy: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A square crop and its points, flipped left-right with probability 1/2, then turned by 0-3 quarter
    turns (counter-clockwise)."""
    size = crop.shape[0]
    if rng.random() < 0.5:
        crop, xy = crop[:, ::-1], np.stack([size - 1 - xy[:, 0], xy[:, 1]], 1)
    for _ in range(rng.integers(0, 4)):
        crop, xy = np.rot90(crop), np.stack([xy[:, 1], size - 1 - xy[:, 0]], 1)
    return crop, xy


# A unit disc as 256 points of equal area (Vogel's sunflower spiral): the part of a cut nucleus inside a crop is the
# share of its points inside, and the centre of that part is their mean.
_DISC = np.stack([np.sqrt((np.arange(256) + 0.5) / 256) * np.cos(np.arange(256) * np.pi * (3 - np.sqrt(5))),
                  np.sqrt((np.arange(256) + 0.5) / 256) * np.sin(np.arange(256) * np.pi * (3 - np.sqrt(5)))], 1)
MIN_VISIBLE = 0.2  # less of a nucleus than this inside a crop: no nucleus to point at


def visible_centres(xy: np.ndarray, window: tuple[float, float, float, float], radius: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei as discs of ``radius`` about ``xy``, clipped to ``window`` (x_lo, y_lo, x_hi, y_hi; an infinite side
    cuts nothing): the centre of each one's part inside, and whether at least ``MIN_VISIBLE`` of it is inside.
    A nucleus clear of every side keeps its centre."""
    x_lo, y_lo, x_hi, y_hi = window
    xy, keep = xy.astype(np.float64).copy(), np.ones(len(xy), dtype=bool)
    near = ((xy[:, 0] - x_lo < radius) | (x_hi - xy[:, 0] < radius)
            | (xy[:, 1] - y_lo < radius) | (y_hi - xy[:, 1] < radius))
    if near.any():
        disc = xy[near, None, :] + radius * _DISC  # (n, 256, 2)
        inside = ((disc[..., 0] >= x_lo) & (disc[..., 0] <= x_hi) & (disc[..., 1] >= y_lo) & (disc[..., 1] <= y_hi))
        share = inside.mean(1)
        keep[near] = share >= MIN_VISIBLE
        xy[near] = (disc * inside[..., None]).sum(1) / np.maximum(inside.sum(1), 1)[:, None]
    return xy, keep


def random_crop(item: SplitImage, size: int, cfg: DetectorTrainConfig, rng: np.random.Generator,
                templates: StainTemplates | None = None, focus: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """A random ``size`` x ``size`` crop, scale-jittered, flipped, rotated and colour-jittered, with its points;
    re-stained first with probability ``cfg.randstainna`` to a template drawn from ``templates``. With ``focus``
    (an x, y of the image) the crop is drawn among those that contain that point."""
    scale = rng.uniform(1 - cfg.scale_jitter, 1 + cfg.scale_jitter)
    image = item.image
    h, w = image.shape[:2]
    image_h, image_w = h, w  # before any padding: the tissue's extent
    src = int(round(size / scale))
    if h < src or w < src:
        # an image smaller than the crop (a 40x crop seen at 0.5 um/px) is padded with white glass, never
        # enlarged: enlarging would teach nuclei twice their size
        image = np.pad(image, ((0, max(src - h, 0)), (0, max(src - w, 0)), (0, 0)), constant_values=255)
        h, w = image.shape[:2]
    (y_lo, y_hi), (x_lo, x_hi) = (0, h - src), (0, w - src)
    if focus is not None:
        x, y = np.clip(np.rint(focus).astype(int), 0, (w - 1, h - 1))
        (x_lo, x_hi), (y_lo, y_hi) = (max(0, x - src + 1), min(x_hi, x)), (max(0, y - src + 1), min(y_hi, y))
    y0, x0 = rng.integers(y_lo, y_hi + 1), rng.integers(x_lo, x_hi + 1)
    crop = image[y0:y0 + src, x0:x0 + src]
    f = size / src
    crop = resample(crop, f) if src != size else crop
    xy = item.nuclei.xy
    if cfg.cut_nucleus_radius_um > 0:
        # only the crop's sides inside the image cut nuclei; at the image's own border the annotation stands
        window = (x0 - 0.5 if x0 > 0 else -np.inf, y0 - 0.5 if y0 > 0 else -np.inf,
                  x0 + src - 0.5 if x0 + src < image_w else np.inf, y0 + src - 0.5 if y0 + src < image_h else np.inf)
        xy, visible = visible_centres(xy, window, cfg.cut_nucleus_radius_um / item.nuclei.mpp)
        xy = xy[visible]
    xy = (xy - (x0, y0) + 0.5) * f - 0.5
    xy = xy[(xy[:, 0] >= -0.5) & (xy[:, 0] <= size - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] <= size - 0.5)]
    crop, xy = flip_rotate(crop.astype(np.float32), xy, rng)
    crop = recolour(crop, cfg, rng, templates)
    return np.ascontiguousarray(crop), xy.reshape(-1, 2)


def labelled_crop(item: PointImage, size: int, cfg: ClassifierTrainConfig, rng: np.random.Generator,
                  templates: StainTemplates | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random ``size`` crop (white-padded if the image is smaller), flipped, rotated and colour-augmented as
    ``cfg`` says (``recolour``; re-stained with probability ``cfg.randstainna`` to a template drawn from
    ``templates``), with its points and their targets. Unlike the detector's crop it keeps each point's label."""
    h, w = item.image.shape[:2]
    y0, x0 = rng.integers(0, max(h - size, 0) + 1), rng.integers(0, max(w - size, 0) + 1)
    crop = np.full((size, size, 3), 255, dtype=np.float32)
    part = item.image[y0:y0 + size, x0:x0 + size]
    crop[:part.shape[0], :part.shape[1]] = part
    xy = item.xy - (x0, y0)
    inside = ((xy[:, 0] >= -0.5) & (xy[:, 0] <= part.shape[1] - 0.5)
              & (xy[:, 1] >= -0.5) & (xy[:, 1] <= part.shape[0] - 0.5))
    crop, xy = flip_rotate(crop, xy[inside], rng)
    crop = recolour(crop, cfg, rng, templates)
    return np.ascontiguousarray(crop), xy.reshape(-1, 2), item.targets[inside]


def stain_templates(run_dir: Path, images: list[np.ndarray], probability: float) -> StainTemplates | None:
    """RandStainNA's templates, fitted to the run's train images (every dataset; the same again on resume) and
    written to ``stain_templates.json``; None when the run does not re-stain (``probability`` 0)."""
    if probability <= 0:
        return None
    try:
        templates = StainTemplates.fit(images)
    except ValueError as error:
        raise InputError("--randstainna", str(error)) from None
    write_json(run_dir / "stain_templates.json", templates.to_dict())
    return templates
