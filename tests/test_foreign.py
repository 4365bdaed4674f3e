"""Other tools' nuclei files (denuc.io.foreign): each format read to the right points, outlines, classes and
scores, told apart by content; bad files named; and scored by `denuc evaluate`.

The fixtures in tests/data/foreign/ follow each tool's writer (their README says which); their numbers here are
the ones written in them, so each assertion checks a coordinate frame or a naming rule of the reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from denuc.cli import main
from denuc.errors import InputError
from denuc.io import read_points
from denuc.io.foreign import read_nuclei
from denuc.nuclei import UNLABELLED

DATA = Path(__file__).parent / "data" / "foreign"
TYPE_INFO = DATA / "hovernet_type_info.json"
OCTAGON = np.array([(-2, -5), (2, -5), (5, -2), (5, 2), (2, 5), (-2, 5), (-5, 2), (-5, -2)], dtype=float)
"""The outline of every segmented nucleus of the fixtures, around its centre (an OpenCV-like contour)."""


def _json(path: Path) -> object:
    return json.loads(path.read_text())


def test_hovernet_centroids_contours_and_named_types() -> None:
    nuclei = read_nuclei(DATA / "hovernet_tile.json", type_info=TYPE_INFO)
    raw = _json(DATA / "hovernet_tile.json")["nuc"]
    # HoVer-Net's centroids (image moments) and contours (OpenCV) put (0, 0) at the centre of the top-left pixel,
    # as denuc does: read unshifted, x first
    np.testing.assert_array_equal(nuclei.xy, [n["centroid"] for n in raw.values()])
    assert nuclei.xy[0].tolist() == [98.0, 78.0]
    np.testing.assert_array_equal(nuclei.outlines[0], nuclei.xy[0] + OCTAGON)
    assert nuclei.labels.tolist() == ["tumour", "lymphocyte", "tumour", "lymphocyte", UNLABELLED, "lymphocyte",
                                      "stromal", "stromal", "tumour"]  # type 0 is HoVer-Net's "no label"
    assert [(c.name, c.color) for c in nuclei.classes] == [("tumour", (255, 0, 0)), ("lymphocyte", (0, 255, 0)),
                                                          ("stromal", (0, 0, 255))]
    np.testing.assert_array_equal(nuclei.scores, [n["type_prob"] for n in raw.values()])


def test_hovernet_without_type_info_names_types_by_number() -> None:
    nuclei = read_nuclei(DATA / "hovernet_tile.json")
    assert nuclei.labels.tolist()[:5] == ["type 1", "type 2", "type 1", "type 2", UNLABELLED]
    assert nuclei.class_names == ["type 1", "type 2", "type 3"]


def test_hovernet_type_missing_from_type_info_names_the_nucleus(tmp_path: Path) -> None:
    info = tmp_path / "type_info.json"
    info.write_text(json.dumps({"0": ["nolabe", [0, 0, 0]], "1": ["tumour", [255, 0, 0]]}))
    with pytest.raises(InputError, match=r"hovernet_tile.json: nucleus '2': type 2 is not named in .*type_info"):
        read_nuclei(DATA / "hovernet_tile.json", type_info=info)


def test_cellvit_plus_plus_cells_json() -> None:
    nuclei = read_nuclei(DATA / "cellvit_cells.json")
    assert len(nuclei) == 8
    assert nuclei.xy[0].tolist() == [98.25, 76.5]  # level-0 pixels, pixel-centre frame: as written
    np.testing.assert_array_equal(nuclei.outlines[0], [98, 77] + OCTAGON)
    assert nuclei.mpp == 0.5  # the file's wsi_metadata.base_mpp, the pixel size its coordinates are in
    assert nuclei.class_names == ["tumour", "lymphocyte", "stromal"]  # type_map id -> name, in id order
    assert nuclei.labels.tolist()[:3] == ["tumour", "tumour", "lymphocyte"]
    assert nuclei.scores[0] == 0.91


def test_cellvit_1_cells_json_maps_names_to_ids() -> None:
    nuclei = read_nuclei(DATA / "cellvit_v1_cells.json")
    assert nuclei.xy.tolist() == [[1530.2, 2210.7], [1602.0, 2255.5], [1580.4, 2301.0]]
    assert nuclei.labels.tolist() == ["Neoplastic", "Inflammatory", "Connective"]
    # the whole type_map but its Background, in type order: classes none of the nuclei has still count
    assert nuclei.class_names == ["Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial"]
    assert nuclei.mpp is None  # CellViT 1 gives no base_mpp


def test_cellvit_geojson_exports_one_nucleus_per_polygon_and_point() -> None:
    polygons = read_nuclei(DATA / "cellvit_cells.geojson")
    points = read_nuclei(DATA / "cellvit_cell_detection.geojson")
    # a MultiPolygon annotation per class holds all its cells; read as GeoJSON is read (QuPath's corner frame)
    assert polygons.xy.tolist() == points.xy.tolist() == [[96.5, 76.5], [195.5, 80.5], [338.5, 65.5]]
    assert polygons.labels.tolist() == points.labels.tolist() == ["Neoplastic", "Neoplastic", "Inflammatory"]
    for outline, centre in zip(polygons.outlines, polygons.xy):  # each polygon is its own nucleus' outline
        np.testing.assert_array_equal(outline, centre + OCTAGON)
    assert points.outlines is None
    assert [c.color for c in polygons.classes] == [(255, 0, 0), (34, 221, 77)]


def test_qupath_cells_use_their_nucleus() -> None:
    nuclei = read_nuclei(DATA / "qupath_objects.geojson")
    # the cell's nucleusGeometry is centred on (146, 122), the cell itself on (150, 126): the nucleus is read
    assert nuclei.xy.tolist() == [[146.0, 122.0], [339.0, 66.0], [383.0, 74.0]]
    assert nuclei.labels.tolist() == ["Tumor", "Immune cells", UNLABELLED]
    np.testing.assert_array_equal(nuclei.outlines[0], nuclei.xy[0] + OCTAGON)  # the nucleus', not the cell's
    assert nuclei.outlines[2] is None  # a point
    assert [c.color for c in nuclei.classes] == [(200, 0, 0), (160, 90, 160)]
    assert nuclei.scores is None  # QuPath's shape measurements are not scores


def test_stardist_detection_probability_is_the_score() -> None:
    nuclei = read_nuclei(DATA / "stardist_qupath.geojson")  # a bare list of features
    assert nuclei.xy.tolist() == [[97.0, 77.0], [264.0, 93.0]]
    assert nuclei.scores.tolist() == [0.8712, 0.6425]
    assert nuclei.labels.tolist() == [UNLABELLED, UNLABELLED]


def test_stardist_score_in_older_qupaths_measurement_lists_and_a_lone_feature(tmp_path: Path) -> None:
    features = _json(DATA / "stardist_qupath.geojson")
    for feature in features:  # QuPath < 0.4 wrote measurements as a list of {"name", "value"}
        feature["properties"]["measurements"] = [{"name": k, "value": v}
                                                 for k, v in feature["properties"]["measurements"].items()]
    (tmp_path / "old.geojson").write_text(json.dumps(features))
    assert read_nuclei(tmp_path / "old.geojson").scores.tolist() == [0.8712, 0.6425]
    (tmp_path / "one.geojson").write_text(json.dumps(features[0]))
    assert read_nuclei(tmp_path / "one.geojson").xy.tolist() == [[97.0, 77.0]]


def test_csv_and_denuc_geojson_read_as_read_points(tmp_path: Path) -> None:
    truth = read_points(DATA / "ground_truth.csv")
    assert read_nuclei(DATA / "ground_truth.csv").xy.tolist() == truth.xy.tolist()
    from denuc.io import write_points

    write_points(tmp_path / "points.geojson", truth)
    again = read_nuclei(tmp_path / "points.geojson")
    np.testing.assert_allclose(again.xy, truth.xy)
    assert again.labels.tolist() == truth.labels.tolist()


def test_points_outside_the_image_are_refused() -> None:
    with pytest.raises(InputError, match=r"cellvit_cells.json: cell 2: point \(340.25, 65.5\) lies outside the 300x"):
        read_nuclei(DATA / "cellvit_cells.json", image_size=(300, 300))


@pytest.mark.parametrize("content, problem", [
    ('{"images": []}', "not a nucleus file of a known format; expected a denuc CSV"),
    ("x y\n1 2\n", "not valid JSON"),
    ('{"cells": [{"centroid": [1, 2]}, {"centroid": [1]}]}', "cell 1: centroid must be a list of two numbers"),
    ('{"cells": [{"centroid": [1, 2], "type": 1}], "type_map": [1]}', "type_map must map type ids"),
    ('{"nuc": {"7": {"centroid": [1, 2], "contour": [[1, 2, 3]]}}}', "nucleus '7': contour must be"),
    ('{"nuc": {"7": {"centroid": [1, 2], "type": "tumour"}}}', "nucleus '7': type must be a whole number"),
])
def test_bad_files_are_named_with_the_problem(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "nuclei.json"
    path.write_text(content)
    with pytest.raises(InputError, match=f"nuclei.json: .*{problem}") as error:
        read_nuclei(path)
    assert str(path) in str(error.value)


def test_a_bad_polygon_of_a_split_annotation_names_its_feature(tmp_path: Path) -> None:
    features = _json(DATA / "cellvit_cells.geojson")
    features[1]["geometry"]["coordinates"].append([[["x", 1], [2, 3], [4, 5]]])
    path = tmp_path / "cells.geojson"
    path.write_text(json.dumps(features))
    with pytest.raises(InputError, match=r"cells.geojson: feature 1: a position must be"):
        read_nuclei(path)


def test_other_files_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        read_nuclei(tmp_path / "missing.json")
    (tmp_path / "cells.json.snappy").write_bytes(b"\xff\x00")
    with pytest.raises(InputError, match="snappy-compressed"):
        read_nuclei(tmp_path / "cells.json.snappy")
    with pytest.raises(InputError, match="not a HoVer-Net JSON"):
        read_nuclei(DATA / "cellvit_cells.json", type_info=TYPE_INFO)
    (tmp_path / "type_info.json").write_text('{"1": "tumour"}')
    with pytest.raises(InputError, match=r"type_info.json: type '1': expected \[name, \[r, g, b\]\]"):
        read_nuclei(DATA / "hovernet_tile.json", type_info=tmp_path / "type_info.json")


def _evaluate(argv: list, tmp_path: Path, capsys) -> dict:
    report = tmp_path / "report.json"
    assert main(["evaluate", *map(str, argv), "--gt", str(DATA / "ground_truth.csv"), "--mpp", "0.5",
                 "--out", str(report)]) == 0, capsys.readouterr().err
    return _json(report)


def test_evaluate_scores_hovernet_json(tmp_path: Path, capsys) -> None:
    report = _evaluate(["--pred", DATA / "hovernet_tile.json", "--type-info", TYPE_INFO], tmp_path, capsys)
    # the fixture's README: 8 of 9 found and one extra; (196, 82) tumour called lymphocyte, (263, 93) unlabelled
    assert {k: report["detection"][k] for k in ("tp", "fp", "fn")} == {"tp": 8, "fp": 1, "fn": 1}
    counts = {name: (c["tp"], c["fp"], c["fn"]) for name, c in report["classes"].items()}
    assert counts == {"tumour": (2, 1, 1), "lymphocyte": (2, 1, 1), "stromal": (2, 0, 1)}


def test_evaluate_scores_cellvit_cells_json(tmp_path: Path, capsys) -> None:
    report = _evaluate(["--pred", DATA / "cellvit_cells.json"], tmp_path, capsys)
    assert {k: report["detection"][k] for k in ("tp", "fp", "fn")} == {"tp": 8, "fp": 0, "fn": 1}
    counts = {name: (c["tp"], c["fp"], c["fn"]) for name, c in report["classes"].items()}
    assert counts == {"tumour": (2, 0, 1), "lymphocyte": (3, 0, 0), "stromal": (3, 0, 0)}


def test_evaluate_names_an_unknown_prediction_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "pred.json"
    path.write_text('{"predictions": []}')
    assert main(["evaluate", "--pred", str(path), "--gt", str(DATA / "ground_truth.csv"), "--mpp", "0.5"]) == 2
    err = capsys.readouterr().err
    assert f"denuc evaluate: error: {path}: not a nucleus file of a known format" in err
    assert "Traceback" not in err
