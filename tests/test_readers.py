"""Readers of the field's datasets in their published formats: CoNSeP and MoNuSeg on the real copies in the shared
data (skipped when absent), PUMA, OCELOT, PanNuke and Lizard on small copies written here in the exact published
layouts and formats (see each reader's docstring for its sources)."""

from __future__ import annotations

import json
import re
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import tifffile
from conftest import SHARED, shared_or_skip
from PIL import Image
from scipy import ndimage

from denuc.datasets import DATASETS, OCELOT, PUMA, CoNSeP, Lizard, MoNuSeg, PanNuke, get_dataset
from denuc.datasets.consep import source_image
from denuc.datasets.monuseg import ORGANS, area_centroid, read_annotation_file
from denuc.errors import InputError

CONSEP = SHARED / "datasets" / "consep"
MONUSEG = SHARED / "datasets" / "monuseg"


def test_every_reader_is_registered_with_its_pixel_size():
    assert {"consep", "monuseg", "puma", "ocelot", "pannuke", "lizard"} <= set(DATASETS)
    assert {name: DATASETS[name].mpp for name in ("consep", "pannuke", "lizard")} == {
        "consep": 0.25, "pannuke": 0.25, "lizard": 0.5}
    assert MoNuSeg.classes == ()  # detection only


# --- CoNSeP, real crops -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def consep():
    dataset = get_dataset("consep", shared_or_skip(CONSEP))
    return dataset, {split: dataset.samples(split) for split in dataset.splits}


def test_consep_split_is_by_source_image_as_the_card_says(consep):
    dataset, samples = consep
    card = json.loads((CONSEP / "splits.json").read_text())
    for split, items in samples.items():
        assert [len(items), sum(len(s.nuclei) for s in items)] == card["crops_and_nuclei"][split]
        assert {source_image(s.name) for s in items} == set(card["splits"][split])
    assert dataset._seven_ids is False  # the crops store HoVer-Net's 4 ids already
    # the card's class counts over all 432 crops
    counts = Counter(label for items in samples.values() for s in items for label in s.nuclei.labels)
    assert counts == {"other": 432, "inflammatory": 4507, "epithelial": 6609, "spindle": 6668}


def test_consep_centroids_are_x_y_centres_of_mass_on_dark_nuclei(consep):
    _, samples = consep
    at_points, swapped = [], []
    for sample in samples["val"]:
        inst_map = scipy.io.loadmat(sample.image_path.parents[1] / "Labels" / f"{sample.name}.mat")["inst_map"]
        ids = np.arange(1, inst_map.max() + 1)
        rows_cols = np.array(ndimage.center_of_mass(np.ones_like(inst_map), inst_map, ids)).reshape(-1, 2)
        np.testing.assert_allclose(sample.nuclei.xy, rows_cols[:, ::-1], atol=1e-6)
        grey = sample.read_image().mean(axis=2)
        col, row = np.round(sample.nuclei.xy).astype(int).T
        at_points.append(grey[row, col])
        swapped.append(grey[col, row])
    # nuclei are dark: over the 3,669 validation nuclei the grey level at (x, y) is about 128, at (y, x) about 176,
    # the images' mean
    assert np.concatenate(at_points).mean() < np.concatenate(swapped).mean() - 30


def _write_release_consep(root: Path, files: dict[str, list[tuple[int, float, float]]]) -> None:
    """An original-release layout: Train|Test/Images/<name>.png, Labels/<name>.mat with inst_type as float."""
    for name, nuclei in files.items():
        split = "Test" if name.startswith("test_") else "Train"
        (root / split / "Images").mkdir(parents=True, exist_ok=True)
        (root / split / "Labels").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(root / split / "Images" / f"{name}.png")
        inst_type = np.array([[t] for t, _, _ in nuclei], dtype=np.float64).reshape(-1, 1)
        centroid = np.array([(x, y) for _, x, y in nuclei], dtype=np.float64).reshape(-1, 2)
        scipy.io.savemat(root / split / "Labels" / f"{name}.mat",
                         {"inst_map": np.zeros((40, 40), np.int32), "type_map": np.zeros((40, 40), np.int32),
                          "inst_type": inst_type, "inst_centroid": centroid})


def test_consep_release_merges_seven_ids_and_tests_on_test(tmp_path):
    _write_release_consep(tmp_path, {
        "train_1": [(1, 5, 6), (2, 7, 8), (3, 9, 10), (4, 11, 12), (5, 13, 14), (6, 15, 16), (7, 17, 18)],
        "train_8": [(4, 20, 20)], "train_9": [], "train_18": [(2, 1, 1)], "test_1": [(7, 30, 31)],
    })
    dataset = CoNSeP(tmp_path)
    assert dataset.sample_names("train") == ["train_1", "train_9"]  # train_9 is trained on: Test/ exists
    assert dataset.sample_names("val") == ["train_8", "train_18"]
    assert dataset.sample_names("test") == ["test_1"]
    nuclei = dataset.sample("train_1").nuclei
    assert nuclei.labels.tolist() == ["other", "inflammatory", "epithelial", "epithelial", "spindle", "spindle",
                                      "spindle"]
    assert nuclei.xy[0].tolist() == [5, 6] and nuclei.mpp == 0.25 and nuclei.image_size == (40, 40)
    assert dataset.sample("train_8").nuclei.labels.tolist() == ["epithelial"]  # a 4 in a seven-id copy


def test_consep_four_id_copy_keeps_four_as_spindle_and_holds_out_test(tmp_path):
    _write_release_consep(tmp_path, {"train_1_000": [(4, 5, 5)], "train_9_003": [(1, 2, 2)], "train_8_001": []})
    dataset = CoNSeP(tmp_path)
    assert dataset.sample("train_1_000").nuclei.labels.tolist() == ["spindle"]
    assert {split: dataset.sample_names(split) for split in dataset.splits} == {
        "train": ["train_1_000"], "val": ["train_8_001"], "test": ["train_9_003"]}


def test_consep_bad_files_are_named(tmp_path):
    _write_release_consep(tmp_path, {"train_1": [(9, 5, 5)]})
    with pytest.raises(InputError, match=r"train_1.mat: unknown class id\(s\) \[9\]"):
        CoNSeP(tmp_path).sample("train_1")
    _write_release_consep(tmp_path, {"train_1": [(1, 55, 5)]})
    with pytest.raises(InputError, match=r"train_1.mat: instance 1: point \(55.0, 5.0\) lies outside the 40x40 image"):
        CoNSeP(tmp_path).sample("train_1")
    with pytest.raises(InputError, match="not a CoNSeP copy"):
        CoNSeP(tmp_path / "Train" / "Images")


# --- MoNuSeg, real images ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def monuseg():
    dataset = get_dataset("monuseg", shared_or_skip(MONUSEG))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = {split: dataset.samples(split) for split in dataset.splits}
    return dataset, samples, [str(w.message) for w in caught]


def test_monuseg_split_by_organ(monuseg):
    _, samples, _ = monuseg
    names = {split: [s.name for s in items] for split, items in samples.items()}
    assert sorted(sum(names.values(), [])) == sorted(ORGANS)  # every image once
    organs = {split: Counter(ORGANS[name] for name in items) for split, items in names.items()}
    assert organs["test"] == {"breast": 1, "kidney": 1, "liver": 1, "prostate": 1}
    assert organs["val"] == {"breast": 1, "kidney": 1, "liver": 1}
    assert set(organs["train"]) == {"breast", "kidney", "liver", "prostate", "colon"}


def test_monuseg_one_nucleus_per_region_at_the_file_pixel_size(monuseg):
    _, samples, caught = monuseg
    for sample in (s for items in samples.values() for s in items):
        root = ET.parse(MONUSEG / "MoNuSegTrainingData" / "Annotations" / f"{sample.name}.xml").getroot()
        assert len(sample.nuclei) == len(list(root.iter("Region")))
        assert sample.nuclei.mpp == float(root.get("MicronsPerPixel", MoNuSeg.mpp))
        assert sample.nuclei.image_size == (1000, 1000) and sample.nuclei.classes == []
    assert any("TCGA-NH-A8F7-01A-01-TS1.xml: no MicronsPerPixel" in message for message in caught)


def test_monuseg_centroids_lie_inside_their_outlines(monuseg):
    _, samples, _ = monuseg
    inside = total = 0
    for sample in (s for items in samples.values() for s in items):
        root = ET.parse(MONUSEG / "MoNuSegTrainingData" / "Annotations" / f"{sample.name}.xml").getroot()
        for centre, region in zip(sample.nuclei.xy, root.iter("Region")):
            outline = np.array([(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")])
            inside += _inside(centre, outline)
            total += 1
    assert inside >= total - 5  # slivers placed at their vertex mean, and bean-shaped nuclei (docstring)


def _inside(point: np.ndarray, polygon: np.ndarray) -> bool:
    """Even-odd rule."""
    (x, y), (xs, ys) = point, polygon.T
    xn, yn = np.roll(xs, -1), np.roll(ys, -1)
    crosses = (ys > y) != (yn > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = xs + (y - ys) * (xn - xs) / (yn - ys)
    return bool(np.count_nonzero(crosses & (x < x_at)) % 2)


def test_area_centroid():
    square = np.array([[0, 0], [4, 0], [4, 4], [0, 4]], dtype=float)
    np.testing.assert_allclose(area_centroid(square), [2, 2])
    np.testing.assert_allclose(area_centroid(np.vstack([square, square[:1]])), [2, 2])  # closed ring: same
    # an L of two unit-area squares at (0.5, 0.5) and (1.5, 0.5) plus one at (0.5, 1.5): mean of the three
    ell = np.array([[0, 0], [2, 0], [2, 1], [1, 1], [1, 2], [0, 2]], dtype=float)
    np.testing.assert_allclose(area_centroid(ell), [2.5 / 3, 2.5 / 3])
    assert area_centroid(ell + 1e5) is not None and np.allclose(area_centroid(ell + 1e5), 1e5 + 2.5 / 3)
    assert area_centroid(np.array([[0, 0], [1, 1], [0, 0]], dtype=float)) is None  # 2 distinct vertices
    assert area_centroid(np.array([[0, 0], [1, 0.1], [2, 0.2], [3, 0.1]])) is None  # a sliver of 0.2 px²


def _write_monuseg_xml(path: Path, outlines: list[list[tuple[float, float]]], mpp: str | None = "0.25") -> None:
    regions = "".join(
        f'<Region Id="{k + 1}" Type="0"><Attributes/><Vertices>'
        + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in outline) + "</Vertices></Region>"
        for k, outline in enumerate(outlines))
    attribute = f' MicronsPerPixel="{mpp}"' if mpp is not None else ""
    path.write_text(f'<Annotations{attribute}><Annotation Id="1"><Regions>{regions}</Regions></Annotation>'
                    "</Annotations>")


def test_monuseg_release_with_its_test_set(tmp_path):
    training = tmp_path / "MoNuSeg 2018 Training Data"
    (training / "Tissue Images").mkdir(parents=True)
    (training / "Annotations").mkdir()
    (tmp_path / "MoNuSegTestData").mkdir()
    for folder, name in [(training, "TCGA-B0-5711-01Z-00-DX1"), (training, "TCGA-B0-5710-01Z-00-DX1"),
                         (training, "TCGA-X"), (tmp_path / "MoNuSegTestData", "TCGA-T")]:
        images = folder / "Tissue Images" if folder == training else folder
        labels = folder / "Annotations" if folder == training else folder
        tifffile.imwrite(images / f"{name}.tif", np.full((30, 30, 3), 180, np.uint8))
        _write_monuseg_xml(labels / f"{name}.xml", [[(2, 2), (6, 2), (6, 6), (2, 6)], [(10, 10), (14, 10), (12, 14)]],
                           mpp="0.2456")
    dataset = MoNuSeg(tmp_path)
    assert {split: dataset.sample_names(split) for split in dataset.splits} == {
        "train": ["TCGA-B0-5711-01Z-00-DX1", "TCGA-X"], "val": ["TCGA-B0-5710-01Z-00-DX1"], "test": ["TCGA-T"]}
    nuclei = dataset.sample("TCGA-T").nuclei
    np.testing.assert_allclose(nuclei.xy, [[4, 4], [12, 34 / 3]])
    assert nuclei.mpp == 0.2456


def test_monuseg_bad_files_are_named(tmp_path):
    _write_monuseg_xml(tmp_path / "a.xml", [[(1, 1), (2, 1), (2, 2)]], mpp="abc")
    with pytest.raises(InputError, match=r"a.xml: MicronsPerPixel must be a positive number, got 'abc'"):
        read_annotation_file(tmp_path / "a.xml")
    (tmp_path / "b.xml").write_text('<Annotations MicronsPerPixel="0.25"><Region Id="7"><Vertices><Vertex X="1"/>'
                                    "</Vertices></Region></Annotations>")
    with pytest.raises(InputError, match=r"b.xml: Region 7: a Vertex without numeric X and Y"):
        read_annotation_file(tmp_path / "b.xml")
    (tmp_path / "c.xml").write_text("<Annotations>")
    with pytest.raises(InputError, match=r"c.xml: not valid XML"):
        read_annotation_file(tmp_path / "c.xml")
    _write_monuseg_xml(tmp_path / "d.xml", [[(1, 1), (3, 3), (1, 1)]])
    with pytest.warns(UserWarning, match=r"d.xml: 1 outline\(s\) of fewer than 3 distinct vertices"):
        assert read_annotation_file(tmp_path / "d.xml").xy.tolist() == [[5 / 3, 5 / 3]]
    with pytest.raises(InputError, match="not a MoNuSeg copy"):
        MoNuSeg(tmp_path)


# --- PUMA ---------------------------------------------------------------------------------------------------------


def _polygon_feature(ring: list[list[float]], name: str, multi: list[list[list[float]]] | None = None) -> dict:
    """A nucleus as the PUMA files hold it: a QuPath-style feature with a closed ring and a classification."""
    closed = [ring + ring[:1]]
    geometry = ({"type": "Polygon", "coordinates": closed} if multi is None else
                {"type": "MultiPolygon", "coordinates": [closed] + [[part + part[:1]] for part in multi]})
    return {"type": "Feature", "id": "5c7c1a8a-0000-4000-8000-000000000000", "geometry": geometry,
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": [255, 0, 0]}}}


def _write_puma(root: Path, rois: dict[str, list[dict]], resolution: tuple | None = None) -> None:
    (root / "01_training_dataset_tif_ROIs").mkdir(parents=True, exist_ok=True)
    (root / "01_training_dataset_geojson_nuclei").mkdir(parents=True, exist_ok=True)
    for name, features in rois.items():
        rgba = np.full((64, 64, 4), 255, np.uint8)
        extra = {} if resolution is None else {"resolution": resolution[:2], "resolutionunit": resolution[2]}
        tifffile.imwrite(root / "01_training_dataset_tif_ROIs" / f"{name}.tif", rgba, **extra)
        (root / "01_training_dataset_geojson_nuclei" / f"{name}_nuclei.geojson").write_text(
            json.dumps({"type": "FeatureCollection", "features": features}))


def test_puma_vertex_means_in_the_three_track_one_classes(tmp_path):
    square = [[10.0, 10.0], [20.0, 10.0], [20.0, 20.0], [10.0, 20.0]]
    kite = [[40.0, 40.0], [44.0, 40.0], [50.0, 50.0]]  # vertex mean (44.67, 43.33), area centroid elsewhere
    features = [_polygon_feature(square, "nuclei_tumor"), _polygon_feature(kite, "nuclei_plasma_cell"),
                _polygon_feature(square, "nuclei_lymphocyte"), _polygon_feature(kite, "nuclei_apoptosis"),
                _polygon_feature(square, "nuclei_melanophage", multi=[[[30.0, 30.0], [31.0, 30.0], [31.0, 31.0]]])]
    # 0.226 um/px in TIFF tags: 1e4 / 0.226 pixels per centimetre
    _write_puma(tmp_path, {"training_set_primary_roi_001": features}, resolution=(1e4 / 0.226, 1e4 / 0.226, 3))
    sample = PUMA(tmp_path).sample("training_set_primary_roi_001")
    nuclei = sample.nuclei
    assert nuclei.labels.tolist() == ["tumour", "TILs", "TILs", "other", "other"]
    np.testing.assert_allclose(nuclei.xy[:2], [[14.5, 14.5], [134 / 3 - 0.5, 130 / 3 - 0.5]])
    np.testing.assert_allclose(nuclei.xy[4], np.mean(square + [[30, 30], [31, 30], [31, 31]], axis=0) - 0.5)
    assert nuclei.mpp == pytest.approx(0.226) and nuclei.image_size == (64, 64)
    assert sample.read_image().shape == (64, 64, 3)  # RGBA composited


def test_puma_default_split_and_split_file(tmp_path):
    names = [f"training_set_{kind}_roi_{k:03d}" for kind in ("primary", "metastatic") for k in range(1, 12)]
    _write_puma(tmp_path, {name: [] for name in names})
    dataset = PUMA(tmp_path)
    assert dataset.sample("training_set_primary_roi_001").nuclei.mpp == PUMA.mpp  # no resolution tags
    for kind in ("primary", "metastatic"):
        assert [n for n in dataset.sample_names("test") if kind in n] == [f"training_set_{kind}_roi_{k:03d}"
                                                                          for k in (9, 10)]
        assert [n for n in dataset.sample_names("val") if kind in n] == [f"training_set_{kind}_roi_008"]
    assert len(dataset.sample_names("train")) == 16
    (tmp_path / "splits.json").write_text(json.dumps({"train": names[:-2], "val": [names[-2]], "test": [names[-1]]}))
    assert PUMA(tmp_path).sample_names("test") == [names[-1]]
    (tmp_path / "splits.json").write_text(json.dumps({"train": names[:-2], "test": [names[-1]]}))
    with pytest.raises(InputError, match="in no list"):
        PUMA(tmp_path)


def test_puma_bad_features_are_named(tmp_path):
    _write_puma(tmp_path, {"training_set_primary_roi_001": [_polygon_feature([[1, 1], [2, 1], [2, 2]], "nuclei_x")]})
    with pytest.raises(InputError, match=r"roi_001_nuclei.geojson: feature 0: unknown class 'nuclei_x'"):
        PUMA(tmp_path).sample("training_set_primary_roi_001")
    point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]},
             "properties": {"classification": {"name": "nuclei_tumor"}}}
    _write_puma(tmp_path, {"training_set_primary_roi_001": [point]})
    with pytest.raises(InputError, match=r"feature 0: expected a Polygon or MultiPolygon"):
        PUMA(tmp_path).sample("training_set_primary_roi_001")


# --- OCELOT -------------------------------------------------------------------------------------------------------


def _write_ocelot(root: Path, cells: dict[tuple[str, str], str], mpp: float = 0.194) -> None:
    pairs = {}
    for (split, name), text in cells.items():
        (root / "images" / split / "cell").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split / "cell").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((1024, 1024, 3), 220, np.uint8)).save(root / "images" / split / "cell" / f"{name}.jpg")
        (root / "annotations" / split / "cell" / f"{name}.csv").write_text(text)
        # the fields of ocelot23algo's test/input/metadata.json, under the release's "sample_pairs"
        pairs[name] = {"slide_name": "TCGA-A3-3328", "cell": {"x_start": 0, "y_start": 0, "x_end": 808, "y_end": 808,
                                                              "resized_mpp_x": mpp, "resized_mpp_y": mpp},
                       "tissue": {"resized_mpp_x": 0.78, "resized_mpp_y": 0.78}, "mpp_x": 0.2462, "mpp_y": 0.2462,
                       "organ": "kidney", "subset": split}
    (root / "metadata.json").write_text(json.dumps({"sample_pairs": pairs}))


def test_ocelot_cells_classes_splits_and_pixel_size(tmp_path):
    _write_ocelot(tmp_path, {("train", "001"): "10,20,1\n1023,0,2\n", ("val", "002"): "", ("test", "003"): "5,5,2\n"})
    dataset = OCELOT(tmp_path)
    assert {split: dataset.sample_names(split) for split in dataset.splits} == {
        "train": ["001"], "val": ["002"], "test": ["003"]}
    nuclei = dataset.sample("001").nuclei
    assert nuclei.xy.tolist() == [[10, 20], [1023, 0]]
    assert nuclei.labels.tolist() == ["background", "tumour"]
    assert nuclei.mpp == 0.194 and nuclei.image_size == (1024, 1024)
    assert len(dataset.sample("002").nuclei) == 0


def test_ocelot_bad_cells_are_named(tmp_path):
    _write_ocelot(tmp_path, {("train", "001"): "10,20,1\n10,20,3\n"})
    with pytest.raises(InputError, match=r"001.csv: line 2: unknown class 3"):
        OCELOT(tmp_path).sample("001")
    _write_ocelot(tmp_path, {("train", "001"): "10,20\n"})
    with pytest.raises(InputError, match=r"001.csv: line 1: expected three integers"):
        OCELOT(tmp_path).sample("001")
    _write_ocelot(tmp_path, {("train", "001"): "1024,20,1\n"})
    with pytest.raises(InputError, match=r"001.csv: line 1: point .* lies outside the 1024x1024 image"):
        OCELOT(tmp_path).sample("001")
    (tmp_path / "metadata.json").write_text(json.dumps({"sample_pairs": {}}))
    with pytest.raises(InputError, match=r"metadata.json: sample_pairs\['001'\].cell: no resized_mpp_x"):
        OCELOT(tmp_path).sample("001")


# --- PanNuke ------------------------------------------------------------------------------------------------------


def _write_pannuke(root: Path, masks_per_fold: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    images = {}
    for fold, masks in masks_per_fold.items():
        (root / f"Fold {fold}" / "images" / f"fold{fold}").mkdir(parents=True)
        (root / f"Fold {fold}" / "masks" / f"fold{fold}").mkdir(parents=True)
        rgb = np.random.default_rng(fold).integers(0, 256, (len(masks), 16, 16, 3)).astype(np.float64)
        np.save(root / f"Fold {fold}" / "images" / f"fold{fold}" / "images.npy", rgb)  # float64, as released
        np.save(root / f"Fold {fold}" / "images" / f"fold{fold}" / "types.npy", np.array(["Breast"] * len(masks)))
        np.save(root / f"Fold {fold}" / "masks" / f"fold{fold}" / "masks.npy", masks.astype(np.float64))
        images[fold] = rgb
    return images


def test_pannuke_centres_per_instance_and_channel(tmp_path):
    mask = np.zeros((2, 16, 16, 6))
    mask[0, 2:4, 2:6, 0] = 3  # neoplastic id 3: rows 2-3, cols 2-5 -> (x, y) = (3.5, 2.5)
    mask[0, 10:13, 10:11, 0] = 7  # neoplastic id 7 -> (10, 11)
    mask[0, 5, 12, 1] = 3  # the same id in another channel is another nucleus: inflammatory at (12, 5)
    mask[0, 8:10, 0:2, 4] = 1  # epithelial -> (0.5, 8.5)
    mask[0, :, :, 5] = 1  # background channel: ignored
    images = _write_pannuke(tmp_path, {1: mask, 2: mask[:1], 3: mask[1:]})
    dataset = PanNuke(tmp_path)
    assert {split: dataset.sample_names(split) for split in dataset.splits} == {
        "train": ["fold1_0000", "fold1_0001"], "val": ["fold2_0000"], "test": ["fold3_0000"]}
    sample = dataset.sample("fold1_0000")
    assert sample.nuclei.xy.tolist() == [[3.5, 2.5], [10, 11], [12, 5], [0.5, 8.5]]
    assert sample.nuclei.labels.tolist() == ["neoplastic", "neoplastic", "inflammatory", "epithelial"]
    assert sample.nuclei.mpp == 0.25 and sample.nuclei.image_size == (16, 16)
    assert len(dataset.sample("fold1_0001").nuclei) == 0
    pixels = sample.read_image()
    assert pixels.dtype == np.uint8 and np.array_equal(pixels, images[1][0].astype(np.uint8))
    with pytest.raises(InputError, match="fold 2 has 1 images, no 'fold2_0005'"):
        dataset.sample("fold2_0005")


def test_pannuke_checks_the_arrays(tmp_path):
    _write_pannuke(tmp_path, {1: np.zeros((1, 16, 16, 5))})
    with pytest.raises(InputError, match=r"fold 1 masks.npy must be \(1, 16, 16, 6\)"):
        PanNuke(tmp_path).samples("train")
    with pytest.raises(InputError, match=r"Fold 2/images/fold2/images.npy: pannuke file not found"):
        PanNuke(tmp_path).samples("val")


# --- Lizard -------------------------------------------------------------------------------------------------------


def _write_lizard(root: Path, labels: dict[str, tuple[int, list[tuple[int, int, float, float]]]]) -> None:
    """``labels``: name -> (fold, [(instance id, class, x, y)]); images alternate between the two image zips."""
    (root / "lizard_labels" / "Lizard_Labels" / "Labels").mkdir(parents=True)
    rows = ["Filename,Source,Split"]
    for k, (name, (fold, nuclei)) in enumerate(labels.items()):
        folder = root / (f"lizard_images{k % 2 + 1}/Lizard_Images{k % 2 + 1}")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(folder / f"{name}.png")
        inst_map = np.zeros((30, 40), np.int32)
        for inst, _, x, y in nuclei:
            inst_map[int(y), int(x)] = inst
        scipy.io.savemat(root / "lizard_labels" / "Lizard_Labels" / "Labels" / f"{name}.mat", {
            "inst_map": inst_map,
            "id": np.array([[i] for i, _, _, _ in nuclei], np.int32).reshape(-1, 1),
            "class": np.array([[c] for _, c, _, _ in nuclei], np.int32).reshape(-1, 1),
            "bbox": np.array([[y, y + 1, x, x + 1] for _, _, x, y in nuclei], np.int32).reshape(-1, 4),
            "centroid": np.array([[x, y] for _, _, x, y in nuclei], np.float64).reshape(-1, 2)})
        rows.append(f"{name},source of {name},{fold}")
    (root / "lizard_labels" / "Lizard_Labels" / "info.csv").write_text("\n".join(rows) + "\n")


def test_lizard_centroids_classes_and_folds(tmp_path):
    _write_lizard(tmp_path, {"consep_1": (3, [(2, 6, 35.0, 5.5), (1, 5, 3.25, 20.0)]),
                             "glas_1": (1, [(1, 1, 1.0, 1.0), (2, 2, 2.0, 2.0), (3, 3, 3.0, 3.0), (4, 4, 4.0, 4.0)]),
                             "crag_2": (2, [])})
    dataset = Lizard(tmp_path)
    assert {split: dataset.sample_names(split) for split in dataset.splits} == {
        "train": ["glas_1"], "val": ["crag_2"], "test": ["consep_1"]}
    nuclei = dataset.sample("consep_1").nuclei
    assert nuclei.xy.tolist() == [[3.25, 20.0], [35.0, 5.5]]  # (x, y), in instance id order
    assert nuclei.labels.tolist() == ["eosinophil", "connective"]
    assert nuclei.mpp == 0.5 and nuclei.image_size == (40, 30)
    assert dataset.sample("glas_1").nuclei.labels.tolist() == ["neutrophil", "epithelial", "lymphocyte", "plasma"]
    assert len(dataset.sample("crag_2").nuclei) == 0


def test_lizard_bad_files_are_named(tmp_path):
    _write_lizard(tmp_path, {"glas_1": (1, [(1, 7, 1.0, 1.0)])})
    with pytest.raises(InputError, match=r"glas_1.mat: unknown class id\(s\) \[7\]"):
        Lizard(tmp_path).sample("glas_1")
    scipy.io.savemat(tmp_path / "lizard_labels" / "Lizard_Labels" / "Labels" / "glas_1.mat", {"id": [[1]]})
    with pytest.raises(InputError, match=re.escape("glas_1.mat: no ['class', 'centroid'] array(s); the file holds "
                                                   "['id']")):
        Lizard(tmp_path).sample("glas_1")
    (tmp_path / "lizard_labels" / "Lizard_Labels" / "info.csv").write_text("Filename,Source,Split\nglas_1,x,4\n")
    with pytest.raises(InputError, match=r"info.csv: line 2: expected a Filename and a Split of 1, 2 or 3"):
        Lizard(tmp_path)
