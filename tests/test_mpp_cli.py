"""The pixel size on the command line (issue 29): `--mpp auto` estimates it from each input (also a manifest's
`auto`), and every run checks the pixel size it used: warnings in the summary and on stderr."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_IMAGE, SAMPLE_MPP, SHARED, needs_shared
from PIL import Image

from denuc.cli import main
from denuc.config import MPP_AUTO
from denuc.inference.cohort import read_manifest
from denuc.inference.mpp import CONTRADICTION_FACTOR, default_detector, open_for_run
from denuc.io import read_points
from denuc.io.slides import write_pyramidal_tiff

torch.set_num_threads(1)  # the suite shares two cores; more threads only contend

CMU = SHARED / "slides" / "CMU-1-Small-Region.svs"
FINE_MPP = SAMPLE_MPP / 2  # the sample upsampled 2x: the scan a 40x scanner would give
DETECTOR = ["--detector-only", "--runtime", "torch"]  # the shipped default detector: the estimator's own


def run_cli(argv: list, capsys) -> tuple[int, str, str]:
    """``denuc ARGV`` in this process: the exit status, stdout and stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's errors
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_denuc(argv: list) -> subprocess.CompletedProcess:
    """``denuc ARGV`` in a fresh process: what a user sees."""
    return subprocess.run([sys.executable, "-m", "denuc.cli", *map(str, argv)], capture_output=True, text=True)


def summary_of(out: Path, stem: str) -> dict:
    return json.loads((out / f"{stem}_summary.json").read_text())


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The sample at 2x its resolution (0.25 um/px, no pixel size in the PNG), a 6 x 6 px image, and the sample
    as a TIFF whose metadata says 1.0 um/px (twice its true 0.5)."""
    root = tmp_path_factory.mktemp("mpp_cli")
    sample = Image.open(SAMPLE_IMAGE).convert("RGB")
    sample.resize((sample.width * 2, sample.height * 2), Image.Resampling.BICUBIC).save(root / "fine.png")
    sample.crop((0, 0, 6, 6)).save(root / "tiny.png")
    write_pyramidal_tiff(root / "mislabelled.tif", np.asarray(sample), mpp=2 * SAMPLE_MPP)
    return {"fine": root / "fine.png", "tiny": root / "tiny.png", "mislabelled": root / "mislabelled.tif",
            "root": root}


@pytest.fixture(scope="module")
def true_run(files: dict) -> tuple[dict, int]:
    """`predict` on the 2x sample at its true pixel size: the summary and the nuclei found."""
    out = files["root"] / "true"
    assert main(["predict", str(files["fine"]), "--mpp", str(FINE_MPP), "--out", str(out), *DETECTOR,
                 "--quiet"]) == 0
    return summary_of(out, "fine"), len(read_points(out / "fine.csv"))


def test_predict_mpp_auto_estimates_and_records_the_pixel_size(files: dict, true_run: tuple[dict, int]) -> None:
    out = files["root"] / "auto"
    done = run_denuc(["predict", files["fine"], "--mpp", "auto", "--out", out, *DETECTOR])
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    summary = summary_of(out, "fine")
    estimate = summary["mpp_estimate"]
    assert summary["mpp_source"] == "estimated" and summary["mpp"] == estimate["mpp"]
    assert 1 / 1.5 <= estimate["mpp"] / FINE_MPP <= 1.5, estimate
    assert 0 < estimate["confidence"] <= 1 and estimate["windows"] >= 1
    assert (f"{files['fine']}: pixel size estimated from the image: {estimate['mpp']:.2f} um/px (confidence "
            f"{estimate['confidence']:.2f})") in done.stdout
    # about the nuclei the true pixel size finds (the count scales with the pixel size's error, here a few %)
    reference, count = true_run
    assert reference["mpp_source"] == "--mpp" and reference["mpp_estimate"] is None  # a small image: no estimate
    assert reference["warnings"] == [] and summary["warnings"] == []
    assert abs(len(read_points(out / "fine.csv")) / count - 1) <= 0.1


def test_a_wrong_mpp_is_warned_about_in_the_summary(files: dict, true_run: tuple[dict, int], capsys) -> None:
    """The 0.25 um/px image run as 1.0 um/px (4x off): the detector's scores give it away, without an estimate."""
    out = files["root"] / "wrong"
    code, _, err = run_cli(["predict", files["fine"], "--mpp", "1.0", "--out", out, *DETECTOR, "--quiet"], capsys)
    assert code == 0, err
    summary = summary_of(out, "fine")
    assert summary["warnings"] and all("pixel size" in text for text in summary["warnings"]), summary["warnings"]
    for text in summary["warnings"]:
        assert f"denuc predict: warning: {files['fine']}: {text}" in err


def test_mpp_auto_on_an_image_too_small_to_estimate_is_one_clear_error(files: dict) -> None:
    done = run_denuc(["predict", files["tiny"], "--mpp", "auto", "--out", files["root"] / "tiny", *DETECTOR])
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert (f"denuc predict: error: {files['tiny']}: too small to estimate its pixel size from (6 x 6 px): pass it "
            "with --mpp") in done.stderr


def test_detect_mpp_auto(files: dict, capsys) -> None:
    out = files["root"] / "detect"
    code, stdout, err = run_cli(["detect", files["fine"], files["tiny"], "--mpp", "auto", "--out", out,
                                 "--runtime", "torch"], capsys)
    assert code == 2 and "Traceback" not in err  # the tiny image fails, the other is done
    assert f"{files['tiny']}: too small to estimate its pixel size" in err
    estimated = re.search(rf"{re.escape(str(files['fine']))}: pixel size estimated from the image: ([0-9.]+) um/px",
                          stdout)
    assert estimated and 1 / 1.5 <= float(estimated.group(1)) / FINE_MPP <= 1.5, stdout
    assert len(read_points(out / "fine.csv")) > 0


def test_mpp_auto_warns_when_the_metadata_contradicts_the_estimate(files: dict) -> None:
    """--mpp auto uses the estimate; metadata twice the truth is named, as a contradicted --mpp is."""
    with pytest.warns(UserWarning, match=r"1 um/px in its metadata; using the estimate"):
        with open_for_run(files["mislabelled"], MPP_AUTO, lambda: default_detector()) as (slide, estimate):
            assert slide.mpp == estimate.mpp and estimate.factor_to(2 * SAMPLE_MPP) > CONTRADICTION_FACTOR
            assert slide.mpp_source == "estimated (the metadata says 1 um/px)"


def test_manifest_accepts_auto(tmp_path: Path) -> None:
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("path,mpp,out_name\na.svs,auto,\nb.svs,0.5,\n")
    auto, given = read_manifest(manifest)
    assert (auto.mpp, auto.mpp_source) == (MPP_AUTO, None)
    assert (given.mpp, given.mpp_source) == (0.5, "manifest cohort.csv line 3")


def test_manifest_auto_runs_as_a_cohort(files: dict, capsys) -> None:
    (files["root"] / "cohort.csv").write_text("path,mpp,out_name\nfine.png,auto,\n")
    out = files["root"] / "cohort"
    code, stdout, err = run_cli(["predict", "--manifest", files["root"] / "cohort.csv", "--out", out, *DETECTOR],
                                capsys)
    assert code == 0, err
    summary = summary_of(out, "fine")
    assert summary["mpp_source"] == "estimated" and 1 / 1.5 <= summary["mpp"] / FINE_MPP <= 1.5
    row = (out / "cohort.csv").read_text().splitlines()
    header, values = row[0].split(","), row[1].split(",")
    assert float(values[header.index("mpp_estimate")]) == pytest.approx(summary["mpp_estimate"]["mpp"])
    assert "pixel size estimated from the image" in stdout


def test_mpp_option_names_auto_when_refused(capsys) -> None:
    code, _, err = run_cli(["predict", "--sample", "--mpp", "abc", "--out", "x"], capsys)
    assert code == 2 and "argument --mpp" in err and "auto" in err


@needs_shared(CMU)
def test_a_slide_is_checked_against_its_estimate(tmp_path: Path, capsys) -> None:
    """Issue 29's case: CMU-1 (0.499 um/px) run as 0.25 finds a third of its nuclei; every slide is estimated, and
    the estimate contradicts the pixel size used."""
    code, _, err = run_cli(["predict", CMU, "--mpp", "0.25", "--out", tmp_path, "--model", "fast", *DETECTOR,
                            "--quiet"], capsys)
    assert code == 0, err
    summary = summary_of(tmp_path, CMU.stem)
    assert summary["mpp_estimate"]["mpp"] > 0.25 * CONTRADICTION_FACTOR
    assert any("looks like" in text and "0.25 um/px used" in text for text in summary["warnings"]), summary
    assert "check the pixel size" in err
