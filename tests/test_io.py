"""Point file readers and writers (CSV and QuPath GeoJSON), the packaged sample's points, overlay pictures."""

from __future__ import annotations

import json
import math
import uuid
from collections import Counter

import numpy as np
import pytest
from conftest import SAMPLE_IMAGE, SAMPLE_MPP, SAMPLE_POINTS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from denuc.errors import InputError
from denuc.io import read_csv, read_geojson, read_points, write_csv, write_geojson, write_points
from denuc.io.geojson import polygon_centroid
from denuc.io.overlay import UNLABELLED_COLOR, Overview, write_overlay
from denuc.nuclei import UNLABELLED, Nuclei, NucleusClass

CLASSES = [NucleusClass("tumour", (255, 0, 0)), NucleusClass("lymphocyte", (0, 0, 255))]


def example_nuclei(scores: bool = True, probs: bool = True) -> Nuclei:
    return Nuclei(
        xy=[[0.1, 2.25], [-0.5, 99.5], [37.0, 0.0]],
        labels=["tumour", UNLABELLED, "lymphocyte"],
        scores=[0.9, 0.123456789, 1.0] if scores else None,
        probs=[[0.7, 0.3], [0.5, 0.5], [0.01, 0.99]] if probs else None,
        classes=CLASSES,
        image_size=(100, 100),
    )


def assert_same(a: Nuclei, b: Nuclei, atol: float = 0.0) -> None:
    np.testing.assert_allclose(a.xy, b.xy, rtol=0, atol=atol)
    assert a.labels.tolist() == b.labels.tolist()
    for name in ("scores", "probs"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y)


# --- round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".geojson", ".json"])
@pytest.mark.parametrize("scores,probs", [(True, True), (True, False), (False, False)])
def test_round_trip(tmp_path, suffix, scores, probs):
    nuclei = example_nuclei(scores, probs)
    path = tmp_path / f"points{suffix}"
    write_points(path, nuclei)
    back = read_points(path, classes=CLASSES, image_size=(100, 100))
    # GeoJSON adds and removes QuPath's half-pixel offset, which may cost the last bit of a coordinate.
    assert_same(nuclei, back, atol=0 if suffix == ".csv" else 1e-12)
    assert back.classes == CLASSES


def test_round_trip_without_classes_keeps_probability_order_and_geojson_colours(tmp_path):
    nuclei = example_nuclei()
    write_csv(tmp_path / "p.csv", nuclei)
    write_geojson(tmp_path / "p.geojson", nuclei)
    assert read_csv(tmp_path / "p.csv").class_names == ["tumour", "lymphocyte"]
    assert read_geojson(tmp_path / "p.geojson").classes == CLASSES


def test_empty_nuclei_round_trip(tmp_path):
    empty = Nuclei(np.zeros((0, 2)), classes=CLASSES)
    for suffix in (".csv", ".geojson"):
        write_points(tmp_path / f"e{suffix}", empty)
        assert len(read_points(tmp_path / f"e{suffix}", classes=CLASSES)) == 0


names = st.sampled_from(["a", "b b", 'c,"d"', UNLABELLED])
coordinate = st.floats(-0.5, 999.5, allow_nan=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.lists(st.tuples(coordinate, coordinate, names, st.floats(0, 1)), min_size=1, max_size=20))
def test_round_trip_property(tmp_path, data):
    # At least one point: an empty GeoJSON file has no feature to say whether there were scores.
    classes = [NucleusClass(n) for n in ["a", "b b", 'c,"d"']]
    nuclei = Nuclei(
        xy=[(x, y) for x, y, _, _ in data],
        labels=[label for _, _, label, _ in data],
        scores=[s for *_, s in data],
        classes=classes,
    )
    for suffix, atol in ((".csv", 0.0), (".geojson", 1e-9)):
        write_points(tmp_path / f"p{suffix}", nuclei)
        assert_same(nuclei, read_points(tmp_path / f"p{suffix}", classes=classes), atol=atol)


# --- CSV details -------------------------------------------------------------------------------------------


def test_csv_columns(tmp_path):
    write_csv(tmp_path / "p.csv", example_nuclei())
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "x,y,label,score,prob_tumour,prob_lymphocyte"
    assert lines[1] == "0.1,2.25,tumour,0.9,0.7,0.3"
    assert lines[2].split(",")[2] == "unlabelled"


def test_csv_reader_accepts_any_column_order_case_extra_columns_and_empty_labels(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("\ufeffid,Label,Y,X\n7,tumour,2,1\n8,,4,3\n\n9,Unlabelled,6,5\n")
    nuclei = read_csv(path)
    np.testing.assert_array_equal(nuclei.xy, [[1, 2], [3, 4], [5, 6]])
    assert nuclei.labels.tolist() == ["tumour", UNLABELLED, UNLABELLED]
    assert nuclei.class_names == ["tumour"]
    assert nuclei.scores is None and nuclei.probs is None


def test_csv_without_label_column_is_unlabelled(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("x,y\n1,2\n")
    assert read_csv(path, mpp=0.25).labels.tolist() == [UNLABELLED]


# --- GeoJSON details ---------------------------------------------------------------------------------------


def test_geojson_has_the_fields_qupath_reads(tmp_path):
    nuclei = example_nuclei()
    write_geojson(tmp_path / "p.geojson", nuclei)
    data = json.loads((tmp_path / "p.geojson").read_text())
    assert data["type"] == "FeatureCollection"
    features = data["features"]
    assert len(features) == 3
    assert len({f["id"] for f in features}) == 3
    for feature, (x, y) in zip(features, nuclei.xy):
        assert feature["type"] == "Feature"
        uuid.UUID(feature["id"])  # QuPath >= 0.4 reads the id as a UUID
        assert feature["geometry"] == {"type": "Point", "coordinates": [x + 0.5, y + 0.5]}
        assert feature["properties"]["objectType"] == "detection"
    assert features[0]["properties"]["classification"] == {"name": "tumour", "color": [255, 0, 0]}
    assert "classification" not in features[1]["properties"]
    assert features[2]["properties"]["measurements"] == {
        "score": 1.0, "prob: tumour": 0.01, "prob: lymphocyte": 0.99,
    }


def feature(geometry, classification=None, measurements=None, **extra):
    properties = {"objectType": "detection"}
    if classification is not None:
        properties["classification"] = classification
    if measurements is not None:
        properties["measurements"] = measurements
    return {"type": "Feature", "geometry": geometry, "properties": properties, **extra}


def point(x, y):
    return {"type": "Point", "coordinates": [x, y]}


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def test_geojson_reads_qupath_variants(tmp_path):
    features = [
        feature(point(1.5, 2.5), {"name": "tumour", "color": [1, 2, 3]}),
        feature(point(3.5, 4.5), "lymphocyte"),  # classification as a bare string
        feature(point(5.5, 6.5), {"name": "stroma", "colorRGB": (255 << 24) | (10 << 16) | (20 << 8) | 30}),
        feature(point(7.5, 8.5), {"names": ["tumour", "positive"], "color": [9, 9, 9]}),
        feature({"type": "MultiPoint", "coordinates": [[0.5, 0.5], [1.5, 0.5]]}, {"name": "Unlabelled"}),
        feature(point(9.5, 9.5), None),
    ]
    nuclei = read_geojson(write_json(tmp_path / "list.geojson", features))  # a bare list, as QuPath exports
    np.testing.assert_array_equal(nuclei.xy, [[1, 2], [3, 4], [5, 6], [7, 8], [0, 0], [1, 0], [9, 9]])
    assert nuclei.labels.tolist() == ["tumour", "lymphocyte", "stroma", "tumour: positive"] + [UNLABELLED] * 3
    assert [(c.name, c.color) for c in nuclei.classes] == [
        ("tumour", (1, 2, 3)), ("lymphocyte", (213, 94, 0)), ("stroma", (10, 20, 30)), ("tumour: positive", (9, 9, 9)),
    ]


def test_geojson_reads_legacy_measurement_list(tmp_path):
    features = [
        feature(point(1, 1), "a", [{"name": "score", "value": 0.25}, {"name": "prob: a", "value": 1.0},
                                   {"name": "Nucleus: Area", "value": 12.0}]),
    ]
    nuclei = read_geojson(write_json(tmp_path / "p.json", {"type": "FeatureCollection", "features": features}))
    assert nuclei.scores.tolist() == [0.25]
    assert nuclei.probs.tolist() == [[1.0]]
    assert nuclei.class_names == ["a"]


def test_polygon_centroid_is_area_weighted_with_holes():
    square_with_hole = [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]], [[0, 0], [0, 2], [2, 2], [2, 0], [0, 0]]]
    # (16 * (2, 2) - 4 * (1, 1)) / 12
    assert polygon_centroid([square_with_hole]) == pytest.approx((7 / 3, 7 / 3))
    triangle = [[[0, 0], [3, 0], [0, 3]]]  # an open ring works too
    assert polygon_centroid([triangle]) == pytest.approx((1, 1))
    # Two squares of areas 1 and 4: (1 * (0.5, 0.5) + 4 * (3, 1)) / 5
    squares = [[[[0, 0], [1, 0], [1, 1], [0, 1]]], [[[2, 0], [4, 0], [4, 2], [2, 2]]]]
    assert polygon_centroid(squares) == pytest.approx((2.5, 0.9))
    far_away = [[[x + 1e5, y + 2e5] for x, y in ring] for ring in square_with_hole]
    assert polygon_centroid([far_away]) == pytest.approx((1e5 + 7 / 3, 2e5 + 7 / 3), abs=1e-9)
    assert polygon_centroid([[[[0, 0], [2, 2], [4, 4]]]]) == pytest.approx((2, 2))  # zero area: vertex mean


def test_geojson_polygons_and_cell_nuclei(tmp_path):
    square = [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]]
    cell = feature({"type": "Polygon", "coordinates": [[[0, 0], [40, 0], [40, 40], [0, 40]]]}, "a",
                   nucleusGeometry={"type": "Polygon", "coordinates": square})
    features = [
        feature({"type": "Polygon", "coordinates": square}, "a"),
        feature({"type": "MultiPolygon", "coordinates": [square]}, "a"),
        cell,
    ]
    nuclei = read_geojson(write_json(tmp_path / "p.geojson", features))
    np.testing.assert_allclose(nuclei.xy, [[1.5, 1.5]] * 3)  # centroid (2, 2) minus QuPath's half pixel


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,where,problem",
    [
        ("x,y,label\n1,2,a\n3,4\n", "line 3", "expected 3 fields"),
        ("x,y\n1,2\nfoo,4\n", "line 3", "'foo' is not a number"),
        ("x,y\n1,2\n\n3,\n", "line 4", "'' is not a number"),
        ("x,y\nnan,2\n", "line 2", "not a finite number"),
        ("x,y\n1,inf\n", "line 2", "not a finite number"),
        ("x,y\n1,2\n100,3\n", "line 3", "outside the 100x50 image"),
        ("x,y,label\n1,2,tumour\n1,2,stroma\n", "line 3", "unknown class 'stroma'"),
        ("x,y,score\n1,2,nan\n", "line 2", "score nan is not a finite number"),
        ("1,2\n3,4\n", "line 1", "missing header row"),
        ("x,y,x\n1,2,3\n", "line 1", "duplicate column names ['x']"),
        ('x,y,label\n1,2,"a\n', "line 2", "malformed CSV"),
        ("x,y,prob_tumour\n1,2,1\n", None, "class probabilities are for ['tumour'], not the classes"),
    ],
)
def test_csv_bad_input(tmp_path, text, where, problem):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputError) as error:
        read_csv(path, classes=CLASSES, image_size=(100, 50))
    message = str(error.value)
    assert "bad.csv" in message and problem in message
    if where:
        assert f"bad.csv: {where}: " in message


@pytest.mark.parametrize(
    "data,where,problem",
    [
        ([feature(point(1, 1), "tumour"), feature(None, "tumour")], "feature 1", "has no geometry"),
        ([feature({"type": "LineString", "coordinates": [[0, 0], [1, 1]]})], "feature 0", "unsupported geometry"),
        ([feature(point(1, 1)), feature(point("1", 2))], "feature 1", "two numbers"),
        ([feature(point(1, 1)), feature(point(True, 2))], "feature 1", "two numbers"),
        ([feature(point(1, 1)), feature(point(math.nan, 2))], "feature 1", "not a finite number"),
        ([feature(point(1, 1)), feature(point(200, 2))], "feature 1", "outside the 100x50 image"),
        ([feature(point(1, 1), "tumour"), feature(point(1, 1), "stroma")], "feature 1", "unknown class 'stroma'"),
        ([feature(point(1, 1), 7)], "feature 0", "classification must be"),
        ([feature(point(1, 1), {"color": [1, 2, 3]})], "feature 0", "classification has no name"),
        ([feature(point(1, 1), measurements={"score": "high"})], "feature 0", "must be a number"),
        ([feature(point(1, 1), measurements={"score": 0.5}), feature(point(1, 1))], "feature 1",
         "differ from the first feature's"),
        ([feature(point(1, 1)), "not a feature"], "feature 1", "not a GeoJSON Feature"),
        ({"type": "Polygon", "coordinates": []}, None, "expected a GeoJSON FeatureCollection"),
        ([feature({"type": "Polygon", "coordinates": [[]]})], "feature 0", "ring must be a non-empty list"),
    ],
)
def test_geojson_bad_input(tmp_path, data, where, problem):
    path = write_json(tmp_path / "bad.geojson", data)
    with pytest.raises(InputError) as error:
        read_geojson(path, classes=CLASSES, image_size=(100, 50))
    message = str(error.value)
    assert "bad.geojson" in message and problem in message
    if where:
        assert f"bad.geojson: {where}: " in message


def test_geojson_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "bad.geojson"
    path.write_text('{"type": "FeatureCollection",\n "features": [,]}')
    with pytest.raises(InputError, match=r"bad.geojson: line 2 column \d+: not valid JSON"):
        read_geojson(path)


@pytest.mark.parametrize("suffix", [".csv", ".geojson"])
def test_missing_file(tmp_path, suffix):
    with pytest.raises(InputError, match=f"nothere{suffix}: file not found"):
        read_points(tmp_path / f"nothere{suffix}")


def test_unknown_extension(tmp_path):
    with pytest.raises(InputError, match="unknown point file type '.txt'"):
        read_points(tmp_path / "points.txt")
    with pytest.raises(InputError, match="unknown point file type"):
        write_points(tmp_path / "points", example_nuclei())


@pytest.mark.parametrize("suffix", [".csv", ".geojson"])
def test_writers_refuse_bad_nuclei_and_leave_no_file(tmp_path, suffix):
    bad = Nuclei([[math.nan, 1.0]])
    path = tmp_path / f"out{suffix}"
    with pytest.raises(InputError, match="non-finite"):
        write_points(path, bad)
    unnamed_probs = Nuclei([[1.0, 1.0]], probs=[[0.5, 0.5]])
    with pytest.raises(InputError, match="2 probability columns for 0 classes"):
        write_points(path, unnamed_probs)
    assert list(tmp_path.iterdir()) == []


def test_writer_replaces_an_existing_file(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("old")
    write_csv(path, example_nuclei())
    assert path.read_text().startswith("x,y,label")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]


def test_pixel_sizes_within_one_percent_are_not_resampled() -> None:
    from denuc.io.images import scale_to

    assert scale_to(0.499, 0.5) == 1.0 and scale_to(0.504, 0.5) == 1.0  # what 20x scanners report
    assert scale_to(0.55, 0.5) == pytest.approx(1.1) and scale_to(0.25, 0.5) == pytest.approx(0.5)


# --- the packaged sample's ground truth ----------------------------------------------------------------------


def test_packaged_sample_ground_truth_reads_inside_its_image():
    """denuc/data/sample_brcam2c.csv: the sample image's annotated nuclei (BRCA-M2C), a plain point file."""
    truth = read_points(SAMPLE_POINTS, mpp=SAMPLE_MPP, image_size=Image.open(SAMPLE_IMAGE).size)  # checks bounds
    assert truth.class_names == ["lymphocyte", "tumour", "stromal"]
    assert Counter(truth.labels.tolist()) == {"tumour": 144, "stromal": 91, "lymphocyte": 89}
    assert truth.scores is None and len(np.unique(truth.xy, axis=0)) == len(truth) == 324


# --- overlay pictures --------------------------------------------------------------------------------------


def has_color(pixels: np.ndarray, color: tuple[int, int, int]) -> bool:
    return bool((pixels == color).all(axis=-1).any())


@pytest.mark.parametrize("width", [200, 60])  # 60 px: too narrow for one line, the legend wraps
def test_overlay_keeps_the_image_and_adds_a_legend_of_class_colours(tmp_path, width):
    image = np.full((120, width, 3), 200, np.uint8)
    xy = np.array([[10.0, 10.0], [30.0, 60.0], [50.0, 100.0]])
    nuclei = Nuclei(xy=xy, labels=["tumour", "lymphocyte", UNLABELLED], classes=CLASSES, mpp=0.5)
    write_overlay(tmp_path / "overlay.png", image, nuclei)
    drawn = np.asarray(Image.open(tmp_path / "overlay.png"))
    picture, legend = drawn[:120], drawn[120:]
    assert drawn.shape[1] == width and len(legend) >= 12
    for color in ((255, 0, 0), (0, 0, 255), UNLABELLED_COLOR):
        assert has_color(picture, color) and has_color(legend, color)  # a ring on the nucleus, a swatch below
    assert (legend.max(axis=-1) < 80).any()  # the text
    # the image is untouched away from the rings (2.4 um: 4.8 px at 0.5 um/px)
    rows, cols = np.mgrid[:120, :width]
    away = np.min([np.hypot(cols - x, rows - y) for x, y in xy], axis=0) > 8
    assert (picture[away] == 200).all()


def test_density_map_legend_shows_its_scale_and_no_class_swatches(tmp_path):
    overview = Overview(np.full((100, 300, 3), 200, np.uint8), CLASSES, mpp=2.0, dots=False)
    xy = np.random.default_rng(0).uniform(0, 99, (500, 2))
    overview.add(Nuclei(xy=xy, labels=["lymphocyte"] * 500, classes=CLASSES))
    overview.save(tmp_path / "overview.png")
    drawn = np.asarray(Image.open(tmp_path / "overview.png"))
    legend = drawn[100:]
    assert has_color(legend, (255, 255, 0)) and has_color(legend, (255, 0, 0))  # the scale: yellow to red
    assert not has_color(drawn, (0, 0, 255))  # no lymphocyte dots, no lymphocyte swatch: colours are not drawn
    assert not (drawn[:100] == 200).all()  # the veil
