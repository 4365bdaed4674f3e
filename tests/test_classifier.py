"""Nucleus classifier: heads, the classifier on tiles, model bundles (round trip, mismatches), the pipeline's
"not a nucleus" rejection, and training (unlabelled points excluded, negatives, frozen and full modes)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from denuc.config import ClassifierConfig, ClassifierTrainConfig, DatasetSpec, DetectorConfig
from denuc.errors import InputError
from denuc.inference.classify import Classifier
from denuc.inference.detect import Detector
from denuc.inference.pipeline import Pipeline
from denuc.models.detector import PointDetector
from denuc.models.heads import create_head
from denuc.nuclei import NOT_A_NUCLEUS, UNLABELLED, Nuclei, NucleusClass
from denuc.train.classifier import add_lora, merge_lora, train_classifier
from denuc.train.joint import JointModel, train_joint
from denuc.train.offsets import add_offsets, best_offsets, tune_offsets
from denuc.train.points import PointImage, class_f1, false_positives, image_features, point_images

torch.set_num_threads(1)  # the suite shares two cores; more threads only contend

TINY = ClassifierConfig(encoder="timm:test_efficientnet")  # 99k parameters, levels of 24+32+48+64 channels
CLASSES = {"a": [NucleusClass("x", (255, 0, 0)), NucleusClass("y", (0, 255, 0))],
           "b": [NucleusClass("p"), NucleusClass("q"), NucleusClass("r")]}


def tiny_detector(threshold: float = 0.0) -> Detector:
    torch.manual_seed(0)
    return Detector(PointDetector(DetectorConfig(score_threshold=threshold, tile_size=64, tile_overlap=32)))


def tiny_model() -> Pipeline:
    torch.manual_seed(0)
    return Pipeline(tiny_detector(), Classifier.create(TINY, CLASSES))


def tiles(n: int = 2, size: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def rewrite_metadata(path: Path, out: Path, **changes: str) -> Path:
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    save_file(load_file(str(path)), str(out), metadata={**metadata, **changes})
    return out


def test_heads_map_features_to_classes_plus_one() -> None:
    for kind in ("linear", "mlp"):
        assert create_head(kind, 10, 4)(torch.randn(7, 10)).shape == (7, 4)
    with pytest.raises(ValueError, match="unknown head 'svm'"):
        create_head("svm", 10, 4)


def test_classifier_probabilities_per_point_and_taxonomy() -> None:
    classifier = Classifier.create(TINY, CLASSES).eval()
    assert classifier.feature_dim == 24 + 32 + 48 + 64 and classifier.taxonomy == "a"
    (p0, f0), (p1, f1) = classifier.classify_tiles(tiles(), [np.array([[3.0, 4.0], [60.2, 10.5]]), np.zeros((0, 2))])
    assert p0.shape == (2, 3) and f0.shape == (2, 168) and p1.shape == (0, 3)
    np.testing.assert_allclose(p0.sum(1), 1, rtol=1e-6)
    classifier.use_taxonomy("b")
    assert classifier.classify_tiles(tiles(1), [np.array([[3.0, 4.0]])])[0][0].shape == (1, 4)
    with pytest.raises(InputError, match="unknown taxonomy"):
        classifier.use_taxonomy("c")
    with pytest.raises(ValueError, match="exclude 'not a nucleus'"):
        Classifier.create(TINY, {"a": [NucleusClass(NOT_A_NUCLEUS)]})


def test_bundle_round_trip(tmp_path: Path) -> None:
    model = tiny_model()
    model.save(tmp_path / "m.safetensors")
    loaded = Pipeline.from_pretrained(tmp_path / "m.safetensors")
    expected, got = model.predict_tiles(tiles(), embeddings=True), loaded.predict_tiles(tiles(), embeddings=True)
    assert loaded.classes == CLASSES["a"] and loaded.mpp == 0.5
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e.xy, g.xy)
        np.testing.assert_allclose(e.probs, g.probs, atol=1e-6)
        assert e.labels.tolist() == g.labels.tolist() and g.embeddings.shape == (len(g), 168)
    assert Pipeline.from_pretrained(tmp_path / "m.safetensors", taxonomy="b").classes == CLASSES["b"]
    model.save(tmp_path / "half.safetensors", half=True)
    assert (tmp_path / "half.safetensors").stat().st_size < 0.6 * (tmp_path / "m.safetensors").stat().st_size
    half = Pipeline.from_pretrained(tmp_path / "half.safetensors").predict_tiles(tiles())
    assert sum(len(n) for n in half) > 0
    for e, h in zip(expected, half):
        assert np.mean(e.labels[: len(h)] == h.labels[: len(e)]) > 0.9


def test_whole_image_prediction_has_classes_and_no_rejected_label() -> None:
    found = tiny_model().predict(tiles(1, 100)[0], mpp=0.25)
    assert found.class_names == ["x", "y"] and found.image_size == (100, 100)
    assert set(found.labels) <= {"x", "y"} and found.probs.shape == (len(found), 2)
    found.validate()


def test_not_a_nucleus_detections_are_dropped() -> None:
    model = tiny_model()
    head = model.classifier.heads["a"][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 1.0, 5.0]))  # "not a nucleus" wins everywhere
    assert sum(len(n) for n in model.predict_tiles(tiles())) == 0
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.0, 3.0, 2.0]))  # class "y" first, "not a nucleus" second
    found = model.predict_tiles(tiles())
    detected = model.detector.detect_tiles(tiles())
    assert [len(n) for n in found] == [len(n) for n in detected]
    for nuclei in found:
        assert set(nuclei.labels) == {"y"} and NOT_A_NUCLEUS not in nuclei.class_names
        np.testing.assert_allclose(nuclei.probs.sum(1), 1)  # renormalised over the taxonomy
        np.testing.assert_allclose(nuclei.probs[:, 1], 1 / (1 + np.exp(-3)), rtol=1e-5)


def test_bare_detector_loads_detection_only(tmp_path: Path) -> None:
    tiny_detector().save(tmp_path / "d.safetensors")
    model = Pipeline.from_pretrained(tmp_path / "d.safetensors")
    assert model.classifier is None and model.classes == []
    assert set(model.predict_tiles(tiles())[0].labels) <= {UNLABELLED}
    with pytest.raises(ValueError, match="needs a classifier"):
        model.save(tmp_path / "x.safetensors")


def test_bundle_mismatches_are_named(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tiny_model().save(path)
    fewer = json.dumps({"a": [{"name": "x", "color": [1, 2, 3]}],
                        "b": [{"name": n, "color": [0, 0, 0]} for n in "pqr"]})
    with pytest.raises(InputError, match=r"m2.safetensors: head 'a' has 3 outputs for 1 classes \['x'\]"):
        Pipeline.from_pretrained(rewrite_metadata(path, tmp_path / "m2.safetensors", taxonomies=fewer))
    other = ClassifierConfig(encoder="timm:test_resnet").to_json()  # 368 features instead of 168
    with pytest.raises(InputError, match=r"m3.safetensors: head 'a' takes 168 features, but encoder timm:test_resnet"):
        Pipeline.from_pretrained(rewrite_metadata(path, tmp_path / "m3.safetensors", denuc_classifier=other))
    with pytest.raises(InputError, match="no such model file"):
        Pipeline.from_pretrained(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="has no taxonomy"):
        tiny_detector().save(tmp_path / "d.safetensors")
        Pipeline.from_pretrained(tmp_path / "d.safetensors", taxonomy="a")


def test_referenced_encoder_weights(tmp_path: Path) -> None:
    """A frozen published encoder is referenced by the path of its weights file, not copied."""
    weights = tmp_path / "encoder.safetensors"
    save_file(Classifier.create(TINY, CLASSES).encoder.model.state_dict(), str(weights))
    config = ClassifierConfig(encoder=TINY.encoder, encoder_weights=str(weights))
    model = Pipeline(tiny_detector(), Classifier.create(config, CLASSES))
    assert not model.classifier.embed_encoder
    model.save(tmp_path / "m.safetensors")
    assert not any(k.startswith("classifier.encoder.") for k in load_file(str(tmp_path / "m.safetensors")))
    loaded = Pipeline.from_pretrained(tmp_path / "m.safetensors")
    for e, g in zip(model.predict_tiles(tiles()), loaded.predict_tiles(tiles())):
        np.testing.assert_allclose(e.probs, g.probs, atol=1e-6)
    weights.unlink()
    with pytest.raises(InputError, match="encoder.safetensors: no such weights file"):
        Pipeline.from_pretrained(tmp_path / "m.safetensors")


def test_false_positives_exclude_points_near_any_ground_truth() -> None:
    gt = Nuclei(xy=[[10, 10], [50, 50]], labels=["x", UNLABELLED])
    detections = np.array([[11.0, 10.0], [51.0, 52.0], [80.0, 80.0]])
    np.testing.assert_array_equal(false_positives(detections, gt, 6.0), [[80.0, 80.0]])


def write_fake_crchisto(root: Path) -> None:
    """Two 96-pixel images with labelled and unlabelled nuclei, in CRCHisto's layout (0.55 um/px)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for split, names in (("train", ["img1"]), ("validation", ["img2"]), ("test", [])):
        (root / f"split_{split}.txt").write_text("".join(f"{n}\n" for n in names))
    for name in ("img1", "img2"):
        folder = root / name
        folder.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(folder / f"{name}.bmp")
        centres = np.array([[10.0, 10.0], [40.0, 20.0], [70.0, 70.0], [20.0, 80.0]])
        scipy.io.savemat(folder / f"{name}_detection.mat", {"detection": centres})
        classes = {"epithelial": centres[:1], "fibroblast": centres[1:2], "inflammatory": centres[2:3]}
        for cls in ("epithelial", "fibroblast", "inflammatory", "others"):  # centres[3] stays unlabelled
            scipy.io.savemat(folder / f"{name}_{cls}.mat", {"detection": classes.get(cls, np.zeros((0, 2)))})


@pytest.fixture
def fake_run(tmp_path: Path) -> tuple[ClassifierTrainConfig, Path]:
    write_fake_crchisto(tmp_path / "crchisto")
    tiny_detector(threshold=0.5).save(tmp_path / "detector.safetensors")
    cfg = ClassifierTrainConfig(datasets=[DatasetSpec("crchisto", str(tmp_path / "crchisto"))], model=TINY,
                                detector=str(tmp_path / "detector.safetensors"), epochs=2, iters_per_epoch=2,
                                batch_size=2, crop_size=64, warmup_iters=1, threads=1)
    return cfg, tmp_path


def rescored(bundle: Path, cfg: ClassifierTrainConfig) -> float:
    """A bundle's validation mean class F1 (end to end, over ``cfg``'s datasets), computed afresh."""
    model = Pipeline.from_pretrained(bundle)
    val = point_images(cfg, model.detector, "val", None, progress=False)
    features = image_features(model.classifier, val, progress=False)
    with torch.inference_mode():
        probs = [model.classifier.heads[item.dataset](f).softmax(-1).numpy() for item, f in zip(val, features)]
    return class_f1(val, probs, model.classifier.taxonomies)["mean"]


def test_training_points_exclude_unlabelled_and_add_negatives(fake_run) -> None:
    cfg, tmp_path = fake_run
    detector = Detector.from_pretrained(cfg.detector)
    (item,) = point_images(cfg, detector, "train", tmp_path / "run")
    labelled = 3
    assert item.targets[:labelled].tolist() == [0, 1, 2]  # epithelial, fibroblast, inflammatory
    assert (item.targets[labelled:] == 4).all()  # the rest are "not a nucleus"
    unlabelled = (np.array([20.0, 80.0]) + 0.5) * (0.55 / 0.5) - 0.5
    assert np.linalg.norm(item.xy - unlabelled, axis=1).min() > cfg.match_radius_um / cfg.model.mpp


def test_detections_are_those_inference_gives_with_point_nms_across_tiles(tmp_path: Path, points_folder) -> None:
    """Training negatives and validation points come from the detections users get: tile by tile, then point
    NMS across tiles. The shipped fast detector with 64 px tiles leaves close pairs at the tiles' seams on the
    bundled sample (4 measured) when the NMS across tiles is left out."""
    from importlib import resources

    from scipy.spatial import cKDTree

    from denuc.io.images import read_image

    image = read_image(resources.files("denuc") / "data" / "sample_brcam2c.png")
    gt = Nuclei(xy=[[100.0, 100.0], [300.0, 200.0]], labels=np.array(["tumour", "immune"], dtype=object), mpp=0.5)
    root = points_folder(tmp_path / "mine", {"train": [("a", image, gt)], "val": [("b", image, gt)]},
                         {"mpp": 0.5, "classes": ["tumour", "immune"]})
    cfg = ClassifierTrainConfig(datasets=[DatasetSpec("points", str(root))], model=TINY)
    detector = Detector.from_pretrained("fast").with_settings(tile_size=64, tile_overlap=32)
    (val,) = point_images(cfg, detector, "val", tmp_path / "run", progress=False)
    radius = detector.config.nms_radius_um / detector.config.mpp
    assert len(cKDTree(detector.detect_resampled(val.image)[0]).query_pairs(radius)) > 0  # tiles alone
    assert len(val.xy) > 300 and len(cKDTree(val.xy).query_pairs(radius)) == 0
    np.testing.assert_allclose(val.xy, detector.detect(val.image, mpp=detector.config.mpp).xy)
    (train,) = point_images(cfg, detector, "train", tmp_path / "run", progress=False)
    negatives = train.xy[train.targets == 2]
    assert len(negatives) > 300 and {tuple(p) for p in negatives} <= {tuple(p) for p in val.xy}
    # the cached detections belong to their detector: another one's are computed afresh
    (other,) = point_images(cfg, detector.with_settings(score_threshold=0.9), "val", tmp_path / "run",
                            progress=False)
    assert len(other.xy) < len(val.xy)


@pytest.mark.parametrize("mode", ["frozen", "lora", "full"])
def test_training_writes_a_loadable_bundle_and_resumes(fake_run, mode: str, capsys) -> None:
    cfg, tmp_path = fake_run
    cfg.mode = mode
    run = tmp_path / mode
    bundle = train_classifier(cfg, run, progress=False, epochs_this_run=1)
    assert len(json.loads((run / "log.json").read_text())) == 1
    train_classifier(cfg, run, resume=True, progress=False)
    assert capsys.readouterr().err == ""  # no progress bars (detecting, features, epochs) when not asked for
    log = json.loads((run / "log.json").read_text())
    assert [row["epoch"] for row in log] == [1, 2] and all(0 <= row["val_f1_mean"] <= 1 for row in log)
    model = Pipeline.from_pretrained(bundle)
    assert [c.name for c in model.classes] == ["epithelial", "fibroblast", "inflammatory", "others"]
    if mode == "frozen":
        assert (run / "features_train.safetensors").exists()
    with safe_open(str(run / "model.safetensors"), framework="pt") as f:  # tuned after the last epoch
        tuned = json.loads(f.metadata()["class_offsets"])["crchisto"]
    assert len(tuned["offsets"]) == 5
    # the scores reported are those of the bundles: before the offsets (best) and after (model)
    assert rescored(run / "best.safetensors", cfg) == pytest.approx(tuned["val_f1_before"])
    assert rescored(run / "model.safetensors", cfg) == pytest.approx(tuned["val_f1_after"])


def test_randstainna_recolours_classifier_crops_and_trains(fake_run) -> None:
    from denuc.errors import InputError
    from denuc.train.augment import labelled_crop
    from denuc.train.stain import StainTemplates

    cfg, tmp_path = fake_run
    cfg.mode, cfg.epochs, cfg.randstainna = "full", 1, 0.5
    with pytest.raises(InputError, match="two images"):  # one train image: no distribution of colours to fit
        train_classifier(cfg, tmp_path / "one", progress=False)
    (tmp_path / "crchisto" / "split_train.txt").write_text("img1\nimg2\n")
    train_classifier(cfg, tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "stain_templates.json").read_text())["template_spread"] == 0.7
    # the same crop with and without re-staining: the points and their classes do not move, the colours do
    (item,) = point_images(replace(cfg, randstainna=0.0), Detector.from_pretrained(cfg.detector), "val",
                           tmp_path / "run")
    item.targets = np.arange(len(item.xy))
    templates = StainTemplates(np.array([[50.0, 30.0, -20.0], [15.0, 8.0, 9.0]]), np.ones((2, 3)))
    plain = replace(cfg, color_jitter=0.0, randstainna=0.0)
    on = labelled_crop(item, 64, replace(plain, randstainna=1.0), np.random.default_rng(1), templates)
    off = labelled_crop(item, 64, plain, np.random.default_rng(1))
    np.testing.assert_array_equal(on[1], off[1])
    np.testing.assert_array_equal(on[2], off[2])
    assert not np.allclose(on[0], off[0])
    with pytest.raises(ValueError, match="frozen"):
        replace(cfg, mode="frozen")
    with pytest.raises(ValueError, match="stain_vector_jitter.*frozen"):
        replace(cfg, mode="frozen", randstainna=0.0, stain_vector_jitter=0.1)


@pytest.mark.parametrize("randstainna", [0.0, 0.5])
def test_joint_baseline_trains_and_classifies(fake_run, randstainna: float) -> None:
    cfg, tmp_path = fake_run
    cfg.mode, cfg.epochs, cfg.randstainna = "joint", 1, randstainna
    if randstainna:
        (tmp_path / "crchisto" / "split_train.txt").write_text("img1\nimg2\n")  # two images' colours to fit
    path = train_joint(cfg, tmp_path / "joint", progress=False)
    assert (tmp_path / "joint" / "stain_templates.json").exists() == bool(randstainna)
    model = JointModel.load(path)
    found = model.predict(tiles(1, 96)[0], mpp=0.5, taxonomy="crchisto")
    assert found.class_names == ["epithelial", "fibroblast", "inflammatory", "others"]
    assert set(found.labels) <= set(found.class_names) and found.probs.shape == (len(found), 4)


def test_joint_baseline_without_validation_keeps_the_last_epoch(fake_run) -> None:
    cfg, tmp_path = fake_run
    cfg.mode = "joint"
    (tmp_path / "crchisto" / "split_validation.txt").write_text("")
    path = train_joint(cfg, tmp_path / "joint", progress=False)
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["epoch"]) == cfg.epochs
    log = json.loads((tmp_path / "joint" / "log.json").read_text())
    assert [row["val_f1_mean"] for row in log] == [None] * cfg.epochs


def test_joint_baseline_scores_the_datasets_with_validation_images(fake_run, points_folder) -> None:
    """A dataset without validation images has no score, and no part in the mean the best epoch is chosen on."""
    cfg, tmp_path = fake_run
    rng = np.random.default_rng(0)
    gt = Nuclei(xy=rng.uniform(8, 88, (12, 2)), labels=np.array(["tumour", "immune"] * 6, dtype=object), mpp=0.5)
    root = points_folder(tmp_path / "mine", {"train": [("a", rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), gt)]},
                         {"mpp": 0.5, "classes": ["tumour", "immune"]})
    cfg = replace(cfg, mode="joint", datasets=[*cfg.datasets, DatasetSpec("points", str(root))])
    path = train_joint(cfg, tmp_path / "joint", progress=False)
    log = json.loads((tmp_path / "joint" / "log.json").read_text())
    assert all(set(row) >= {"val_f1_crchisto", "val_f1_mean"} and "val_f1_points" not in row for row in log)
    assert all(row["val_f1_mean"] == row["val_f1_crchisto"] for row in log)
    assert sorted(JointModel.load(path).taxonomies) == ["crchisto", "points"]


def test_per_dataset_scores_score_each_dataset_apart() -> None:
    from denuc.metrics.evaluate import per_dataset_scores

    gt = Nuclei(xy=[[10.0, 10.0], [40.0, 40.0]], mpp=0.5)
    pairs = [("a", "1", Nuclei(xy=[[10.0, 10.0], [40.0, 40.0]], mpp=0.5), gt),  # a: both found, F1 1
             ("b", "1", Nuclei(xy=[[10.0, 10.0]], mpp=0.5), gt),  # b: pooled over its images, 1 + 0 of 2 + 2
             ("b", "2", Nuclei(xy=np.zeros((0, 2)), mpp=0.5), gt)]
    scores = per_dataset_scores(pairs, lambda report: report.detection.f1)
    assert scores == {"a": 1.0, "b": pytest.approx(2 * 0.25 / 1.25), "mean": pytest.approx((1.0 + 0.4) / 2)}
    with pytest.raises(InputError, match="no images"):
        per_dataset_scores([], lambda report: report.detection.f1)


def test_lora_adapters_merge_into_the_encoder() -> None:
    classifier = Classifier.create(TINY, CLASSES).eval()
    add_lora(classifier, rank=2, alpha=4.0)
    trainable = [name for name, p in classifier.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or name.startswith("heads.") for name in trainable)
    points = [np.array([[3.0, 4.0], [40.0, 50.5]])]
    base = classifier.classify_tiles(tiles(1), points)[0][0]
    with torch.no_grad():
        for name, p in classifier.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at zero: make the adapters change something
    adapted = classifier.classify_tiles(tiles(1), points)[0][0]
    merged = merge_lora(classifier)
    assert merged.embed_encoder and not any("lora" in k for k in merged.state_tensors())
    np.testing.assert_allclose(merged.classify_tiles(tiles(1), points)[0][0], adapted, atol=1e-5)
    assert not np.allclose(base, adapted)


def test_test_time_views_average_the_views_and_do_not_depend_on_orientation() -> None:
    """With 8 views, a flipped or transposed tile (points moved with it) gets the same probabilities: the eight
    views of it are the eight views of the tile. The features returned are those of the tile itself."""
    from denuc.inference.tta import unview_points, view_points, view_tiles

    classifier = Classifier.create(TINY, CLASSES).eval()
    tile = np.random.default_rng(0).integers(0, 256, (1, 64, 96, 3), dtype=np.uint8)  # not square: transposes show
    points = np.array([[3.0, 4.0], [60.2, 10.5], [90.5, 60.0]])
    plain_probs, plain_features = classifier.classify_tiles(tile, [points])[0]
    singles = []
    for view in range(4):
        viewed = view_tiles(torch.from_numpy(tile), view).numpy()
        moved = view_points(torch.from_numpy(points), view, 64, 96).numpy()
        singles.append(classifier.classify_tiles(viewed, [moved])[0][0])
    classifier.test_time_views = 4
    probs, features = classifier.classify_tiles(tile, [points])[0]
    np.testing.assert_allclose(probs, np.mean(singles, axis=0), atol=1e-6)
    np.testing.assert_allclose(features, plain_features, atol=1e-6)
    assert np.abs(probs - plain_probs).max() > 1e-4  # the views do see different things
    classifier.test_time_views = 8
    reference = classifier.classify_tiles(tile, [points])[0][0]
    for view in (1, 4, 5, 6):
        viewed = view_tiles(torch.from_numpy(tile), view).numpy()
        moved = view_points(torch.from_numpy(points), view, 64, 96).numpy()
        np.testing.assert_allclose(unview_points(torch.from_numpy(moved), view, *viewed.shape[1:3]).numpy(), points)
        np.testing.assert_allclose(classifier.classify_tiles(viewed, [moved])[0][0], reference, atol=1e-5)


def test_tiles_without_detections_keep_the_probability_columns() -> None:
    model = tiny_model()
    model.detector.with_settings(score_threshold=1.0)  # nothing passes
    for views in (1, 8):
        found = model.with_test_time_views(views).predict(np.full((80, 80, 3), 255, dtype=np.uint8), mpp=0.5,
                                                          embeddings=True)
        assert len(found) == 0 and found.probs.shape == (0, 2) and found.embeddings.shape == (0, 168)


def test_models_import_from_the_package_top_without_loading_torch_early() -> None:
    import subprocess
    import sys

    import denuc

    assert denuc.Pipeline is Pipeline and denuc.Detector is Detector
    probe = "import sys, denuc; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "False\n"


def test_class_offsets_move_decisions_towards_the_better_validation_f1() -> None:
    # two "y" nuclei on which the head leans to "x" (0.50 vs 0.41), one clear "x": an offset on "y" fixes both
    gt = Nuclei(xy=np.array([[10.0, 10.0], [40.0, 40.0], [70.0, 20.0]]), labels=np.array(["y", "y", "x"], dtype=object),
                mpp=0.5, classes=CLASSES["a"])
    val = [PointImage("a", "1", np.zeros((80, 80, 3), np.uint8), gt.xy.copy(), np.full(3, -1), gt)]
    probs = [np.array([[0.50, 0.41, 0.09], [0.50, 0.41, 0.09], [0.80, 0.15, 0.05]])]  # x, y, not a nucleus
    offsets, before, after = best_offsets(val, probs, CLASSES["a"], "all")
    assert before == pytest.approx(0.25) and after == 1.0  # x: F1 0.5 (1 of 3 right), y: 0 -> both 1
    assert offsets[0] == 0.0 and np.log(0.50 / 0.41) < offsets[1] < np.log(0.80 / 0.15) and offsets[2] == 0.0
    # "nucleus" moves only the rejection: here it rejects the two wrong "x" calls (no more false positives)
    offsets, _, after = best_offsets(val, probs, CLASSES["a"], "nucleus")
    assert offsets[:2].tolist() == [0.0, 0.0] and np.log(0.50 / 0.09) < offsets[2] < np.log(0.80 / 0.05)
    assert after == pytest.approx(0.5)  # x: F1 1 (its one call is right), y: still 0


def test_tuned_offsets_give_the_score_they_report(fake_run) -> None:
    """The tuned bundle, scored afresh, has the F1 ``tune_offsets`` reports; the input bundle the one before."""
    cfg, tmp_path = fake_run
    torch.manual_seed(0)
    classes = {"crchisto": [NucleusClass(n) for n in ("epithelial", "fibroblast", "inflammatory", "others")]}
    bundle = tmp_path / "bundle.safetensors"
    # every anchor a detection: the offsets decide how many are kept and as which class
    Pipeline(tiny_detector(threshold=0.0), Classifier.create(TINY, classes)).save(bundle)
    tuned = tune_offsets(bundle, cfg.datasets, tmp_path / "tuned.safetensors", "all")["crchisto"]
    assert tuned["val_f1_after"] > tuned["val_f1_before"]
    assert rescored(bundle, cfg) == pytest.approx(tuned["val_f1_before"])
    assert rescored(tmp_path / "tuned.safetensors", cfg) == pytest.approx(tuned["val_f1_after"])


def test_offsets_fold_into_the_head_bias() -> None:
    classifier = Classifier.create(TINY, CLASSES).eval()
    features = torch.randn(5, classifier.feature_dim)
    before = classifier.heads["b"](features)
    add_offsets(classifier, {"b": np.array([0.0, 0.5, -1.0, 0.25])})
    torch.testing.assert_close(classifier.heads["b"](features) - before, torch.tensor([[0.0, 0.5, -1.0, 0.25]] * 5))


def test_tune_offsets_writes_a_new_bundle_and_keeps_the_input(fake_run) -> None:
    cfg, tmp_path = fake_run
    bundle = tmp_path / "bundle.safetensors"
    torch.manual_seed(0)
    classes = {"crchisto": [NucleusClass(n) for n in ("epithelial", "fibroblast", "inflammatory", "others")]}
    Pipeline(Detector.from_pretrained(cfg.detector), Classifier.create(TINY, classes)).save(
        bundle, half=True, extra_metadata={"epoch": 3})
    original = bundle.read_bytes()
    chosen = tune_offsets(bundle, cfg.datasets, tmp_path / "tuned.safetensors")
    assert bundle.read_bytes() == original
    with safe_open(str(tmp_path / "tuned.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        assert f.get_tensor("classifier.heads.crchisto.1.bias").dtype == torch.float16  # precision kept
    assert json.loads(metadata["epoch"]) == 3 and json.loads(metadata["class_offsets"]) == chosen
    offsets = np.array(chosen["crchisto"]["offsets"])
    tuned, plain = (load_file(str(path))["classifier.heads.crchisto.1.bias"].float().numpy()
                    for path in (tmp_path / "tuned.safetensors", bundle))
    np.testing.assert_allclose(tuned - plain, offsets, atol=2e-3)
    with pytest.raises(InputError, match="matches no head"):
        tune_offsets(bundle, [DatasetSpec("brcam2c", str(tmp_path / "crchisto"))], tmp_path / "x.safetensors")


def test_tune_offsets_cli_refuses_to_overwrite_its_input(fake_run, capsys) -> None:
    from denuc.cli import main

    cfg, tmp_path = fake_run
    code = main(["tune-offsets", cfg.detector, "--dataset", f"crchisto={tmp_path / 'crchisto'}",
                 "--out", cfg.detector])
    assert code == 2 and "is the input bundle" in capsys.readouterr().err


def test_a_points_folder_without_validation_trains_and_keeps_the_last_epoch(tmp_path: Path, points_folder) -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(8, 88, (12, 2))
    gt = Nuclei(xy=xy, labels=np.array(["tumour", "immune"] * 6, dtype=object), mpp=0.5)
    image = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    root = points_folder(tmp_path / "mine", {"train": [("a", image, gt)]},
                         {"mpp": 0.5, "classes": ["tumour", "immune"]})
    tiny_detector(threshold=0.5).save(tmp_path / "detector.safetensors")
    cfg = ClassifierTrainConfig(datasets=[DatasetSpec("points", str(root))], model=TINY, mode="full",
                                detector=str(tmp_path / "detector.safetensors"), epochs=2, iters_per_epoch=1,
                                batch_size=1, crop_size=64, warmup_iters=1, threads=1)
    with pytest.warns(UserWarning, match="no validation images"):
        bundle = train_classifier(cfg, tmp_path / "run", progress=False)
    assert [c.name for c in Pipeline.from_pretrained(bundle).classes] == ["tumour", "immune"]
    with safe_open(str(bundle), framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["epoch"]) == 2 and json.loads(metadata["class_offsets"]) == {}


def exit_code(argv: list[str]) -> int:
    """``denuc.cli.main``'s exit status, whether it returns it or argparse exits (an option refused)."""
    from denuc.cli import main

    try:
        return main(argv)
    except SystemExit as done:
        return done.code


def test_train_classifier_command_passes_the_jitters_and_refuses_bad_values(fake_run, capsys) -> None:
    cfg, tmp_path = fake_run
    common = ["train-classifier", "--dataset", f"crchisto={tmp_path / 'crchisto'}", "--encoder", TINY.encoder,
              "--detector", cfg.detector, "--mode", "full", "--epochs", "1", "--iters-per-epoch", "1",
              "--batch-size", "2", "--crop-size", "64", "--threads", "1", "--offsets", "none", "--quiet"]
    first = [*common, "--run-dir", str(tmp_path / "run"), "--color-jitter", "0.3", "--stain-vector-jitter", "0.1",
             "--ema-decay", "0.99"]
    assert exit_code(first) == 0
    recipe = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (recipe["color_jitter"], recipe["stain_vector_jitter"], recipe["ema_decay"]) == (0.3, 0.1, 0.99)
    assert "ema" in torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    capsys.readouterr()
    for bad, message in ((["--color-jitter", "1"], "--color-jitter: must be a number in [0, 1)"),
                         (["--color-jitter", "-0.1"], "--color-jitter"), (["--randstainna", "2"], "--randstainna"),
                         (["--stain-vector-jitter", "1.5"], "--stain-vector-jitter"),
                         (["--ema-decay", "1"], "--ema-decay: must be a number in (0, 1)"),
                         (["--batch-size", "0"], "--batch-size: must be a whole number >= 1, got 0"),
                         (["--lr", "nan"], "--lr: must be a number > 0, got nan"),
                         (["--epochs", "0"], "--epochs"), (["--lora-rank", "-2"], "--lora-rank"),
                         (["--threads", "-1"], "--threads"), (["--encoder", "uni3"], "unknown encoder 'uni3'")):
        assert exit_code([*common, "--run-dir", str(tmp_path / "x"), *bad]) == 2, bad
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()  # refused before the run folder is made
    # a folder that holds a trained run: refused, unless continued (with the same options) or started again
    assert exit_code(first) == 2
    assert "holds a trained run" in capsys.readouterr().err
    assert exit_code([*first, "--resume"]) == 0
    assert exit_code([*first, "--resume", "--color-jitter", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "another config (differs in ['color_jitter'])" in err and "Traceback" not in err
    assert exit_code([*first, "--overwrite", "--color-jitter", "0.2"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["color_jitter"] == 0.2
    assert exit_code([*common, "--mode", "joint", "--run-dir", str(tmp_path / "run")]) == 2  # the same rule
    assert "holds a trained run" in capsys.readouterr().err


def test_train_classifier_errors_print_no_traceback(fake_run) -> None:
    """Through the installed entry point: an unknown encoder is one line on stderr, exit 2, and no run folder."""
    import subprocess
    import sys

    cfg, tmp_path = fake_run
    common = ["train-classifier", "--dataset", f"crchisto={tmp_path / 'crchisto'}", "--detector", cfg.detector,
              "--run-dir", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, "-m", "denuc.cli", *common, "--encoder", "uni3"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "unknown encoder 'uni3'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_weight_average_is_what_is_kept_and_resumes_exactly(fake_run) -> None:
    cfg, tmp_path = fake_run
    cfg.mode, cfg.ema_decay, cfg.offsets, cfg.epochs = "full", 0.9, "none", 3
    whole = tmp_path / "whole"
    train_classifier(cfg, whole, progress=False)
    split = tmp_path / "split"
    train_classifier(cfg, split, progress=False, epochs_this_run=1)
    train_classifier(cfg, split, resume=True, progress=False)
    a = torch.load(whole / "last.pt", weights_only=False)
    b = torch.load(split / "last.pt", weights_only=False)
    assert a["ema"].keys() == b["ema"].keys()
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    head = "module.heads.crchisto.1.weight"
    assert not torch.equal(a["ema"][head], a["classifier"][head.removeprefix("module.")])  # an average, not a copy
    with pytest.raises(ValueError, match="ema_decay"):
        replace(cfg, ema_decay=1.0)
    with pytest.raises(ValueError, match="mode 'full' only"):
        replace(cfg, mode="frozen")


def test_without_validation_the_last_weight_average_is_kept(tmp_path: Path, points_folder) -> None:
    rng = np.random.default_rng(0)
    gt = Nuclei(xy=rng.uniform(8, 88, (12, 2)), labels=np.array(["tumour", "immune"] * 6, dtype=object), mpp=0.5)
    root = points_folder(tmp_path / "mine", {"train": [("a", rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), gt)]},
                         {"mpp": 0.5, "classes": ["tumour", "immune"]})
    tiny_detector(threshold=0.5).save(tmp_path / "detector.safetensors")
    cfg = ClassifierTrainConfig(datasets=[DatasetSpec("points", str(root))], model=TINY, mode="full", ema_decay=0.9,
                                detector=str(tmp_path / "detector.safetensors"), epochs=2, iters_per_epoch=2,
                                batch_size=1, crop_size=64, warmup_iters=1, threads=1)
    with pytest.warns(UserWarning, match="no validation images"):
        bundle = train_classifier(cfg, tmp_path / "run", progress=False)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    kept = load_file(str(bundle))
    name = next(k for k in kept if k.endswith("heads.points.1.weight"))
    assert torch.equal(kept[name], state["ema"]["module.heads.points.1.weight"])
    assert not torch.equal(kept[name], state["classifier"]["heads.points.1.weight"])


def test_joint_baseline_takes_the_scan_threshold_of_the_image() -> None:
    """A 40x image gets the detector's 40x threshold, as the detector alone gives it (here 0: every anchor's point
    kept by NMS; the 20x threshold 1.0 keeps none)."""
    torch.manual_seed(0)
    detector = Detector(PointDetector(DetectorConfig(score_threshold=1.0, score_threshold_40x=0.0, tile_size=64,
                                                     tile_overlap=32)))
    model = JointModel(detector, {"a": CLASSES["a"]}).eval()
    image = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    at_40x, at_20x = model.predict(image, 0.25, "a"), model.predict(image, 0.5, "a")
    assert len(at_20x) == 0 and len(at_40x) == len(detector.detect(image, mpp=0.25)) > 0
