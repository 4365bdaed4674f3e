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


def test_degenerate_polygon_is_read_with_a_warning(tmp_path: Path) -> None:
    import json

    import pytest

    from denuc.io import read_points

    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 0]]]},
                 "properties": {}},
                {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[10, 10], [12, 12], [10, 10]]]},
                 "properties": {}}]
    path = tmp_path / "outlines.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with pytest.warns(UserWarning, match=r"1 polygon\(s\) with fewer than 3 distinct vertices.*features 1"):
        nuclei = read_points(path)
    assert len(nuclei) == 2
    assert np.allclose(nuclei.xy[1] + 0.5, [32 / 3, 32 / 3])  # the mean of its three vertices (QuPath offset)


def test_evaluate_reads_a_predict_folder_quietly_and_refuses_points_outside_the_image(tmp_path: Path,
                                                                                       capsys) -> None:
    from denuc.cli import main
    from denuc.io import write_points

    truth = tmp_path / "truth"
    pred = tmp_path / "pred"
    truth.mkdir()
    pred.mkdir()
    gt = Nuclei(np.array([[10.0, 10.0], [50.0, 20.0]]), mpp=0.5)
    write_points(truth / "img.csv", gt)
    write_points(pred / "img.csv", gt)
    write_points(pred / "img.geojson", gt)
    (pred / "img_summary.json").write_text("{}")
    assert main(["evaluate", "--pred", str(pred), "--gt", str(truth), "--mpp", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "without ground truth" not in err  # the summary is not taken for a point file
    assert "both a CSV and a GeoJSON" in err and "the CSV was read" in err

    # a dataset knows its image sizes: a prediction outside the image is refused, not scored
    from conftest import write_points_folder

    image = np.full((40, 60, 3), 200, np.uint8)
    root = write_points_folder(tmp_path / "ds", {split: [(name, image, gt.subset(np.array([True, False])))]
                                                  for split, name in (("train", "a"), ("val", "b"), ("test", "img"))})
    outside = tmp_path / "outside"
    outside.mkdir()
    write_points(outside / "img.csv", Nuclei(np.array([[10.0, 10.0], [-7.0, 5.0]]), mpp=0.5))
    code = main(["evaluate", "--pred", str(outside), "--gt-dataset", "points", "--dataset-root", str(root)])
    err = capsys.readouterr().err
    assert code != 0 and "outside the 60x40 image" in err and "Traceback" not in err
