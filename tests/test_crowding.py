"""Recall on crowded nuclei (ground-truth nuclei with >= 3 others within 8 um), on a synthetic case worked out by
hand, and through `denuc evaluate` with a dataset as ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from denuc.cli import main
from denuc.io import write_points
from denuc.metrics.crowding import crowded_nuclei
from denuc.metrics.evaluate import evaluate
from denuc.nuclei import Nuclei, NucleusClass

MPP = 0.5  # 8 um = 16 px


def _scene() -> tuple[Nuclei, Nuclei]:
    """Ground truth: a 3x3 grid with 5 um spacing (every point has 3 to 8 others within 8 um: all 9 crowded) and
    three nuclei 25 um apart (none crowded). Predictions: exactly on 4 grid points and on 2 of the lone nuclei."""
    grid = [(20 + 10 * i, 20 + 10 * j) for j in range(3) for i in range(3)]  # 10 px = 5 um
    lone = [(150, 150), (200, 150), (150, 200)]
    gt = Nuclei(grid + lone, mpp=MPP)
    pred = Nuclei([grid[0], grid[4], grid[5], grid[8], lone[0], lone[2]], scores=np.linspace(0.9, 0.4, 6), mpp=MPP)
    return pred, gt


def test_crowded_nuclei_counts_other_nuclei_within_the_radius_inclusive():
    pred, gt = _scene()
    assert crowded_nuclei(gt.xy, 8 / MPP).tolist() == [True] * 9 + [False] * 3
    # exactly 3 others at exactly the radius: crowded; one of them a hair farther: not
    centre_and_three = np.array([[0, 0], [16, 0], [0, 16], [-16, 0]], dtype=float)
    assert crowded_nuclei(centre_and_three, 16.0).tolist() == [True, False, False, False]
    assert not crowded_nuclei(centre_and_three + [[0, 0], [0, 0], [0, 0], [-1e-9, 0]], 16.0)[0]
    assert crowded_nuclei(np.zeros((0, 2)), 16.0).tolist() == []


@pytest.mark.parametrize("protocol", ["denuc", "hungarian"])
def test_crowded_recall_beside_overall_recall(protocol):
    pred, gt = _scene()
    report = evaluate([("a", pred, gt)], radius_um=3.0, protocol=protocol)
    assert (report.crowded.found, report.crowded.total) == (4, 9)
    assert report.crowded.recall == pytest.approx(4 / 9)
    assert report.detection.recall == pytest.approx(6 / 12)
    out = json.loads(json.dumps(report.to_dict()))
    assert out["crowded"] == {"found": 4, "total": 9, "recall": pytest.approx(4 / 9), "radius_um": 8.0,
                              "min_neighbours": 3}
    assert ("crowded nuclei (>= 3 others within 8 um): recall 0.4444 (4 of 9), overall recall 0.5000"
            in report.format_table())


def test_crowded_recall_pools_images_in_their_own_pixel_sizes():
    pred, gt = _scene()
    # the same scene at half the pixel size (twice the pixels): the grid is still crowded, in um
    half = Nuclei(gt.xy * 2, mpp=MPP / 2), Nuclei(pred.xy * 2, scores=pred.scores, mpp=MPP / 2)
    report = evaluate([("a", pred, gt), ("b", half[1], half[0])])
    assert (report.crowded.found, report.crowded.total) == (8, 18)


def test_no_crowded_recall_where_there_is_no_detection_score():
    pred, gt = _scene()
    tumour = [NucleusClass("tumour")]
    labelled = Nuclei(gt.xy, ["tumour"] * len(gt), classes=tumour, mpp=MPP)
    predicted = Nuclei(pred.xy, ["tumour"] * len(pred), scores=pred.scores, classes=tumour, mpp=MPP)
    report = evaluate([("a", predicted, labelled)], protocol="ocelot")
    assert report.crowded is None and report.to_dict()["crowded"] is None


def test_cli_reports_crowded_recall_with_a_dataset_as_ground_truth(tmp_path: Path, capsys):
    """`denuc evaluate --gt-dataset consep` on a one-image copy in the CoNSeP release's layout."""
    pred, gt = _scene()
    root = tmp_path / "consep"
    for folder in ("Train/Images", "Train/Labels", "Test/Images", "Test/Labels"):
        (root / folder).mkdir(parents=True)
    Image.fromarray(np.full((256, 256, 3), 200, np.uint8)).save(root / "Test" / "Images" / "test_1.png")
    # at CoNSeP's 0.25 um/px, 8 um is 32 px: the 10 px grid is crowded, the 50 px apart lone nuclei are not
    scipy.io.savemat(root / "Test" / "Labels" / "test_1.mat",
                     {"inst_type": np.full((len(gt), 1), 2.0), "inst_centroid": gt.xy})
    write_points(tmp_path / "pred" / "test_1.csv", pred)
    out = tmp_path / "report.json"
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt-dataset", "consep", "--dataset-root", str(root),
                 "--out", str(out)]) == 0
    assert "crowded nuclei (>= 3 others within 8 um): recall 0.4444 (4 of 9), overall recall 0.5000" in (
        capsys.readouterr().out)
    assert json.loads(out.read_text())["crowded"]["total"] == 9
