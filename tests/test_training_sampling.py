"""Joint training on datasets of different sizes and pixel sizes: small images are padded, not enlarged;
datasets can be drawn equally; one score threshold that holds for every dataset."""

from __future__ import annotations

import numpy as np
import pytest

from denuc.config import DetectorTrainConfig
from denuc.nuclei import Nuclei
from denuc.train.augment import random_crop, visible_centres
from denuc.train.data import SplitImage
from denuc.train.detector import holds_for_every_dataset, sampling_weights


def image(dataset: str, side: int, xy: list[tuple[float, float]] = ()) -> SplitImage:
    return SplitImage(dataset, f"{dataset}_{side}", np.full((side, side, 3), 128, np.uint8),
                      Nuclei(np.array(xy, dtype=float).reshape(-1, 2), mpp=0.5), 0.5)


def test_small_image_is_padded_with_white_not_enlarged() -> None:
    # a 128 px image (a 256 px 40x crop at 0.5 um/px) in a 256 px crop, no scale jitter and no colour change
    cfg = DetectorTrainConfig(scale_jitter=0.0, color_jitter=0.0)
    item = image("consep", 128, [(10.0, 20.0), (100.0, 64.0)])
    for seed in range(8):
        crop, xy = random_crop(item, 256, cfg, np.random.default_rng(seed))
        assert crop.shape == (256, 256, 3)
        # the image keeps its size: a quarter of the crop is tissue grey, the rest white glass
        assert np.isclose((crop == 128).all(axis=2).mean(), 0.25)
        assert np.isclose((crop == 255).all(axis=2).mean(), 0.75)
        assert len(xy) == 2
        # the two points keep their distance (no enlargement)
        assert np.isclose(np.linalg.norm(xy[0] - xy[1]), np.hypot(90, 44))


def test_dataset_sampling_weighs_datasets_equally_and_images_by_area() -> None:
    train = [image("brcam2c", 500)] + [image("consep", 128) for _ in range(20)]
    assert sampling_weights(train, "image") is None
    weights = sampling_weights(train, "dataset")
    assert np.isclose(weights.sum(), 1.0)
    assert np.isclose(weights[0], 0.5) and np.allclose(weights[1:], 0.5 / 20)
    mixed = [image("a", 100), image("a", 200)]
    assert np.allclose(sampling_weights(mixed, "dataset"), [0.2, 0.8])


def test_unknown_sampling_is_refused() -> None:
    with pytest.raises(ValueError, match="sampling"):
        DetectorTrainConfig(sampling="pixels")


def test_threshold_rule_prefers_a_setting_within_a_point_of_every_best() -> None:
    rows = [{"score_threshold": 0.5, "nms_radius_um": 2.0, "a": 0.90, "b": 0.60, "mean": 0.75},
            {"score_threshold": 0.3, "nms_radius_um": 2.0, "a": 0.86, "b": 0.66, "mean": 0.76},
            {"score_threshold": 0.2, "nms_radius_um": 2.0, "a": 0.895, "b": 0.655, "mean": 0.775}]
    assert [holds_for_every_dataset(r, rows, 0.01) for r in rows] == [False, False, True]
    assert not holds_for_every_dataset(rows[1], rows, 0.01)  # a is 4 points below its best


def test_crop_with_a_focus_always_contains_that_point() -> None:
    cfg = DetectorTrainConfig(color_jitter=0.0)
    item = image("brcam2c", 900, [(3.0, 890.0), (450.0, 450.0), (899.0, 0.0)])
    for focus in item.nuclei.xy:
        for seed in range(20):
            _, xy = random_crop(item, 256, cfg, np.random.default_rng(seed), focus=focus)
            assert len(xy) == 1  # the focus point is in every crop; the others, 600+ px away, never are


def test_crowded_crops_must_be_a_probability() -> None:
    with pytest.raises(ValueError, match="crowded_crops"):
        DetectorTrainConfig(crowded_crops=1.5)


def test_visible_centre_of_a_cut_disc() -> None:
    left_cut = (-0.5, -np.inf, np.inf, np.inf)
    xy = np.array([[20.0, 50.0], [-0.5, 50.0], [-3.5, 50.0]])
    centres, kept = visible_centres(xy, left_cut, 5.0)
    assert np.allclose(centres[0], [20.0, 50.0])  # clear of the cut: its own centre
    # cut through its centre: the half disc's centroid, 4r / (3 pi) inside the cut
    assert np.allclose(centres[1], [-0.5 + 20 / (3 * np.pi), 50.0], atol=0.05) and kept[1]
    assert not kept[2]  # 3 of its 5 px radius beyond the cut: under a fifth of it inside


@pytest.mark.parametrize("seed", range(12))
def test_cut_nucleus_is_labelled_inside_the_crop(seed: int) -> None:
    # a 260 px image, 256 px crops without scale jitter: the crop starts at x0 in 0..4, so its right side cuts at
    # x0 + 255.5 (x0 = 4: the image's own border, no cut). The nucleus at x = 257, a 5 px disc, is 1.5 px past the
    # cut for x0 = 0 (about 30% inside), 0.5 px past for x0 = 1, 0.5 and 1.5 px inside for x0 = 2 and 3.
    off = DetectorTrainConfig(scale_jitter=0.0, color_jitter=0.0)
    on = DetectorTrainConfig(scale_jitter=0.0, color_jitter=0.0, cut_nucleus_radius_um=2.5)  # 5 px at 0.5 um/px
    item = image("brcam2c", 260, [(257.0, 130.0)])
    draws = np.random.default_rng(seed)
    draws.uniform(1, 1), draws.integers(0, 5)
    x0 = draws.integers(0, 5)  # random_crop's draws: scale, y0, x0

    def to_edge(xy: np.ndarray) -> float:  # distance to the crop's nearest side, whatever the flips and turns
        return float(min(xy[0, 0] + 0.5, xy[0, 1] + 0.5, 255.5 - xy[0, 0], 255.5 - xy[0, 1]))

    _, plain = random_crop(item, 256, off, np.random.default_rng(seed))
    _, cut = random_crop(item, 256, on, np.random.default_rng(seed))
    assert len(plain) == (x0 >= 2) and len(cut) == 1
    assert 0 < to_edge(cut) < 3.5  # at the visible part's centre, by the side
    if x0 in (2, 3):  # the whole centre was inside: moved inwards, to the centre of the part inside
        assert to_edge(cut) > to_edge(plain) + 0.5
    if x0 == 4:  # no cut: unchanged
        assert np.allclose(cut, plain)


def test_nucleus_at_the_images_own_border_keeps_its_label() -> None:
    # the crop is the whole image: its sides are the image's own border, where the annotation stands
    on = DetectorTrainConfig(scale_jitter=0.0, color_jitter=0.0, cut_nucleus_radius_um=2.5)
    off = DetectorTrainConfig(scale_jitter=0.0, color_jitter=0.0)
    item = image("consep", 256, [(1.0, 130.0), (254.5, 3.0)])
    for seed in range(6):
        _, with_cut = random_crop(item, 256, on, np.random.default_rng(seed))
        _, without = random_crop(item, 256, off, np.random.default_rng(seed))
        assert np.array_equal(with_cut, without)
