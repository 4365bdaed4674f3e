"""Stain normalisation at inference (denuc.colour.StainNormaliser, `denuc predict --normalise-stain`): the
transfer, the shipped models' training colours, and the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_IMAGE as SAMPLE
from PIL import Image

from denuc import hub
from denuc.cli import main
from denuc.colour import StainNormaliser, images_statistics, rgb_to_lab
from denuc.io.images import read_image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
TARGET = StainNormaliser(np.array([60.0, 28.0, -22.0]), np.array([14.0, 8.0, 9.0]))


def test_an_image_alone_is_moved_to_the_target_and_a_slide_by_one_transfer() -> None:
    image = read_image(SAMPLE)
    moved = TARGET.apply(image)
    assert moved.dtype == np.uint8 and moved.shape == image.shape
    tissue = rgb_to_lab(image)[..., 0] < 90
    lab = rgb_to_lab(moved)[tissue]
    np.testing.assert_allclose(lab.mean(0), TARGET.mean, atol=0.3)  # rounding to uint8, the few clipped pixels
    np.testing.assert_allclose(lab.std(0), TARGET.std, rtol=0.02)
    # a slide: each tile moved from the slide's statistics, not its own, so the tiles put together are the whole
    source = StainNormaliser.statistics(image)
    halves = np.concatenate([TARGET.apply(image[:, :250], source), TARGET.apply(image[:, 250:], source)], 1)
    np.testing.assert_array_equal(halves, TARGET.apply(image, source))
    assert not np.array_equal(TARGET.apply(image[:, :250]), halves[:, :250])  # its own statistics differ
    glass = np.full((16, 16, 3), 250, np.uint8)
    np.testing.assert_array_equal(TARGET.apply(glass), glass)


def test_fit_is_the_centre_of_the_images_statistics_and_travels_as_a_dict() -> None:
    image = read_image(SAMPLE)
    images = [image, TARGET.apply(image)]
    fitted = StainNormaliser.fit(images)
    np.testing.assert_allclose(np.stack([fitted.mean, fitted.std]), images_statistics(images).mean(0), rtol=1e-6)
    again = StainNormaliser.from_dict(fitted.to_dict())
    np.testing.assert_allclose(again.mean, fitted.mean, atol=1e-4)
    np.testing.assert_allclose(again.std, fitted.std, atol=1e-4)
    with pytest.raises(ValueError, match="no image with tissue"):
        StainNormaliser.fit([np.full((16, 16, 3), 250, np.uint8)])


@pytest.mark.skipif(not (SHARED / "brcam2c").is_dir(), reason="needs ../shared/datasets")
def test_the_shipped_training_colours_are_those_of_the_training_images() -> None:
    """benchmarks/training_colours.py's figures, recomputed from the BRCAM2C and CRCHisto train images."""
    import warnings

    from denuc.datasets import get_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # CRCHisto's known unmatched class centres
        images = [read_image(sample.image_path) for name in ("brcam2c", "crchisto")
                  for sample in get_dataset(name, SHARED / name).samples("train")]
    fitted = StainNormaliser.fit(images).to_dict()
    for name in ("default", "fast", "stain-robust", "default-bundle"):
        assert hub.describe(name)["training_colours"] == fitted, name
    assert hub.describe("precise")["training_colours"] is None  # trained on four datasets: not recorded


def test_predict_normalise_stain(tmp_path: Path, capsys) -> None:
    """The summary says from and to which colours; another lab's colours are moved back towards ours; a run with
    it is not taken for a run without; a model without training colours needs a reference image."""
    image = read_image(SAMPLE)
    other = np.asarray(StainNormaliser(np.array([55.0, 35.0, -10.0]), np.array([17.0, 9.0, 7.0])).apply(image))
    slide = tmp_path / "other_lab.png"
    Image.fromarray(other).save(slide)
    out = tmp_path / "out"
    assert main(["predict", str(slide), "--mpp", "0.5", "--out", str(out), "--quiet"]) == 0
    plain = json.loads((out / "other_lab_summary.json").read_text())
    assert plain["stain_normalised"] is None
    assert main(["predict", str(slide), "--mpp", "0.5", "--out", str(out), "--quiet", "--normalise-stain"]) == 2
    assert "other settings" in capsys.readouterr().err  # not the plain run's outputs, and not replaced silently
    assert main(["predict", str(slide), "--mpp", "0.5", "--out", str(out), "--quiet", "--normalise-stain",
                 "--overwrite"]) == 0
    summary = json.loads((out / "other_lab_summary.json").read_text())
    moved = summary["stain_normalised"]
    assert moved["to"] == hub.describe("default-bundle")["training_colours"]
    # the colours of the image's tiles (overlapping ones: some pixels counted twice)
    np.testing.assert_allclose(moved["from"]["mean"], StainNormaliser.statistics(other)[0], atol=1.0)
    assert summary["nuclei"] != plain["nuclei"] or summary["counts"] != plain["counts"]

    reference = tmp_path / "reference.png"
    Image.fromarray(image).save(reference)
    assert main(["predict", str(slide), "--mpp", "0.5", "--out", str(tmp_path / "ref"), "--quiet",
                 "--model", "precise", "--detector-only", "--normalise-stain", str(reference)]) == 0
    moved = json.loads((tmp_path / "ref" / "other_lab_summary.json").read_text())["stain_normalised"]
    np.testing.assert_allclose(moved["to"]["mean"], StainNormaliser.fit([image]).mean, atol=1e-3)
    assert main(["predict", str(slide), "--mpp", "0.5", "--out", str(tmp_path / "no"), "--quiet",
                 "--model", "precise", "--detector-only", "--normalise-stain"]) == 2
    assert "records no training colours" in capsys.readouterr().err
