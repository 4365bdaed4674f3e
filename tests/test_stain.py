"""Colour augmentations: stain colour jitter, CIELAB conversion, Reinhard re-staining and RandStainNA templates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from denuc.colour import lab_to_rgb, restain, rgb_to_lab
from denuc.config import DetectorTrainConfig
from denuc.io.images import read_image
from denuc.nuclei import Nuclei
from denuc.train.augment import random_crop
from denuc.train.data import SplitImage
from denuc.train.stain import StainTemplates, color_jitter

SAMPLE = Path(__file__).resolve().parents[1] / "denuc" / "data" / "sample_brcam2c.png"


def test_lab_known_values_and_round_trip() -> None:
    # CIE reference values for sRGB primaries and white under D65
    known = {(255, 255, 255): (100.0, 0.0, 0.0), (255, 0, 0): (53.24, 80.09, 67.20),
             (0, 0, 255): (32.30, 79.19, -107.86), (0, 0, 0): (0.0, 0.0, 0.0)}
    for rgb, lab in known.items():
        np.testing.assert_allclose(rgb_to_lab(np.array(rgb, np.uint8)), lab, atol=0.02)
    colours = np.random.default_rng(0).integers(0, 256, (1000, 3))
    np.testing.assert_allclose(lab_to_rgb(rgb_to_lab(colours)), colours, atol=0.02)


def test_restain_moves_tissue_statistics_to_the_target() -> None:
    image = read_image(SAMPLE).astype(np.float32)
    target_mean, target_std = np.array([55.0, 30.0, -25.0]), np.array([15.0, 9.0, 10.0])
    moved = restain(image, target_mean, target_std)
    assert moved.dtype == np.float32 and moved.shape == image.shape
    tissue = rgb_to_lab(image)[..., 0] < 90  # the pixels whose statistics were moved
    lab = rgb_to_lab(moved)[tissue]
    np.testing.assert_allclose(lab.mean(0), target_mean, atol=0.1)  # up to the few pixels clipped to the gamut
    np.testing.assert_allclose(lab.std(0), target_std, rtol=0.01)
    blank = np.full((32, 32, 3), 250.0, np.float32)  # glass only: nothing to move
    assert np.array_equal(restain(blank, target_mean, target_std), blank)


def test_templates_fit_sample_and_apply() -> None:
    image = read_image(SAMPLE)
    templates = StainTemplates.fit([image[:200, :200], image[200:, 200:], image[:200, 200:]])
    assert templates.centre.shape == templates.spread.shape == (2, 3)
    rng = np.random.default_rng(0)
    mean, std = templates.sample(rng)
    assert np.all(std > 0) and np.isfinite(mean).all()
    crop = image[:128, :128].astype(np.float32)
    assert not np.array_equal(templates.apply(crop, rng), crop)
    with pytest.raises(ValueError, match="two images"):
        StainTemplates.fit([np.full((16, 16, 3), 255, np.uint8)] * 3)


def test_randstainna_recolours_crops_and_keeps_their_points() -> None:
    image = read_image(SAMPLE)
    item = SplitImage("sample", "sample", image, Nuclei(xy=[[10.0, 20.0], [100.0, 50.0], [60.0, 90.0]], mpp=0.5), 0.5)
    templates = StainTemplates.fit([image[:200, :200], image[200:, 200:]])
    on = DetectorTrainConfig(color_jitter=0.0, scale_jitter=0.0, randstainna=1.0)
    off = DetectorTrainConfig(color_jitter=0.0, scale_jitter=0.0)
    # the same crop and flips with and without re-staining: only the colours differ
    crop_on, xy_on = random_crop(item, 128, on, np.random.default_rng(3), templates)
    crop_off, xy_off = random_crop(item, 128, off, np.random.default_rng(3))
    np.testing.assert_array_equal(xy_on, xy_off)
    assert crop_on.shape == crop_off.shape and not np.allclose(crop_on, crop_off)
    with pytest.raises(ValueError, match="randstainna"):
        DetectorTrainConfig(randstainna=1.5)


def test_stain_vector_jitter_turns_the_stains_and_keeps_glass_white() -> None:
    image = read_image(SAMPLE)[:128, :128].astype(np.float32)
    # no concentration, brightness or contrast change: what moves is the stains' colour alone
    same = color_jitter(image, 0.0, np.random.default_rng(0))
    np.testing.assert_allclose(same, image, atol=0.05)
    turned = color_jitter(image, 0.0, np.random.default_rng(0), vector_jitter=0.1)
    assert turned.dtype == np.float32 and turned.shape == image.shape
    np.testing.assert_array_equal(turned, color_jitter(image, 0.0, np.random.default_rng(0), vector_jitter=0.1))
    od, od_turned = (-np.log(np.clip(x, 1, 255) / 255).reshape(-1, 3) for x in (image, turned))
    stained = od.sum(1) > 0.5
    cosine = (od[stained] * od_turned[stained]).sum(1) / np.linalg.norm(od[stained], axis=1) / np.linalg.norm(
        od_turned[stained], axis=1)
    angle = np.degrees(np.arccos(np.clip(np.median(cosine), -1, 1)))
    assert 0.5 < angle < 30  # the optical density of stained pixels changes direction (hue), not just length
    glass = np.full((8, 8, 3), 255.0, np.float32)
    np.testing.assert_array_equal(color_jitter(glass, 0.0, np.random.default_rng(1), vector_jitter=0.3), glass)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="stain_vector_jitter"):
            DetectorTrainConfig(stain_vector_jitter=bad)
