"""Outlines as pixels and measurements (denuc.outlines), and writing them (GeoJSON polygons, table columns).

Reference values come from scikit-image itself: ``skimage.draw.polygon`` for which pixels an outline covers and
``skimage.measure.regionprops`` on the same instance map for every measurement.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SHARED, shared_or_skip
from skimage.color import hed_from_rgb, rgb2hed
from skimage.draw import polygon as skimage_polygon
from skimage.measure import regionprops

from denuc.io import read_geojson, write_geojson
from denuc.io.tables import NucleusTableWriter
from denuc.nuclei import Nuclei, NucleusClass
from denuc.outlines import MEASUREMENTS, clip_outlines, measure, rasterise

# Both sides compute the same sums in another order: agreement to rounding error.
RTOL = 1e-9
ORIENTATION_ATOL_DEG = 1e-9


def ellipse(centre, a, b, angle, k=24, jitter=0.0, rng=None) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    radius = 1 + (rng.uniform(-jitter, jitter, k) if jitter else 0)
    x, y = a * radius * np.cos(t), b * radius * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return np.c_[centre[0] + c * x - s * y, centre[1] + s * x + c * y]


def random_nuclei(n: int, size: tuple[int, int], seed: int = 0, mpp: float = 0.25) -> Nuclei:
    """Jittered ellipses at random places, overlapping one another and running past the image edge."""
    rng = np.random.default_rng(seed)
    width, height = size
    xy = rng.uniform([-0.5, -0.5], [width - 0.5, height - 0.5], (n, 2))
    outlines = [ellipse(p, *rng.uniform(2, 9, 2), rng.uniform(0, np.pi), jitter=0.2, rng=rng) for p in xy]
    return Nuclei(xy, outlines=outlines, image_size=size, mpp=mpp)


def skimage_mask(outline: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(size[::-1], dtype=bool)
    rows, cols = skimage_polygon(outline[:, 1], outline[:, 0], size[::-1])
    mask[rows, cols] = True
    return mask


def haematoxylin_od(image: np.ndarray) -> np.ndarray:
    """The documented definition, computed directly: base-10 OD (a 0 counted as 1) unmixed by hed_from_rgb."""
    od = -np.log10(np.maximum(image.astype(np.float64), 1) / 255)
    return od @ hed_from_rgb[:, 0]


def regionprops_values(inst_map: np.ndarray, image: np.ndarray, n: int, mpp: float) -> dict[str, np.ndarray]:
    values = {name: np.full(n, np.nan) for name in MEASUREMENTS}
    for region in regionprops(inst_map, intensity_image=haematoxylin_od(image)):
        i = region.label - 1
        values["area_um2"][i] = region.area * mpp ** 2
        values["perimeter_um"][i] = region.perimeter * mpp
        values["equivalent_diameter_um"][i] = region.equivalent_diameter_area * mpp
        values["eccentricity"][i] = region.eccentricity
        values["solidity"][i] = region.solidity
        values["major_axis_um"][i] = region.axis_major_length * mpp
        values["minor_axis_um"][i] = region.axis_minor_length * mpp
        values["orientation_deg"][i] = math.degrees(region.orientation)
        values["haematoxylin_od_mean"][i] = region.intensity_mean
    return values


def assert_equal_measurements(values: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(values) == list(MEASUREMENTS)
    for name in MEASUREMENTS:
        if name == "orientation_deg":
            np.testing.assert_allclose(values[name], expected[name], rtol=0, atol=ORIENTATION_ATOL_DEG, err_msg=name)
        else:
            np.testing.assert_allclose(values[name], expected[name], rtol=RTOL, atol=0, err_msg=name)


# --- rasterise ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["integer", "half-integer", "float"])
def test_rasterise_covers_the_pixels_skimage_draws(kind):
    # vertices on pixel centres and on pixel corners hit every edge case of "centre on the edge counts"
    rng = np.random.default_rng(["integer", "half-integer", "float"].index(kind))
    size = (20, 18)
    for _ in range(300):
        k = int(rng.integers(3, 12))
        vertices = {"integer": lambda: rng.integers(-3, 23, (k, 2)).astype(float),
                    "half-integer": lambda: rng.integers(-6, 46, (k, 2)) / 2,
                    "float": lambda: rng.uniform(-3, 23, (k, 2))}[kind]()
        centre = vertices.mean(axis=0)
        outline = vertices[np.argsort(np.arctan2(*(vertices - centre).T[::-1]))]  # a simple (star-shaped) polygon
        if len(np.unique(outline, axis=0)) < 3 or np.linalg.matrix_rank(outline[1:] - outline[0]) < 2:
            continue  # all on a line: degenerate, tested below
        inst_map = rasterise(Nuclei([[5, 5]], outlines=[outline]), size)
        assert inst_map.dtype == np.int32 and inst_map.shape == (18, 20)
        np.testing.assert_array_equal(inst_map == 1, skimage_mask(outline, size), err_msg=str(outline.tolist()))


def test_overlapping_outlines_go_to_the_nearest_point():
    size = (120, 100)
    nuclei = random_nuclei(150, size, seed=1)
    inst_map = rasterise(nuclei)
    covers = np.stack([skimage_mask(o, size) for o in nuclei.outlines])  # (n, H, W): which outlines cover a pixel
    assert (covers.sum(axis=0) > 1).sum() > 500  # the test has overlaps to resolve
    rows, cols = np.mgrid[:100, :120]
    distance = (cols[None] - nuclei.xy[:, 0, None, None]) ** 2 + (rows[None] - nuclei.xy[:, 1, None, None]) ** 2
    nearest_covering = np.where(covers, distance, np.inf).argmin(axis=0)  # first of equals: the lower index
    expected = np.where(covers.any(axis=0), nearest_covering + 1, 0)
    np.testing.assert_array_equal(inst_map, expected)


def test_two_squares_split_their_overlap_between_their_points():
    left, right = np.array([[0, 0], [6, 0], [6, 4], [0, 4]]), np.array([[4, 0], [10, 0], [10, 4], [4, 4]])
    inst_map = rasterise(Nuclei([[2, 2], [7, 2]], outlines=[left, right]), (11, 5))
    # columns 4-6 are in both; the points' midpoint is x = 4.5: column 4 goes to the first, 5 and 6 to the second
    np.testing.assert_array_equal(inst_map[2], [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2])
    tie = rasterise(Nuclei([[2, 2], [6, 2]], outlines=[left, right]), (11, 5))
    assert tie[2, 4] == 1  # column 4 is 2 px from both points: the lower index wins


def test_none_degenerate_and_outside_outlines_get_no_pixels():
    square = np.array([[1, 1], [4, 1], [4, 4], [1, 4]], dtype=float)
    outlines = [square, None, np.array([[1, 1], [3, 3], [5, 5]]), np.array([[6, 6], [7, 7]]), square + 50,
                square + [5, 0]]
    inst_map = rasterise(Nuclei(np.zeros((6, 2)), outlines=outlines), (12, 8))
    assert sorted(np.unique(inst_map).tolist()) == [0, 1, 6]
    assert (rasterise(Nuclei([[1, 1]]), (4, 3)) == 0).all()  # no outlines at all


def test_rasterise_needs_an_image_size():
    with pytest.raises(ValueError, match="image size"):
        rasterise(Nuclei([[1, 1]], outlines=[None]))


# --- clip_outlines --------------------------------------------------------------------------------------------


def test_clipped_outlines_stay_in_the_image_and_cover_the_same_pixels():
    size = (60, 50)
    nuclei = random_nuclei(200, size, seed=2)
    nuclei.outlines[0] = np.array([[-20.0, -20], [-10, -20], [-10, -10]])  # wholly outside
    clipped = clip_outlines(nuclei)
    assert clipped.outlines[0] is None
    crossing = 0
    for before, after in zip(nuclei.outlines[1:], clipped.outlines[1:]):
        inside = (before >= -0.5).all() and (before[:, 0] <= 59.5).all() and (before[:, 1] <= 49.5).all()
        if inside:
            np.testing.assert_array_equal(after, before)  # untouched
            continue
        crossing += 1
        assert after.min() >= -0.5 and after[:, 0].max() <= 59.5 and after[:, 1].max() <= 49.5
        assert not (after == np.roll(after, 1, axis=0)).all(axis=1).any()  # no repeated vertex
    assert crossing > 20
    np.testing.assert_array_equal(rasterise(clipped), rasterise(nuclei))
    assert clip_outlines(Nuclei([[1, 1]], image_size=(4, 4))).outlines is None


def test_clipping_cuts_a_polygon_at_the_image_edge():
    square = np.array([[-3, 1], [2, 1], [2, 3], [-3, 3]], dtype=float)
    clipped = clip_outlines(Nuclei([[1, 2]], outlines=[square]), (10, 10)).outlines[0]
    np.testing.assert_array_equal(clipped, [[-0.5, 1], [2, 1], [2, 3], [-0.5, 3]])


# --- measure --------------------------------------------------------------------------------------------------


def test_measurements_equal_regionprops():
    size = (200, 150)
    nuclei = random_nuclei(400, size, seed=3)
    odd_shapes = [
        np.array([[10.0, 10], [10.2, 10], [10, 10.2]]),  # covers one pixel centre: a single pixel
        np.array([[20.0, 5], [40, 5], [40, 5.3], [20, 5.3]]),  # one row of pixels
        np.array([[60.0, 20], [80, 20], [80, 40], [60, 40], [60, 36], [76, 36], [76, 24], [60, 24]]),  # a C
        np.array([[100.0, 100], [140, 100], [140, 101], [101, 101], [101, 120], [100, 120]]),  # an L, 2 px thick
    ]
    xy = np.r_[nuclei.xy, [o.mean(axis=0) for o in odd_shapes]]
    nuclei = Nuclei(xy, outlines=list(nuclei.outlines) + odd_shapes, image_size=size, mpp=0.25)
    image = np.random.default_rng(3).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    inst_map = rasterise(nuclei)
    values = measure(nuclei, image)
    assert_equal_measurements(values, regionprops_values(inst_map, image, len(nuclei), 0.25))
    # some masks are cut in two by a nearer neighbour: regionprops takes a label as one region, and so does measure
    assert values["solidity"].min() < 0.7
    assert values["area_um2"][400] == 0.25 ** 2 and values["eccentricity"][400] == 0


def test_nuclei_in_part_of_an_image_measure_as_on_the_whole_image():
    """``measure`` works on the box around the outlines (a slide tile with a few nuclei); the values are those of
    the whole image's instance map, also where outlines run past the image's corner."""
    few = random_nuclei(30, (60, 50), seed=5)
    shift = np.array([234.0, 145.0])  # into the bottom-right corner of a 300 x 200 image: some run past it
    nuclei = Nuclei(few.xy + shift, outlines=[o + shift for o in few.outlines], image_size=(300, 200), mpp=0.25)
    image = np.random.default_rng(5).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    whole = measure(nuclei, image, inst_map=rasterise(nuclei))
    boxed = measure(nuclei, image)
    for name in MEASUREMENTS:
        np.testing.assert_allclose(boxed[name], whole[name], rtol=1e-12, atol=1e-12, err_msg=name)
    assert np.isfinite(boxed["area_um2"]).sum() >= 20


@pytest.mark.filterwarnings("ignore:.*outline\\(s\\) of fewer than 3")
def test_measurements_on_monuseg_equal_regionprops():
    from denuc.datasets import get_dataset
    from denuc.io.images import read_image

    dataset = get_dataset("MoNuSeg", shared_or_skip(SHARED / "datasets" / "monuseg"))
    sample = dataset.sample(dataset.sample_names("test")[0])
    nuclei, image = sample.nuclei, read_image(sample.image_path)
    inst_map = rasterise(nuclei)
    assert len(np.unique(inst_map)) > 300
    values = measure(nuclei, image, inst_map=inst_map)
    assert_equal_measurements(values, regionprops_values(inst_map, image, len(nuclei), nuclei.mpp))


def test_nuclei_without_pixels_measure_nan():
    square = np.array([[1, 1], [4, 1], [4, 4], [1, 4]], dtype=float)
    nuclei = Nuclei(np.full((4, 2), 2.0), outlines=[square, None, np.array([[1, 1], [2, 2], [3, 3]]), square + 50])
    values = measure(nuclei, np.full((8, 8, 3), 128, np.uint8), mpp=0.5)
    for name in MEASUREMENTS:
        assert np.isfinite(values[name][0]), name
        assert np.isnan(values[name][1:]).all(), name
    no_outlines = measure(Nuclei([[1, 1]]), np.zeros((4, 4, 3), np.uint8), mpp=0.5)
    assert all(np.isnan(v).all() for v in no_outlines.values())
    all_outside = measure(Nuclei([[60, 60], [-6, -6]], outlines=[square + 50, square - 10]),
                          np.zeros((8, 8, 3), np.uint8), mpp=0.5)
    assert all(np.isnan(v).all() and len(v) == 2 for v in all_outside.values())


def test_lengths_and_areas_scale_with_the_pixel_size():
    nuclei = random_nuclei(100, (80, 80), seed=4, mpp=0.5)
    image = np.random.default_rng(4).integers(0, 256, (80, 80, 3), dtype=np.uint8)
    at_half, at_quarter = measure(nuclei, image), measure(nuclei, image, mpp=0.25)
    units = {"area_um2": 4, "perimeter_um": 2, "equivalent_diameter_um": 2, "major_axis_um": 2, "minor_axis_um": 2}
    for name in MEASUREMENTS:
        np.testing.assert_allclose(at_half[name], at_quarter[name] * units.get(name, 1), rtol=1e-12, err_msg=name)
    square = Nuclei([[2, 2]], outlines=[np.array([[0, 0], [9, 0], [9, 9], [0, 9]])], mpp=0.5)
    assert measure(square, np.zeros((10, 10, 3), np.uint8))["area_um2"][0] == 100 * 0.25  # 10x10 px of 0.5 um


def test_orientation_follows_regionprops_convention():
    def orientation(angle: float) -> float:
        nuclei = Nuclei([[20, 20]], outlines=[ellipse((20, 20), 12, 4, angle, k=64)], mpp=1)
        return measure(nuclei, np.zeros((41, 41, 3), np.uint8))["orientation_deg"][0]

    assert orientation(0) == pytest.approx(90)  # major axis along x (columns): 90 degrees from the row axis
    assert orientation(np.pi / 2) == pytest.approx(0, abs=1e-9)  # along y (rows, down)
    assert orientation(np.pi / 4) == pytest.approx(45)  # towards the bottom right: +45 (counter-clockwise on screen)
    assert orientation(-np.pi / 4) == pytest.approx(-45)


def test_haematoxylin_od_is_rgb2hed_in_base_10():
    colours = np.array([[60, 40, 140], [200, 120, 190], [250, 250, 250], [90, 20, 80]], dtype=np.uint8)
    image = np.repeat(colours, 10, axis=0)[:, None].repeat(10, axis=1)  # 4 stripes of 10x10
    outlines = [np.array([[0, 10 * i], [9, 10 * i], [9, 10 * i + 9], [0, 10 * i + 9]], dtype=float) for i in range(4)]
    values = measure(Nuclei(np.zeros((4, 2)), outlines=outlines), image, mpp=0.5)["haematoxylin_od_mean"]
    np.testing.assert_allclose(values, haematoxylin_od(colours), rtol=1e-12)
    hed = rgb2hed(colours[None])[0, :, 0]
    positive = hed > 0
    assert positive.sum() >= 2
    np.testing.assert_allclose(values[positive], 6 * hed[positive], rtol=1e-9)


def test_measure_refuses_what_it_cannot_use():
    nuclei = Nuclei([[1, 1]], outlines=[None])
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="pixel size"):
        measure(nuclei, image)
    with pytest.raises(ValueError, match="uint8"):
        measure(nuclei, image.astype(np.float32), mpp=0.5)
    with pytest.raises(ValueError, match="differ in size"):
        measure(nuclei, image, mpp=0.5, inst_map=np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match="nucleus number"):
        measure(nuclei, image, mpp=0.5, inst_map=np.full((4, 4), 2, np.int32))


# --- writing outlines and measurements ------------------------------------------------------------------------


def outlined_nuclei() -> Nuclei:
    classes = [NucleusClass("tumour", (255, 0, 0)), NucleusClass("lymphocyte", (0, 0, 255))]
    outlines = [ellipse((20.25, 30.5), 6.1, 4.3, 0.3, k=17), None, ellipse((60, 10), 3, 3, 0, k=9)]
    return Nuclei([[20.25, 30.5], [40.0, 41.0], [60.0, 10.0]], labels=["tumour", "lymphocyte", "tumour"],
                  scores=[0.9, 0.8, 0.7], probs=[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], classes=classes, mpp=0.5,
                  image_size=(80, 60), outlines=outlines)


def strict_json(text: str):
    def refuse(constant: str):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_geojson_writes_closed_polygons_and_measurements_and_reads_the_outlines_back(tmp_path):
    nuclei = outlined_nuclei()
    image = np.random.default_rng(5).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    values = measure(nuclei, image)
    write_geojson(tmp_path / "n.geojson", nuclei, values)
    features = strict_json((tmp_path / "n.geojson").read_text())["features"]
    for feature, outline in zip(features, nuclei.outlines):
        geometry = feature["geometry"]
        if outline is None:
            assert geometry["type"] == "Point"
            continue
        ring = geometry["coordinates"][0]
        assert geometry["type"] == "Polygon" and len(geometry["coordinates"]) == 1
        assert len(ring) == len(outline) + 1 >= 4 and ring[0] == ring[-1]  # closed, as GeoJSON requires
        np.testing.assert_array_equal(ring[:-1], outline + 0.5)  # QuPath's corner frame
    for i, feature in enumerate(features):
        measured = feature["properties"]["measurements"]
        assert list(measured)[:3] == ["score", "prob: tumour", "prob: lymphocyte"]
        for name in MEASUREMENTS:
            assert measured[name] == (None if np.isnan(values[name][i]) else values[name][i])
    assert features[1]["properties"]["measurements"]["area_um2"] is None  # NaN, which JSON lacks, is null

    back = read_geojson(tmp_path / "n.geojson")
    assert back.outlines[1] is None
    for outline, read in zip(nuclei.outlines[::2], back.outlines[::2]):
        np.testing.assert_allclose(read, outline, rtol=0, atol=1e-12)  # x + 0.5 - 0.5 may round the last bit
    np.testing.assert_array_equal(back.xy[1], nuclei.xy[1])  # a Point keeps its place
    np.testing.assert_allclose(back.scores, nuclei.scores)
    np.testing.assert_allclose(back.probs, nuclei.probs)


def test_geojson_without_outlines_is_points_as_before(tmp_path):
    nuclei = outlined_nuclei()
    nuclei.outlines = None
    write_geojson(tmp_path / "p.geojson", nuclei)
    features = strict_json((tmp_path / "p.geojson").read_text())["features"]
    assert [f["geometry"]["type"] for f in features] == ["Point"] * 3
    assert read_geojson(tmp_path / "p.geojson").outlines is None


def test_geojson_refuses_bad_measurements_and_outlines(tmp_path):
    nuclei = outlined_nuclei()
    with pytest.raises(ValueError, match="one value for each of 3"):
        write_geojson(tmp_path / "a.geojson", nuclei, {"area_um2": np.zeros(2)})
    with pytest.raises(ValueError, match="reserved"):
        write_geojson(tmp_path / "a.geojson", nuclei, {"score": np.zeros(3)})
    nuclei.outlines[0] = nuclei.outlines[0].copy()
    nuclei.outlines[0][2, 0] = np.nan
    with pytest.raises(ValueError, match="outline of nucleus 0"):
        write_geojson(tmp_path / "a.geojson", nuclei)
    assert not list(tmp_path.iterdir())


def test_geojson_reads_multipolygon_outline_as_its_largest_polygon(tmp_path):
    small, large = [[0, 0], [1, 0], [1, 1], [0, 0]], [[5, 5], [9, 5], [9, 9], [5, 9], [5, 5]]
    feature = {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[small], [large]]},
               "properties": {"objectType": "detection"}}
    (tmp_path / "m.geojson").write_text(json.dumps([feature]))
    np.testing.assert_array_equal(read_geojson(tmp_path / "m.geojson").outlines[0], np.array(large[:-1]) - 0.5)


def test_table_writer_adds_measurement_columns_and_polygons(tmp_path):
    nuclei = outlined_nuclei()
    values = measure(nuclei, np.full((60, 80, 3), 100, np.uint8))
    with NucleusTableWriter(tmp_path / "s", nuclei.classes, mpp=0.5, measurements=MEASUREMENTS) as tables:
        tables.write(nuclei.subset([0, 1]), {name: v[:2] for name, v in values.items()})
        tables.write(nuclei.subset([2]), {name: v[2:] for name, v in values.items()})
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.column_names[-len(MEASUREMENTS):] == list(MEASUREMENTS)
    for name in MEASUREMENTS:
        np.testing.assert_array_equal(table.column(name).to_numpy(), values[name])  # NaN where NaN
    header = (tmp_path / "s.csv").read_text().splitlines()[0].split(",")
    assert header[-len(MEASUREMENTS):] == list(MEASUREMENTS)
    features = strict_json((tmp_path / "s.geojson").read_text())["features"]
    assert [f["geometry"]["type"] for f in features] == ["Polygon", "Point", "Polygon"]
    assert features[0]["properties"]["measurements"]["solidity"] == values["solidity"][0]
    back = read_geojson(tmp_path / "s.geojson")
    np.testing.assert_allclose(back.outlines[2], nuclei.outlines[2], rtol=0, atol=1e-12)

    with pytest.raises(ValueError, match="repeat a column"):
        NucleusTableWriter(tmp_path / "t", nuclei.classes, mpp=0.5, measurements=["x_um"])
    with pytest.raises(ValueError, match="differ from the table's"):
        with NucleusTableWriter(tmp_path / "t", nuclei.classes, mpp=0.5, measurements=MEASUREMENTS) as tables:
            tables.write(nuclei)
