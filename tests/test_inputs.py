"""Small user-facing behaviours of the core objects: EXIF orientation on reading, a readable Nuclei repr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from denuc.io.images import ORIENTATION_TAG, read_image
from denuc.nuclei import Nuclei, NucleusClass


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # a 2 x 3 image whose top-left pixel is red, stored with "rotate 90 CW to display" (orientation 6)
    pixels = np.full((2, 3, 3), 200, dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=100, subsampling=0)
    upright = read_image(path)
    assert upright.shape == (3, 2, 3)  # displayed: 3 rows, 2 columns
    # rotating 90 degrees clockwise moves the stored top-left pixel to the top-right
    assert upright[0, 1, 0] > 200 and upright[0, 1, 1] < 60
    assert upright[0, 0, 1] > 150


def test_image_without_orientation_is_unchanged(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    assert np.array_equal(read_image(tmp_path / "plain.png"), pixels)


def test_nuclei_repr_is_a_summary() -> None:
    many = Nuclei(np.zeros((100_000, 2)), labels=["a"] * 99_999 + ["b"], scores=np.linspace(0.3, 0.9, 100_000),
                  classes=[NucleusClass("a"), NucleusClass("b")], mpp=0.5)
    text = repr(many)
    assert text.startswith("Nuclei(100000 nuclei") and "a: 99999" in text and "b: 1" in text
    assert "0.30-0.90" in text and len(text) < 200
