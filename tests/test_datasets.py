"""Dataset readers: on the real BRCAM2C and CRCHisto copies in the shared data when present, and on small fakes."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from conftest import SAMPLE_IMAGE, SAMPLE_POINTS, SHARED, shared_or_skip
from PIL import Image

from denuc.datasets import BRCAM2C, CRCHisto, get_dataset
from denuc.datasets.brcam2c import read_label_file
from denuc.datasets.crchisto import label_detections, pair_points
from denuc.errors import InputError
from denuc.io import read_points
from denuc.nuclei import UNLABELLED, Nuclei


def shared_root(name: str) -> Path:
    return shared_or_skip(SHARED / "datasets" / name)


def load_all(dataset) -> tuple[dict[str, list], list[str]]:
    """Samples per split, and the warnings loading them gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = {split: dataset.samples(split) for split in dataset.splits}
    return samples, [str(w.message) for w in caught]


# --- BRCAM2C -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def brcam2c():
    dataset = get_dataset("BRCAM2C", shared_root("brcam2c"))
    samples, caught = load_all(dataset)
    assert caught == []
    return dataset, samples


def test_brcam2c_splits_and_metadata(brcam2c):
    dataset, samples = brcam2c
    assert {split: len(s) for split, s in samples.items()} == {"train": 80, "val": 10, "test": 30}
    assert [s.name for s in dataset.samples("validation")] == [s.name for s in samples["val"]]
    assert dataset.mpp == 0.5
    assert [c.name for c in dataset.classes] == ["lymphocyte", "tumour", "stromal"]
    names = [s.name for split in samples.values() for s in split]
    assert len(set(names)) == 120
    for sample in samples["val"]:
        assert sample.dataset == "brcam2c"
        assert sample.image_path.name == f"{sample.name}.png"
        assert sample.nuclei.image_size == Image.open(sample.image_path).size
        assert sample.nuclei.mpp == 0.5
        assert sample.nuclei.class_names == ["lymphocyte", "tumour", "stromal"]


def test_brcam2c_counts(brcam2c):
    _, samples = brcam2c
    counts = Counter(label for split in samples.values() for s in split for label in s.nuclei.labels)
    assert counts == {"tumour": 16798, "stromal": 7981, "lymphocyte": 5859}  # the label files hold 30,638 lines


def test_brcam2c_rows_come_first_in_the_files(brcam2c):
    dataset, samples = brcam2c
    sample = samples["train"][0]
    raw = (dataset.root / "labels" / f"{sample.name}_gt_class_coords.txt").read_text().split("\n")[0].split()
    row, col, class_id = int(raw[0]), int(raw[1]), int(raw[2])
    assert row != col
    assert tuple(sample.nuclei.xy[0]) == (col, row)
    assert sample.nuclei.labels[0] == ["lymphocyte", "tumour", "stromal"][class_id - 1]


def test_packaged_sample_points_are_its_brcam2c_labels(brcam2c):
    """denuc/data/sample_brcam2c.csv is the label file of the image packaged as the sample, as the reader reads it."""
    _, samples = brcam2c
    truth = next(s for s in samples["test"] if s.name == "TCGA-A8-A099-01Z-00-DX1_29501_22501_1000_1000_0.93")
    assert truth.image_path.read_bytes() == SAMPLE_IMAGE.read_bytes()
    packaged = read_points(SAMPLE_POINTS, classes=truth.nuclei.classes)
    np.testing.assert_array_equal(packaged.xy, truth.nuclei.xy)
    assert packaged.labels.tolist() == truth.nuclei.labels.tolist()


def test_brcam2c_label_file_edge_cases(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert len(read_label_file(empty, (10, 10))) == 0
    bad_id = tmp_path / "bad_id.txt"
    bad_id.write_text("1 2 1\n\n3 4 7\n")
    with pytest.raises(InputError, match=r"bad_id.txt: line 3: unknown class id 7"):
        read_label_file(bad_id)
    short = tmp_path / "short.txt"
    short.write_text("1 2\n")
    with pytest.raises(InputError, match=r"short.txt: line 1: expected 3 fields"):
        read_label_file(short)
    outside = tmp_path / "outside.txt"
    outside.write_text("1 2 1\n12 3 2\n")  # row 12 of a 10-row image
    with pytest.raises(InputError, match=r"outside.txt: line 2: point \(3.0, 12.0\) lies outside the 20x10 image"):
        read_label_file(outside, (20, 10))


def test_brcam2c_missing_files_are_named(tmp_path):
    with pytest.raises(InputError, match="brcam2c dataset folder not found"):
        BRCAM2C(tmp_path / "nowhere")
    dataset = BRCAM2C(tmp_path)
    with pytest.raises(InputError, match="brca_ds_test.txt: brcam2c file not found"):
        dataset.samples("test")
    (tmp_path / "brca_ds_test.txt").write_text("a.png\n")
    with pytest.raises(InputError, match=r"images/a.png: brcam2c file not found"):
        dataset.samples("test")
    with pytest.raises(InputError, match="unknown split 'dev'"):
        dataset.samples("dev")


# --- CRCHisto ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crchisto():
    dataset = CRCHisto(shared_root("crchisto"))
    samples, caught = load_all(dataset)
    return dataset, samples, caught


def test_crchisto_splits_and_metadata(crchisto):
    dataset, samples, _ = crchisto
    assert {split: len(s) for split, s in samples.items()} == {"train": 70, "val": 10, "test": 20}
    assert len({s.name for split in samples.values() for s in split}) == 100
    assert dataset.mpp == 0.55
    sample = samples["train"][0]
    assert sample.image_path == dataset.root / sample.name / f"{sample.name}.bmp"
    assert sample.nuclei.image_size == (500, 500)


def test_crchisto_counts(crchisto):
    _, samples, caught = crchisto
    nuclei = [s.nuclei for split in samples.values() for s in split]
    counts = Counter(label for n in nuclei for label in n.labels)
    # One "others" centre of img55 has no free detection centre within tolerance: it is kept as an extra
    # nucleus (with a warning), so there are 29,756 detection centres plus one.
    assert len(caught) == 1 and "img55: 1 class centre(s)" in caught[0]
    assert sum(len(n) for n in nuclei) == 29_756 + 1
    assert sum(counts.values()) - counts[UNLABELLED] == 22_444
    assert counts == {"epithelial": 7722, "fibroblast": 5712, "inflammatory": 6971, "others": 2039,
                      UNLABELLED: 29_756 - 22_444 + 1}


def test_crchisto_coordinates_are_shifted_from_one_based_and_clipped(crchisto):
    dataset, samples, _ = crchisto
    sample = samples["train"][0]
    raw = scipy.io.loadmat(dataset.root / sample.name / f"{sample.name}_detection.mat")["detection"]
    np.testing.assert_allclose(sample.nuclei.xy[: len(raw)], np.clip(raw - 1, -0.5, 499.5))
    all_xy = np.concatenate([s.nuclei.xy for split in samples.values() for s in split])
    assert all_xy.min() == -0.5 and all_xy.max() <= 499.0


def write_fake_crchisto(root: Path, detections, classes: dict[str, list]) -> None:
    root.mkdir(exist_ok=True)
    (root / "split_test.txt").write_text("img1\n")
    folder = root / "img1"
    folder.mkdir()
    Image.new("RGB", (20, 10)).save(folder / "img1.bmp")
    scipy.io.savemat(folder / "img1_detection.mat", {"detection": np.array(detections, dtype=float)})
    for name in ("epithelial", "fibroblast", "inflammatory", "others"):
        centres = np.array(classes.get(name, []), dtype=float).reshape(-1, 2)
        scipy.io.savemat(folder / f"img1_{name}.mat", {"detection": centres})


def test_crchisto_on_a_fake_copy(tmp_path):
    write_fake_crchisto(tmp_path, [[1, 1], [5, 5], [20.4, 10.3]], {"fibroblast": [[5.5, 5]], "others": [[1, 1]]})
    (sample,) = CRCHisto(tmp_path).samples("test")
    np.testing.assert_allclose(sample.nuclei.xy, [[0, 0], [4, 4], [19.4, 9.3]])
    assert sample.nuclei.labels.tolist() == ["others", "fibroblast", UNLABELLED]
    write_fake_crchisto(tmp_path / "beyond", [[0.2, 10.5]], {})
    (sample,) = CRCHisto(tmp_path / "beyond").samples("test")
    np.testing.assert_allclose(sample.nuclei.xy, [[-0.5, 9.5]])  # clipped onto the image edge


def test_crchisto_bad_mat_file(tmp_path):
    write_fake_crchisto(tmp_path, [[1, 1]], {})
    scipy.io.savemat(tmp_path / "img1" / "img1_others.mat", {"points": np.zeros((1, 2))})
    with pytest.raises(InputError, match=r"img1_others.mat: no 'detection' array"):
        CRCHisto(tmp_path).samples("test")
    (tmp_path / "img1" / "img1_others.mat").write_text("not a mat file")
    with pytest.raises(InputError, match=r"img1_others.mat: cannot read"):
        CRCHisto(tmp_path).samples("test")


def test_pairing_is_one_to_one_within_tolerance():
    targets = np.array([[0.0, 0.0], [3.0, 0.0]])
    # Both points are nearest to target 0; a one-to-one assignment gives the second one target 1.
    assert pair_points(np.array([[0.0, 0.0], [1.0, 0.0]]), targets, 5.0).tolist() == [0, 1]
    assert pair_points(np.array([[0.0, 0.0], [1.0, 0.0]]), targets, 1.5).tolist() == [0, -1]
    assert pair_points(np.zeros((0, 2)), targets, 1.0).tolist() == []


def test_unpaired_class_centre_is_kept_with_a_warning():
    detections = np.array([[0.0, 0.0], [50.0, 50.0]])
    with pytest.warns(UserWarning, match="1 class centre"):
        xy, labels = label_detections(detections, {"a": np.array([[0.5, 0.0], [30.0, 30.0]])}, tolerance=2.0)
    np.testing.assert_array_equal(xy, [[0, 0], [50, 50], [30, 30]])
    assert labels.tolist() == ["a", UNLABELLED, "a"]


def test_get_dataset_unknown_name(tmp_path):
    with pytest.raises(InputError, match="unknown dataset; expected one of \\['brcam2c', 'consep', 'crchisto', "
                                         "'lizard', 'monuseg', 'ocelot', 'pannuke', 'points', 'puma'\\]"):
        get_dataset("kumar", tmp_path)


# --- your own points (`points`) ------------------------------------------------------------------------------

def _nuclei(xy: list[tuple[float, float]], labels: list[str] | None = None) -> Nuclei:
    return Nuclei(xy=np.array(xy, dtype=np.float64).reshape(-1, 2), labels=labels, mpp=0.5)


def test_points_folder_reads_images_and_point_files(tmp_path: Path, points_folder) -> None:
    image = np.full((64, 96, 3), 200, np.uint8)
    root = points_folder(tmp_path / "mine", {
        "train": [("a", image, _nuclei([(10, 20), (50.5, 30)], ["tumour", ""])), ("b", image, _nuclei([]))],
        "val": [("c", image, _nuclei([(5, 5)], ["lymphocyte"]))],
    }, {"mpp": 0.25, "classes": ["tumour", "lymphocyte"]}, suffix=".geojson")
    dataset = get_dataset("points", root)
    assert [c.name for c in dataset.classes] == ["tumour", "lymphocyte"] and dataset.mpp == 0.25
    train = dataset.samples("train")
    assert [s.name for s in train] == ["a", "b"] and dataset.sample_names("test") == []
    assert train[0].nuclei.xy.tolist() == [[10, 20], [50.5, 30]] and train[0].nuclei.mpp == 0.25
    assert train[0].nuclei.labels.tolist() == ["tumour", UNLABELLED] and len(train[1].nuclei) == 0
    assert dataset.samples("validation")[0].nuclei.labels.tolist() == ["lymphocyte"]


def test_points_folder_errors_name_the_file(tmp_path: Path, points_folder) -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    one = {"train": [("a", image, _nuclei([(1, 1)], ["tumour"]))]}
    root = points_folder(tmp_path / "no_mpp", one, {"classes": ["tumour"]})
    with pytest.raises(InputError, match=r"dataset.json.*pixel size"):
        get_dataset("points", root)
    root = points_folder(tmp_path / "other_class", one, {"mpp": 0.5, "classes": ["stromal"]})
    with pytest.raises(InputError, match=r"a.csv.*tumour"):
        get_dataset("points", root).samples("train")
    root = points_folder(tmp_path / "lonely", one)
    Image.fromarray(image).save(root / "train" / "z.png")
    with pytest.raises(InputError, match=r"z.png.*no point file"):
        get_dataset("points", root)
    root = points_folder(tmp_path / "twice", one | {"val": [("a", image, _nuclei([]))]})
    with pytest.raises(InputError, match="used twice"):
        get_dataset("points", root)
    with pytest.raises(InputError, match="train folder is missing"):
        get_dataset("points", points_folder(tmp_path / "no_train", {"val": one["train"]}))


def test_points_folder_without_classes_cannot_train_a_classifier(tmp_path: Path, points_folder, capsys) -> None:
    from denuc.cli import main

    root = points_folder(tmp_path / "mine", {"train": [("a", np.zeros((32, 32, 3), np.uint8), _nuclei([(1, 1)]))]})
    assert main(["train-classifier", "--dataset", f"points={root}", "--run-dir", str(tmp_path / "run")]) == 2
    assert "no classes" in capsys.readouterr().err
