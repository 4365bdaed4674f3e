"""`denuc classify`: a bundle's classifier at nuclei another tool found, on the bundled sample image.

One row per given nucleus, in its file's order, with a class of the bundle's taxonomy and the nucleus' own outline
in the GeoJSON; at the points ``denuc predict`` found itself, exactly predict's classes; bad input named, no
traceback, an earlier run's outputs kept unless --overwrite.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_IMAGE, SAMPLE_MPP, SAMPLE_POINTS
from PIL import Image

from denuc.cli import main
from denuc.inference.detect import Detector
from denuc.inference.given_nuclei import classify_given_nuclei
from denuc.inference.pipeline import Pipeline
from denuc.inference.slide import predict_slide
from denuc.io import read_points
from denuc.io.foreign import read_nuclei
from denuc.io.images import resample
from denuc.io.slides import open_slide, write_pyramidal_tiff

DATA = Path(__file__).parent / "data" / "foreign"
HOVERNET, TYPE_INFO = DATA / "hovernet_tile.json", DATA / "hovernet_type_info.json"

torch.set_num_threads(1)  # the suite shares two cores; more threads only contend


def classify(*argv) -> list[str]:
    return ["classify", str(SAMPLE_IMAGE), "--mpp", str(SAMPLE_MPP), "--runtime", "torch", "--quiet", *map(str, argv)]


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def model() -> Pipeline:
    return Pipeline.from_pretrained("default-bundle", runtime="torch")


def test_classify_hovernet_nuclei_from_the_command_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "denuc.cli",
               *classify("--nuclei", HOVERNET, "--type-info", TYPE_INFO, "--out", tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    given = read_nuclei(HOVERNET, type_info=TYPE_INFO)
    table = rows(tmp_path / "sample_brcam2c.csv")
    summary = json.loads((tmp_path / "sample_brcam2c_summary.json").read_text())
    taxonomy = [c["name"] for c in summary["model"]["classes"]]
    assert len(table) == len(given) == summary["nuclei_given"] == summary["nuclei"]
    np.testing.assert_array_equal([[float(r["x"]), float(r["y"])] for r in table], given.xy)  # in the file's order
    assert {r["label"] for r in table} <= set(taxonomy) and taxonomy
    assert sum(summary["counts"].values()) == len(given)
    # their outlines, as closed polygons in QuPath's frame; read back, each polygon's centroid is the nucleus
    features = json.loads((tmp_path / "sample_brcam2c.geojson").read_text())["features"]
    ring = np.array(features[0]["geometry"]["coordinates"][0])
    np.testing.assert_array_equal(ring[:-1], given.outlines[0] + 0.5)
    np.testing.assert_array_equal(ring[-1], ring[0])
    np.testing.assert_allclose(read_points(tmp_path / "sample_brcam2c.geojson").xy, given.xy)

    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 2
    assert f"denuc classify: error: {tmp_path / 'sample_brcam2c.csv'}: exists: pass --overwrite" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.parametrize("pyramid", [False, True], ids=["image", "pyramid"])
def test_at_predicts_own_points_classify_gives_predicts_classes(tmp_path: Path, model: Pipeline,
                                                                 pyramid: bool) -> None:
    """The same tiles, the same classes. The pyramid, the sample upsampled 3x (1/6 um/px), is read from its
    level 1 and resampled: level-0 coordinates are then not the model's working pixels."""
    path, mpp = SAMPLE_IMAGE, SAMPLE_MPP
    if pyramid:
        sample = Image.open(SAMPLE_IMAGE).convert("RGB")
        path, mpp = tmp_path / "sample.tif", SAMPLE_MPP / 3
        write_pyramidal_tiff(path, np.asarray(sample.resize((3 * sample.width, 3 * sample.height))), mpp=mpp)
    with open_slide(path, mpp=mpp) as slide:
        predict_slide(slide, model, tmp_path, progress=False)
        found = read_points(tmp_path / f"{path.stem}.csv")
        named, rejected = classify_given_nuclei(slide, model, found)
    assert len(found) and not rejected.any()  # predict kept only what the classifier calls a nucleus
    assert named.labels.tolist() == found.labels.tolist()
    np.testing.assert_allclose(named.probs, found.probs, rtol=0, atol=1e-12)


def test_a_finer_detector_before_the_bundles_classifier(tmp_path: Path, model: Pipeline) -> None:
    """``with_detector``: precise (0.33 um/px) finds the nuclei, tiles enlarged so that, resampled to the
    classifier's 0.5 um/px, they are the bundle's own 384 px; the classifier sees each tile at its own pixel size
    (the same probabilities as the classifier run on the tile resampled by hand), and classify at the composed
    pipeline's points gives its classes, as for the bundle's own detector."""
    composed = Pipeline.from_pretrained("default-bundle", runtime="torch").with_detector(
        Detector.from_pretrained("precise", runtime="torch"))
    assert composed.mpp == 0.33 and composed.classes == model.classes
    assert composed.detector.config.tile_size * 0.33 >= model.detector.config.tile_size * 0.5
    tile = np.ascontiguousarray(np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))[:384, :384])
    points = np.array([[100.0, 120.0], [300.5, 40.25]])
    ((probs, _),) = composed.classify_tiles(tile[None], [points])
    by_hand = np.full((256, 256, 3), 255, dtype=np.uint8)
    by_hand[:253, :253] = resample(tile, 0.33 / 0.5)
    ((expected, _),) = model.classifier.classify_tiles(by_hand[None], [(points + 0.5) * 253 / 384 - 0.5])
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)
    with open_slide(SAMPLE_IMAGE, mpp=SAMPLE_MPP) as slide:
        predict_slide(slide, composed, tmp_path, progress=False)
        found = read_points(tmp_path / f"{SAMPLE_IMAGE.stem}.csv")
        named, rejected = classify_given_nuclei(slide, composed, found)
    assert len(found) > 300 and not rejected.any()
    assert named.labels.tolist() == found.labels.tolist()


def test_keeping_rejected_detections_keeps_every_detected_point(model: Pipeline) -> None:
    """``reject`` off (``predict --keep-rejected``): every point the detector finds, classified; on, the same minus
    those the classifier calls "not a nucleus" (the same points, the same classes)."""
    image = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))
    detected = Pipeline(model.detector).predict(image, mpp=SAMPLE_MPP)
    kept, dropped = [], []
    for reject, out in ((False, kept), (True, dropped)):
        model.reject = reject
        out.append(model.predict(image, mpp=SAMPLE_MPP))
    model.reject = True
    (kept,), (dropped,) = kept, dropped
    np.testing.assert_array_equal(kept.xy, detected.xy)
    assert set(kept.labels) <= {c.name for c in model.classes}
    assert len(dropped) < len(kept)  # the sample has detections the classifier rejects
    index = {tuple(p): k for k, p in enumerate(kept.xy)}
    same = [index[tuple(p)] for p in dropped.xy]
    assert kept.labels[same].tolist() == dropped.labels.tolist()


def test_predict_threshold_and_keep_rejected_reach_the_model(tmp_path: Path) -> None:
    """``predict --threshold`` sets the detector's score threshold, ``--keep-rejected`` keeps what the classifier
    rejects: fewer nuclei with a higher threshold, more when the rejected are kept, on the bundled sample."""
    def count(*options: str) -> int:
        out = tmp_path / "-".join(options or ("plain",))
        assert main(["predict", "--sample", "--runtime", "torch", "--quiet", "--out", str(out), *options]) == 0
        return len(read_points(out / "sample_brcam2c.csv"))

    plain = count()
    assert count("--threshold", "0.9") < plain < count("--keep-rejected")


def test_drop_rejected_leaves_out_and_lists_what_the_classifier_rejects(tmp_path: Path, capsys) -> None:
    # points on a grid, away from the annotated nuclei: some of them the classifier calls "not a nucleus"
    annotated = read_points(SAMPLE_POINTS).xy
    grid = np.stack(np.meshgrid(np.arange(20, 460, 40.0), np.arange(20, 460, 40.0)), -1).reshape(-1, 2)
    grid = grid[np.sqrt(((grid[:, None] - annotated[None]) ** 2).sum(-1)).min(1) > 15]
    given = tmp_path / "grid.csv"
    given.write_text("x,y\n" + "".join(f"{x},{y}\n" for x, y in grid))
    assert main(classify("--nuclei", given, "--out", tmp_path / "out", "--drop-rejected")) == 0, capsys.readouterr()
    summary = json.loads((tmp_path / "out" / "sample_brcam2c_summary.json").read_text())
    dropped = summary["not_a_nucleus"]["given_rows"]
    assert dropped, "the default bundle calls some of these grid points 'not a nucleus' (2 of 34 when written)"
    assert summary["not_a_nucleus"]["count"] == len(dropped) and summary["not_a_nucleus"]["dropped"]
    table = rows(tmp_path / "out" / "sample_brcam2c.csv")
    np.testing.assert_array_equal([[float(r["x"]), float(r["y"])] for r in table], np.delete(grid, dropped, 0))
    assert summary["nuclei"] == len(table) == len(grid) - len(dropped)


@pytest.mark.parametrize("content, problem", [
    ('{"nuc": {"1": {"centroid": [600.0, 10.0]}}}', r"nucleus '1': point \(600.0, 10.0\) lies outside the 465x465"),
    ('{"detections": []}', "not a nucleus file of a known format"),
])
def test_bad_nuclei_files_are_named(tmp_path: Path, capsys, content: str, problem: str) -> None:
    nuclei = tmp_path / "nuclei.json"
    nuclei.write_text(content)
    assert main(classify("--nuclei", nuclei, "--out", tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"denuc classify: error: {nuclei}: " in err
    assert re.search(problem, err), err
    assert not (tmp_path / "out" / "sample_brcam2c.csv").exists()


def test_a_detector_alone_is_refused(tmp_path: Path, capsys) -> None:
    assert main(classify("--nuclei", HOVERNET, "--out", tmp_path, "--model", "fast")) == 2
    assert "denuc classify: error: fast: is a detector alone" in capsys.readouterr().err
