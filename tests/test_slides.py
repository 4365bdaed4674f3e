"""Whole-slide prediction: reading slides, pixel sizes, tissue, ownership, resume, outputs, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAMPLE_IMAGE, SAMPLE_MPP, SHARED, needs_shared
from PIL import Image

from denuc.cli import main
from denuc.config import ClassifierConfig, DetectorConfig
from denuc.errors import InputError
from denuc.inference.classify import Classifier
from denuc.inference.detect import Detector
from denuc.inference.pipeline import Pipeline
from denuc.inference.slide import predict_slide
from denuc.inference.tissue import detect_tissue
from denuc.io import read_points
from denuc.io.overlay import UNLABELLED_COLOR
from denuc.io.slides import open_slide, write_pyramidal_tiff
from denuc.io.tables import NucleusTableWriter
from denuc.models.detector import PointDetector
from denuc.nuclei import UNLABELLED, Nuclei, NucleusClass

SLIDES = SHARED / "slides"
CMU = SLIDES / "CMU-1-Small-Region.svs"
TCGA = SLIDES / "TCGA-CR-7395-01A-01-TS1.svs"
BROKEN = SLIDES / "broken.svs"
DEFAULT_DETECTOR = Path(__file__).resolve().parents[1] / "denuc" / "weights" / "detector_default.safetensors"
TINY_CLASSIFIER = ClassifierConfig(encoder="timm:test_efficientnet")  # 99k parameters: fast, untrained
needs_cmu = needs_shared(CMU)


torch.set_num_threads(1)  # the suite shares two cores; more threads only contend


def tiny_model() -> Pipeline:
    """An untrained detector whose threshold lets through about 1% of anchors: points to move around."""
    torch.manual_seed(0)
    return Pipeline(Detector(PointDetector(DetectorConfig(head_stride=4, score_threshold=0.53))))


def test_model_fingerprint_changes_with_test_time_views() -> None:
    """Resumed work must come from the same settings: test-time views change what the model outputs."""
    from denuc.inference.slide import model_fingerprint

    model = Pipeline(tiny_model().detector, Classifier.create(ClassifierConfig(encoder="timm:test_efficientnet"),
                                                            {"t": [NucleusClass("a")]}))
    plain = model_fingerprint(model)
    model.detector.with_settings(test_time_views=8)
    only_detector = model_fingerprint(model)
    model.with_test_time_views(8)
    assert len({plain, only_detector, model_fingerprint(model)}) == 3


def overview_legend(path: str | Path, side: int = 930) -> set[tuple[int, int, int]]:
    """The class colours in the legend strip below an overview of ``side`` px (the small slide's own pixels)."""
    drawn = np.asarray(Image.open(path).convert("RGB"))
    assert drawn.shape[1] == side and drawn.shape[0] > side
    colors = {tuple(c) for c in np.unique(drawn[side:].reshape(-1, 3), axis=0).tolist()}
    return colors & {UNLABELLED_COLOR, (255, 0, 0), (0, 0, 255)}


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory) -> Path:
    """A 930 x 930 pyramidal TIFF at 0.5 um/px: the bundled sample and its mirror images, 2 x 2 (seamless), so
    that the detector's tiles make more than two chunks of four."""
    sample = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))
    top = np.concatenate([sample, sample[:, ::-1]], axis=1)
    path = tmp_path_factory.mktemp("slide") / "sample_2x2.tif"
    write_pyramidal_tiff(path, np.concatenate([top, top[::-1]], axis=0), SAMPLE_MPP)
    return path


# --- reading slides -----------------------------------------------------------------------------------------


@needs_cmu
def test_real_svs_opens_with_its_pixel_size() -> None:
    with open_slide(CMU) as slide:
        assert slide.backend == "openslide"
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_source == "metadata: openslide.mpp-x, openslide.mpp-y"
        assert slide.best_level(0.5) == 0
        region = slide.read_region(-10, 2960, 0, 20, 20)  # reaches outside the slide: white there
        assert region.shape == (20, 20, 3) and (region[7:] == 255).all() and (region[:, :10] == 255).all()


@needs_shared(TCGA)
def test_slide_without_pixel_size_needs_mpp() -> None:
    with pytest.raises(InputError, match="pixel size unknown.*--mpp") as error:
        open_slide(TCGA)
    assert error.value.source == str(TCGA)
    with open_slide(TCGA, mpp=0.25) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.25, "--mpp")
        assert slide.best_level(0.5) == 1  # the 2x level is at 0.5 um/px: read it, not level 0


@needs_shared(BROKEN)
def test_broken_slide_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="unsupported or unreadable slide format") as error:
        open_slide(BROKEN)
    assert error.value.source == str(BROKEN)


def test_plain_image_needs_mpp_and_opens_with_it(tmp_path: Path) -> None:
    path = tmp_path / "he.png"
    Image.new("RGB", (300, 200), (200, 120, 180)).save(path, dpi=(72, 72))  # editor dpi is not a pixel size
    with pytest.raises(InputError, match="--mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.backend == "pil" and slide.dimensions == (300, 200)
        assert slide.thumbnail(150).shape == (100, 150, 3)


def test_saturation_is_hsv_saturation() -> None:
    from denuc.inference.tissue import saturation

    rgb = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    rgb[0, 0] = 0  # black: saturation 0, no division by zero
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV"))
    assert saturation(rgb)[0, 0] == 0
    np.testing.assert_allclose(saturation(rgb) * 255, hsv[..., 1], atol=1.0)  # Pillow stores whole numbers


def test_tissue_mask_finds_stained_area_not_glass() -> None:
    image = np.full((200, 200, 3), 240, np.uint8)
    image[50:150, 60:160] = (180, 90, 160)  # pink-purple "tissue"
    mask = detect_tissue(image, mpp=2.0).mask
    assert mask[60:140, 70:150].all() and not mask[:40].any() and not mask[:, :50].any()
    assert not detect_tissue(np.full((100, 100, 3), 245, np.uint8), mpp=2.0).mask.any()


# --- the engine ---------------------------------------------------------------------------------------------


def test_slide_engine_matches_whole_image_detection(small_slide: Path, tmp_path: Path) -> None:
    """At the model's own pixel size, slide tiles are the whole-image tiles: the same nuclei, none doubled. So
    too at the slide's 0.499 um/px, within 1% of the model's: neither path resamples (RESAMPLE_TOLERANCE)."""
    model = tiny_model()
    image = open_slide(small_slide).read_region(0, 0, 0, 600, 500)
    Image.fromarray(image).save(tmp_path / "crop.png")
    order = lambda xy: xy[np.lexsort((xy[:, 1], xy[:, 0]))]  # noqa: E731
    for mpp in (0.5, 0.499):
        with open_slide(tmp_path / "crop.png", mpp=mpp) as slide:
            summary = predict_slide(slide, model, tmp_path / str(mpp), tissue_mask=False, progress=False)
        expected = model.predict(image, mpp=mpp)
        found = read_points(tmp_path / str(mpp) / "crop.csv")
        assert summary["nuclei"] == len(found) > 50
        np.testing.assert_allclose(order(found.xy), order(expected.xy), atol=1e-9)


def test_interrupted_run_resumes_to_identical_nuclei(small_slide: Path, tmp_path: Path) -> None:
    model = tiny_model()
    with open_slide(small_slide) as slide:
        reference = predict_slide(slide, model, tmp_path / "whole", chunk_tiles=4, progress=False)

        def stop_after_two(done: int) -> None:
            if done == 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            predict_slide(slide, model, tmp_path / "cut", chunk_tiles=4, progress=False, on_chunk=stop_after_two)
        assert not list((tmp_path / "cut").glob("sample_2x2*")), "no output may appear before the run completes"
        resumed = predict_slide(slide, model, tmp_path / "cut", chunk_tiles=4, progress=False, resume=True)
        again = predict_slide(slide, model, tmp_path / "cut", chunk_tiles=4, progress=False)
    assert reference["tiles"]["chunks"] > 2 and resumed["tiles"]["chunks_reused"] == 2
    assert again.get("skipped") is True  # complete with the same settings: kept, not recomputed
    a, b = (pq.read_table(tmp_path / run / "sample_2x2.parquet") for run in ("whole", "cut"))
    assert a.num_rows == reference["nuclei"] > 50 and a.equals(b)
    assert not (tmp_path / "cut" / ".sample_2x2.partial").exists()


@needs_cmu
def test_killed_cli_run_resumes_to_identical_nuclei(tmp_path: Path) -> None:
    """SIGKILL a real `denuc predict` once its first chunk is saved; `--resume` must end with the same table."""
    model = tmp_path / "tiny.safetensors"
    tiny_model().detector.save(model)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "denuc.cli", "predict", str(CMU), "--out", str(out), "--model", str(model),
               "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count as this process: bit-identical scores
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 120
    while not list(out.glob(".CMU-1-Small-Region.partial/chunk_*.parquet")) and process.poll() is None:
        assert time.monotonic() < deadline, "no chunk saved within 2 minutes"
        time.sleep(0.05)
    process.kill()
    assert process.wait() == -signal.SIGKILL, "the run ended by itself before it could be killed"
    subprocess.run(command + ["--resume"], env=env, check=True)
    summary = json.loads((out / "CMU-1-Small-Region_summary.json").read_text())
    assert summary["tiles"]["chunks_reused"] >= 1
    with open_slide(CMU) as slide:
        # the command's default runtime on a CPU ("auto": ONNX Runtime), so the scores are bit-identical
        predict_slide(slide, Pipeline.from_pretrained(model, runtime="auto"), tmp_path / "reference", progress=False)
    reference = pq.read_table(tmp_path / "reference" / "CMU-1-Small-Region.parquet")
    assert reference.num_rows > 100 and reference.equals(pq.read_table(out / "CMU-1-Small-Region.parquet"))


def test_outputs_agree_and_geojson_has_what_qupath_reads(small_slide: Path, tmp_path: Path) -> None:
    with open_slide(small_slide) as slide:
        summary = predict_slide(slide, tiny_model(), tmp_path, progress=False, model_name="tiny")
    stem = tmp_path / "sample_2x2"
    data = json.loads(stem.with_suffix(".geojson").read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == summary["nuclei"]
    for feature in data["features"][:50]:
        uuid.UUID(feature["id"])
        assert feature["geometry"]["type"] == "Point"
        assert feature["properties"]["objectType"] == "detection"
        assert 0 <= feature["properties"]["measurements"]["score"] <= 1
    parquet = pq.read_table(stem.with_suffix(".parquet"))
    assert parquet.column_names == ["id", "x", "y", "x_um", "y_um", "label", "score"]
    from_csv, from_geojson = read_points(stem.with_suffix(".csv")), read_points(stem.with_suffix(".geojson"))
    np.testing.assert_array_equal(from_csv.xy[:, 0], parquet["x"].to_numpy())
    np.testing.assert_allclose(from_geojson.xy, from_csv.xy, atol=1e-9)
    np.testing.assert_allclose(parquet["x_um"].to_numpy(), (from_csv.xy[:, 0] + 0.5) * SAMPLE_MPP)
    assert summary["mpp_source"] == "metadata: openslide.mpp-x, openslide.mpp-y"
    assert summary["density_per_mm2"]["all"] == pytest.approx(summary["nuclei"] / summary["tissue"]["area_mm2"])
    for suffix in ("_overview.png", "_tissue.png"):
        Image.open(f"{stem}{suffix}").verify()
    assert overview_legend(f"{stem}_overview.png") == {UNLABELLED_COLOR}  # a detector alone: one colour


def test_classified_tables_round_trip(tmp_path: Path) -> None:
    classes = [NucleusClass("tumour", (255, 0, 0)), NucleusClass("lymphocyte, small", (0, 0, 255))]
    nuclei = Nuclei(xy=[[10.0, 20.5], [3000.25, 7.0], [5.0, 5.0]], labels=["tumour", "lymphocyte, small", UNLABELLED],
                    scores=[0.9, 0.8, 0.7], probs=[[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]], classes=classes)
    with NucleusTableWriter(tmp_path / "s", classes, mpp=0.25) as writer:
        assert writer.write(nuclei.subset([0, 1])).tolist() == [0, 1]
        assert writer.write(nuclei.subset([2])).tolist() == [2]
    feature = json.loads((tmp_path / "s.geojson").read_text())["features"][0]
    assert feature["properties"]["classification"] == {"name": "tumour", "color": [255, 0, 0]}
    assert feature["properties"]["measurements"]["prob: lymphocyte, small"] == 0.3
    for suffix in (".csv", ".geojson"):
        back = read_points(tmp_path / f"s{suffix}", classes=classes)
        np.testing.assert_allclose(back.xy, nuclei.xy, atol=1e-9)
        assert back.labels.tolist() == nuclei.labels.tolist()
        np.testing.assert_array_equal(back.probs, nuclei.probs)
    assert pq.read_table(tmp_path / "s.parquet").column_names[-2:] == ["prob_tumour", "prob_lymphocyte, small"]


def test_classifier_labels_probabilities_and_embeddings(small_slide: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    classes = [NucleusClass("tumour", (255, 0, 0)), NucleusClass("other", (0, 0, 255))]
    model = Pipeline(tiny_model().detector, Classifier.create(TINY_CLASSIFIER, {"t": classes}))
    with open_slide(small_slide) as slide:
        summary = predict_slide(slide, model, tmp_path, embeddings=True, progress=False)
    parquet = pq.read_table(tmp_path / "sample_2x2.parquet")
    assert parquet.column_names[-2:] == ["prob_tumour", "prob_other"] and parquet.num_rows == summary["nuclei"] > 0
    assert set(parquet["label"].to_pylist()) <= {"tumour", "other"}
    assert sum(summary["counts"].values()) == summary["nuclei"]
    vectors = np.load(tmp_path / "sample_2x2_embeddings.npy")
    assert vectors.dtype == np.float16 and len(vectors) == summary["nuclei"] and vectors.shape[1] > 0
    feature = json.loads((tmp_path / "sample_2x2.geojson").read_text())["features"][0]
    assert feature["properties"]["classification"]["name"] in ("tumour", "other")
    assert overview_legend(tmp_path / "sample_2x2_overview.png") == {(255, 0, 0), (0, 0, 255)}


def test_blank_slide_gives_valid_empty_outputs_and_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "glass.png"
    Image.new("RGB", (600, 400), (243, 243, 241)).save(path)
    with open_slide(path, mpp=0.5) as slide, pytest.warns(UserWarning, match="no tissue found"):
        summary = predict_slide(slide, tiny_model(), tmp_path / "out", progress=False)
    assert summary["nuclei"] == 0 and summary["tiles"]["processed"] == 0
    assert json.loads((tmp_path / "out" / "glass.geojson").read_text())["features"] == []
    assert pq.read_table(tmp_path / "out" / "glass.parquet").num_rows == 0


# --- the command line ---------------------------------------------------------------------------------------


@needs_shared(BROKEN)
@needs_shared(TCGA)
def test_cli_reports_broken_slides_and_goes_on(tmp_path: Path, capsys) -> None:
    model = tmp_path / "tiny.safetensors"
    tiny_model().detector.save(model)
    code = main(["predict", str(BROKEN), str(TCGA), "--sample", "--out", str(tmp_path / "out"), "--model", str(model),
                 "--quiet", "--tta", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{BROKEN}: unsupported or unreadable slide format" in err
    assert f"{TCGA}: pixel size unknown" in err and "--mpp" in err
    summary = json.loads((tmp_path / "out" / "sample_brcam2c_summary.json").read_text())
    assert summary["mpp"] == 0.5 and summary["mpp_source"].startswith("bundled sample")
    assert summary["model"]["detector"]["test_time_views"] == 2  # --tta reaches the model


@needs_cmu
@pytest.mark.skipif(not DEFAULT_DETECTOR.is_file(), reason="default detector weights not built yet")
def test_default_model_finds_a_plausible_number_of_nuclei_on_cmu(tmp_path: Path) -> None:
    with open_slide(CMU) as slide:
        summary = predict_slide(slide, Pipeline.from_pretrained("default"), tmp_path, progress=False)
    # H&E skin (epidermis and dermis) holds roughly 1,000 to 10,000 nuclei per mm^2; the region has ~0.6 mm^2.
    assert 0.4 < summary["tissue"]["area_mm2"] < 1.0
    assert 1000 < summary["density_per_mm2"]["all"] < 10000
    assert summary["overview"] == "dots"


@needs_cmu
def test_level_in_memory_reads_the_same_pixels() -> None:
    with open_slide(CMU) as slide:
        w, h = slide.dimensions
        regions = [(0, 0, 300, 200), (w - 100, h - 50, 256, 256), (-20, 700, 64, 600), (1000, 1234, 1, 1)]
        decoded = [slide.read_region(x, y, 0, rw, rh) for x, y, rw, rh in regions]
        thumbnail = slide.thumbnail(700)
        with slide.level_in_memory(0, workers=2):
            assert 0 in slide._in_memory
            for (x, y, rw, rh), expected in zip(regions, decoded):
                np.testing.assert_array_equal(slide.read_region(x, y, 0, rw, rh), expected)
            np.testing.assert_array_equal(slide.thumbnail(700), thumbnail)
        assert not slide._in_memory  # released after the block


@needs_cmu
def test_thumbnail_of_a_level_too_large_to_hold_is_read_in_bands(monkeypatch) -> None:
    import tracemalloc

    import denuc.io.slides

    with open_slide(CMU) as slide:
        whole = slide.thumbnail(700)
        level_bytes = 3 * slide.dimensions[0] * slide.dimensions[1]
        monkeypatch.setattr(denuc.io.slides, "WHOLE_LEVEL_MAX_BYTES", level_bytes // 10)
        monkeypatch.setattr(denuc.io.slides, "BAND_ROWS", 64)  # bands much smaller than this small level
        tracemalloc.start()
        banded = slide.thumbnail(700)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < level_bytes / 4  # a few bands of 64 rows at a time, not the 2220 x 2967 level
    assert banded.shape == whole.shape
    # box edges that fall exactly on a pixel centre may round the other way in a band: a few rows at most
    rows_differing = (banded != whole).any(axis=(1, 2))
    assert rows_differing.mean() < 0.01 and np.abs(banded.astype(int) - whole).mean() < 0.1


@needs_cmu
def test_single_level_slide_is_decoded_once_with_the_same_outputs(tmp_path: Path, monkeypatch) -> None:
    import denuc.io.slides

    model = Pipeline.from_pretrained("default")
    with open_slide(CMU) as slide:
        kept = predict_slide(slide, model, tmp_path / "kept", progress=False)
        monkeypatch.setattr(denuc.io.slides, "WHOLE_LEVEL_MAX_BYTES", 0)  # too large to keep: decoded again
        read_twice = predict_slide(slide, model, tmp_path / "twice", progress=False)
    assert kept["slide"]["level_read_in_memory"] and not read_twice["slide"]["level_read_in_memory"]
    assert kept["nuclei"] == read_twice["nuclei"] > 1000
    assert (tmp_path / "kept" / f"{CMU.stem}.csv").read_bytes() == (tmp_path / "twice" / f"{CMU.stem}.csv").read_bytes()


def test_transparent_pixels_read_as_white_and_opaque_ones_unchanged() -> None:
    from denuc.io.slides import _rgb_on_white

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = 255
    assert (_rgb_on_white(Image.fromarray(rgba)) == (200, 100, 50)).all()  # opaque: the colour as it is
    rgba[0, 0, 3] = 0
    rgb = _rgb_on_white(Image.fromarray(rgba))
    assert (rgb[0, 0] == 255).all() and (rgb[1, 1] == (200, 100, 50)).all()  # outside the scan: white
