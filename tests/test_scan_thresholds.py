"""A score threshold per scan magnification: 40x scans (finer than FINE_SCAN_MPP) get ``score_threshold_40x``,
everything else ``score_threshold``; training chooses each by the shipping rule within its group of datasets."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
import pytest
from conftest import SAMPLE_IMAGE, SAMPLE_MPP, SAMPLE_POINTS

from denuc.config import FINE_SCAN_MPP, DatasetSpec, DetectorConfig, DetectorTrainConfig
from denuc.inference.detect import Detector
from denuc.inference.pipeline import Pipeline
from denuc.io import read_points
from denuc.io.images import read_image, resample
from denuc.train import detector as training
from denuc.train.data import SplitImage


def test_threshold_for_follows_the_scan_pixel_size() -> None:
    config = DetectorConfig(score_threshold=0.5, score_threshold_40x=0.2)
    assert config.threshold_for(0.25) == 0.2
    assert config.threshold_for(0.5) == config.threshold_for(FINE_SCAN_MPP) == 0.5
    assert config.threshold_for(None) == 0.5  # unknown scan: the 20x threshold
    assert DetectorConfig(score_threshold=0.5).threshold_for(0.25) == 0.5  # no 40x threshold: one for all


def test_large_tile_thresholds_hold_from_their_tile_size_up() -> None:
    config = DetectorConfig(score_threshold=0.55, score_threshold_40x=0.5, large_tile_thresholds=[608, 0.5, 0.25])
    assert config.large_tile_thresholds == (608, 0.5, 0.25)  # as JSON gives it back: a list
    assert (config.threshold_for(0.5), config.threshold_for(0.25)) == (0.55, 0.5)  # its 256-px tiles
    for tile in (608, 640):
        larger = DetectorConfig.from_json(replace(config, tile_size=tile).to_json())
        assert (larger.threshold_for(0.5), larger.threshold_for(0.25), larger.threshold_for(None)) == (0.5, 0.25, 0.5)
    with pytest.raises(ValueError, match="large_tile_thresholds"):
        DetectorConfig(large_tile_thresholds=(608, 0.5))


def test_thresholds_set_without_large_tile_ones_hold_at_every_tile_size() -> None:
    # `--threshold` and the training's sweeps set one threshold: one chosen for larger tiles must not override it
    detector = Detector.from_pretrained("default").with_settings(large_tile_thresholds=(512, 0.1, 0.1),
                                                                 tile_size=512)
    assert detector.config.threshold_for(0.5) == 0.1
    detector.with_settings(score_threshold=0.7, score_threshold_40x=None)
    assert detector.config.large_tile_thresholds is None and detector.config.threshold_for(0.25) == 0.7


def test_the_bundle_after_precise_uses_precise_s_thresholds_for_its_larger_tiles() -> None:
    """`predict --detector precise`: the bundle's classifier needs 608-px tiles of `precise`, whose thresholds for
    such tiles were chosen there (classification/pipeline_tile_thresholds_rule.txt); alone it keeps its own."""
    precise = Detector.from_pretrained("precise")
    alone = (precise.config.threshold_for(0.5), precise.config.threshold_for(0.25))
    pipeline = Pipeline.from_pretrained("default-bundle").with_detector(precise)
    size, *at_size = pipeline.detector.config.large_tile_thresholds
    assert pipeline.detector.config.tile_size >= size
    assert [pipeline.detector.config.threshold_for(mpp) for mpp in (0.5, 0.25)] == at_size != list(alone)


@pytest.mark.parametrize("views", [1, 2])
def test_detector_thresholds_each_image_by_its_scan(views: int) -> None:
    # 20x threshold 1.0 (no score passes it), 40x threshold 0.5: only images said to be 40x scans get points
    detector = Detector.from_pretrained("default").with_settings(score_threshold=1.0, score_threshold_40x=0.5,
                                                                 test_time_views=views)
    image = read_image(SAMPLE_IMAGE)
    assert len(detector.detect(image, mpp=SAMPLE_MPP)) == 0
    as_40x = resample(image, 2.0)  # the same tissue, as a 40x scan of it
    assert len(detector.detect(as_40x, mpp=SAMPLE_MPP / 2)) > 100
    tiles = np.ascontiguousarray(image[None, :256, :256])
    assert len(detector.detect_tiles(tiles)[0]) == 0
    assert len(detector.detect_tiles(tiles, scan_mpp=0.25)[0]) > 10


def test_rule_threshold_picks_within_a_group() -> None:
    # a and b agree on 0.3 within 1 point; c (another group) is best at 0.1, far from the others' choice
    f1 = {"a": {0.1: 0.80, 0.3: 0.85, 0.5: 0.86}, "b": {0.1: 0.70, 0.3: 0.76, 0.5: 0.74},
          "c": {0.1: 0.80, 0.3: 0.65, 0.5: 0.60}}
    best = {d: max(v.values()) for d, v in f1.items()}
    assert training.rule_threshold({d: f1[d] for d in "ab"}, best, 0.01) == 0.3
    assert training.rule_threshold({"c": f1["c"]}, best, 0.01) == 0.1
    assert training.rule_threshold(f1, best, 0.01) == 0.1  # no threshold holds for all three: the best mean


def _item(dataset: str, scan_mpp: float) -> SplitImage:
    image = read_image(SAMPLE_IMAGE)
    return SplitImage(dataset, "sample", image, read_points(SAMPLE_POINTS, mpp=SAMPLE_MPP), scan_mpp)


def test_scan_groups_by_most_images() -> None:
    items = [_item("twenty", 0.5), _item("forty", 0.25), _item("forty", 0.24), _item("forty", 0.5)]
    assert training.scan_groups(items) == {"20x": ["twenty"], "40x": ["forty"]}
    assert training.scan_groups(items[:1]) == {"20x": ["twenty"]}


def test_tune_thresholds_gives_each_scan_group_its_threshold(tmp_path, monkeypatch) -> None:
    # the sample twice: once as a 20x dataset, once as a 40x one whose annotators marked only the surest nuclei
    # (its ground truth: the default detector's own points above 0.8), so the 40x group's best threshold is high
    surest = partial(Detector.from_pretrained("default").with_settings(score_threshold=0.8).detect, mpp=SAMPLE_MPP)
    twenty, forty = _item("twenty", 0.5), _item("forty", 0.25)
    forty.nuclei = surest(forty.image)
    monkeypatch.setattr(training, "load_split", lambda cfg, split: [twenty, forty])
    cfg = DetectorTrainConfig(datasets=[DatasetSpec("twenty", "x"), DatasetSpec("forty", "y")])
    out = tmp_path / "tuned.safetensors"
    chosen = training.tune_thresholds("default", cfg, out, thresholds=(0.2, 0.5, 0.7, 0.8), nms_radii_um=(3.0,))
    assert chosen["score_threshold"] in (0.2, 0.5) and chosen["score_threshold_40x"] >= 0.7
    saved = Detector.from_pretrained(out).config
    assert (saved.score_threshold, saved.score_threshold_40x) == (chosen["score_threshold"],
                                                                   chosen["score_threshold_40x"])


@pytest.mark.filterwarnings("ignore:.*implausibly few nuclei")  # the 20x run finds none, on purpose
def test_slide_runs_use_the_threshold_of_the_slide_scan(tmp_path) -> None:
    from denuc.inference.pipeline import Pipeline
    from denuc.inference.slide import predict_slide
    from denuc.io.slides import open_slide

    detector = Detector.from_pretrained("default").with_settings(score_threshold=1.0, score_threshold_40x=0.5)
    model = Pipeline(detector)
    for mpp, threshold in ((SAMPLE_MPP, 1.0), (SAMPLE_MPP / 2, 0.5)):  # the sample read as a 20x, then a 40x scan
        with open_slide(SAMPLE_IMAGE, mpp=mpp) as slide:
            summary = predict_slide(slide, model, tmp_path / str(mpp), tissue_mask=False, progress=False)
        assert summary["model"]["score_threshold"] == threshold
        assert (summary["nuclei"] > 50) == (threshold == 0.5)  # no score passes 1.0


@pytest.mark.filterwarnings("ignore:.*implausibly few nuclei")  # none found at 1.0, on purpose
@pytest.mark.parametrize("command", ["detect", "predict"])
def test_threshold_option_sets_one_threshold_for_every_scan(tmp_path, command: str) -> None:
    from denuc.cli import main

    # the sample read as a 40x scan: `default`'s 40x threshold (0.1) finds nuclei, --threshold 1.0 none
    assert Detector.from_pretrained("default").config.score_threshold_40x < 1.0
    for option, found in (([], True), (["--threshold", "1.0"], False)):
        out = tmp_path / str(found)
        assert main([command, str(SAMPLE_IMAGE), "--mpp", str(SAMPLE_MPP / 2), *option, "--out", str(out)]) == 0
        assert (len(read_points(out / "sample_brcam2c.csv", mpp=SAMPLE_MPP / 2)) > 100) == found


def test_predict_detector_auto_runs_precise_on_40x_scans_only(tmp_path) -> None:
    """`predict --detector auto`: each input's detector follows its scan, `precise` for a 40x one (finer than
    FINE_SCAN_MPP), the bundle's own for a 20x one; the summary says which ran, and the 40x input's nuclei are those
    `--detector precise` finds."""
    import json

    from denuc.cli import main
    from denuc.io.slides import write_pyramidal_tiff

    forty = tmp_path / "forty.tif"  # the sample's tissue as a 40x scan of it
    write_pyramidal_tiff(forty, resample(read_image(SAMPLE_IMAGE), 2.0), mpp=SAMPLE_MPP / 2)
    assert main(["predict", str(forty), "--sample", "--detector", "auto", "--out", str(tmp_path / "auto"),
                 "--quiet"]) == 0
    assert main(["predict", str(forty), "--detector", "precise", "--out", str(tmp_path / "precise"), "--quiet"]) == 0
    summary = {name: json.loads((tmp_path / "auto" / f"{name}_summary.json").read_text())
               for name in ("forty", "sample_brcam2c")}
    precise = json.loads((tmp_path / "precise" / "forty_summary.json").read_text())
    assert summary["forty"]["provenance"]["detector"]["tag"] == precise["provenance"]["detector"]["tag"]
    assert summary["sample_brcam2c"]["provenance"]["detector"] is None  # the bundle's own
    assert summary["forty"]["nuclei"] == precise["nuclei"] > 100
    fingerprints = [s["model"]["sha256"] for s in (summary["forty"], precise, summary["sample_brcam2c"])]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]
