"""The command line agrees with itself (issue 29): `predict --taxonomy` chooses the bundle's classifier head;
`detect` reads an input as `predict --detector-only` does (the file's own pixel size, carrying on after a bad
image, an `_overview.png`); an `--mpp` that contradicts a slide's metadata by more than 10% is warned about."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_IMAGE
from PIL import Image

from denuc import hub
from denuc.cli import main
from denuc.config import DetectorConfig
from denuc.inference.detect import Detector
from denuc.io import read_points
from denuc.io.slides import open_slide, write_pyramidal_tiff
from denuc.models.detector import PointDetector

torch.set_num_threads(1)  # the suite shares two cores; more threads only contend


def run_cli(argv: list, capsys) -> tuple[int, str, str]:
    """``denuc ARGV`` in this process: the exit status, stdout and stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's errors and --help
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny untrained detector (fast), the sample as a pyramidal TIFF whose metadata says 0.5 um/px, the sample
    as PNG, and a corrupt image."""
    root = tmp_path_factory.mktemp("consistency")
    torch.manual_seed(0)
    Detector(PointDetector(DetectorConfig(head_stride=4, score_threshold=0.53))).save(root / "tiny.safetensors")
    sample = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))
    write_pyramidal_tiff(root / "slide.tif", sample, mpp=0.5)
    Image.fromarray(sample).save(root / "image.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    return {"model": root / "tiny.safetensors", "tiff": root / "slide.tif", "png": root / "image.png",
            "corrupt": root / "corrupt.png", "root": root}


def bundle_heads() -> dict[str, list[str]]:
    return hub.describe("default-bundle")["taxonomies"]


# ------------------------------------------------------------------------------------------ predict --taxonomy

def test_predict_help_lists_the_default_bundles_taxonomies(capsys) -> None:
    code, out, _ = run_cli(["predict", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())  # argparse wraps the help text
    for head, classes in bundle_heads().items():
        assert f"{head} ({', '.join(classes)})" in text


def test_predict_refuses_an_unknown_taxonomy_listing_the_bundles(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["predict", "--sample", "--taxonomy", "breast", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "--taxonomy 'breast': no such classifier head" in err and ", ".join(bundle_heads()) in err
    assert len(err.strip().splitlines()) == 1


def test_predict_refuses_taxonomy_with_detector_only(tmp_path: Path, capsys) -> None:
    head = next(iter(bundle_heads()))
    code, _, err = run_cli(["predict", "--sample", "--detector-only", "--taxonomy", head, "--out", tmp_path / "o"],
                           capsys)
    assert code == 2 and "--detector-only runs no classifier" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_predict_taxonomy_chooses_the_classifier_head(tmp_path: Path, capsys) -> None:
    """The head that is not the default: the summary's classes and every label are that head's."""
    heads = bundle_heads()
    head = list(heads)[-1]
    assert head != list(heads)[0], "the default bundle should have two heads"
    code, _, err = run_cli(["predict", "--sample", "--taxonomy", head, "--runtime", "torch", "--quiet",
                            "--out", tmp_path], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "sample_brcam2c_summary.json").read_text())
    assert [c["name"] for c in summary["model"]["classes"]] == heads[head]
    labels = set(read_points(tmp_path / "sample_brcam2c.csv").labels.astype(str))
    assert labels and labels <= set(heads[head])


# ------------------------------------------------------------------------------------ detect as predict does

def test_detect_uses_a_slides_own_pixel_size(files: dict, capsys) -> None:
    """A TIFF whose metadata says 0.5 um/px: without --mpp `detect` uses it, and finds what --mpp 0.5 finds."""
    common = ["--model", files["model"], "--runtime", "torch"]
    code, out, err = run_cli(["detect", files["tiff"], "--out", files["root"] / "own", *common], capsys)
    assert code == 0, err
    # no contradicted pixel size (the untrained detector's low scores are warned about: the plausibility check)
    assert "differs by more than" not in err
    code, _, err = run_cli(["detect", files["tiff"], "--mpp", "0.5", "--out", files["root"] / "given", *common],
                           capsys)
    assert code == 0 and "differs by more than" not in err  # the metadata's own value: nothing to warn about
    own, given = (read_points(files["root"] / name / "slide.csv") for name in ("own", "given"))
    assert len(own) > 0
    np.testing.assert_array_equal(own.xy, given.xy)
    assert sorted(p.name for p in (files["root"] / "own").iterdir()) == ["slide.csv", "slide.geojson",
                                                                         "slide_overview.png"]


def test_detect_carries_on_after_a_bad_image(files: dict, capsys) -> None:
    out = files["root"] / "batch"
    code, stdout, err = run_cli(["detect", files["corrupt"], files["png"], "--mpp", "0.5", "--out", out,
                                 "--model", files["model"], "--runtime", "torch"], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"{files['corrupt']}: cannot read image" in err
    assert f"1 of 2 images not done: {files['corrupt']}" in err
    assert (out / "image_overview.png").stat().st_size > 0 and (out / "image.csv").is_file()
    assert not (out / "corrupt.csv").exists()
    assert "image.csv" in stdout


# ------------------------------------------------------------------------------- --mpp against the metadata

def test_open_slide_warns_only_when_mpp_contradicts_the_metadata_by_more_than_10_percent(files: dict) -> None:
    with pytest.warns(UserWarning, match=r"--mpp 0\.25 um/px differs .* 0\.5 um/px .*using --mpp 0\.25"):
        with open_slide(files["tiff"], mpp=0.25) as slide:
            assert slide.mpp == 0.25 and "metadata says 0.5" in slide.mpp_source
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within 10%, and no metadata at all: silent
        for path, mpp in ((files["tiff"], 0.54), (files["tiff"], 0.46), (files["png"], 0.25)):
            with open_slide(path, mpp=mpp) as slide:
                assert slide.mpp_source == "--mpp"


def test_detect_and_predict_warn_about_a_contradicted_mpp(files: dict, capsys) -> None:
    common = ["--model", files["model"], "--runtime", "torch"]
    code, _, err = run_cli(["detect", files["tiff"], "--mpp", "0.25", "--out", files["root"] / "d25", *common],
                           capsys)
    assert code == 0 and "denuc detect: warning:" in err and "0.25" in err and "0.5 um/px" in err

    code, _, err = run_cli(["predict", files["tiff"], "--detector-only", "--mpp", "0.25", "--quiet",
                            "--out", files["root"] / "p25", *common], capsys)
    assert code == 0, err
    assert "denuc predict: warning:" in err and "using --mpp 0.25" in err
    summary = json.loads((files["root"] / "p25" / "slide_summary.json").read_text())
    assert summary["mpp"] == 0.25 and "metadata says 0.5" in summary["mpp_source"]
