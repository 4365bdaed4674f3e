"""The pixel size estimated from the image, and the plausibility check of a run (denuc.inference.mpp)."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from denuc.inference.detect import Detector
from denuc.inference.mpp import (
    CANDIDATES,
    CONTRADICTION_FACTOR,
    EVIDENCE,
    MppModel,
    check_plausibility,
    estimate_mpp,
    load_model,
    summarise,
)
from denuc.io.images import read_image, resample

SAMPLE_MPP = 0.5  # denuc/data/README.md: a BRCAM2C test image (never used to fit the estimator)


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector.from_pretrained("default")


@pytest.fixture(scope="module")
def sample() -> np.ndarray:
    return read_image(resources.files("denuc") / "data" / "sample_brcam2c.png")


@pytest.fixture(scope="module")
def estimates(sample, detector) -> dict[float, object]:
    """The sample resampled to 0.25, 0.5 and 1.0 um/px, and the estimate of each."""
    return {mpp: estimate_mpp(resample(sample, SAMPLE_MPP / mpp), detector) for mpp in (0.25, 0.5, 1.0)}


@pytest.mark.parametrize("mpp", [0.25, 1.0])
def test_estimate_within_15_percent(estimates, mpp):
    estimate = estimates[mpp]
    assert abs(estimate.mpp / mpp - 1) <= 0.15, estimate
    assert 0 <= estimate.confidence <= 1
    assert estimate.probabilities.sum() == pytest.approx(1.0)
    assert set(estimate.evidence) == set(EVIDENCE)
    assert all(len(v) == len(CANDIDATES) for v in estimate.evidence.values())


@pytest.mark.parametrize("image", [np.full((4, 4, 3), 150, np.uint8), np.full((300, 300, 3), 235, np.uint8)],
                         ids=["too small at every candidate", "blank"])
def test_no_answer_without_evidence(detector, image):
    estimate = estimate_mpp(image, detector)
    assert np.isnan(estimate.mpp) and estimate.confidence == 0 and not estimate.probabilities.any()


def test_model_round_trips_and_refuses_other_evidence():
    model = load_model()
    again = MppModel.from_json(model.to_json())
    evidence = np.random.default_rng(0).random((len(CANDIDATES), len(EVIDENCE)))
    evidence[:, -1] = 0
    assert np.allclose(again.probabilities(evidence), model.probabilities(evidence))
    text = model.to_json().replace('"blob_total"', '"blob_sum"')
    with pytest.raises(ValueError, match="other evidence"):
        MppModel.from_json(text)


def test_summarise_concentrated_probability():
    p = np.zeros(len(CANDIDATES))
    k = int(np.argmin(np.abs(CANDIDATES - 0.5)))
    p[k] = 1.0
    mpp, confidence = summarise(p)
    assert mpp == pytest.approx(CANDIDATES[k]) and confidence == pytest.approx(1.0)


def test_plausibility_warns_for_wrong_pixel_sizes_only(sample, detector, estimates):
    h, w = sample.shape[:2]
    right = detector.detect(sample, mpp=SAMPLE_MPP)
    assert check_plausibility(right.scores, SAMPLE_MPP, h * w * SAMPLE_MPP**2 / 1e6, estimates[0.5]) == []
    # a 0.5 um/px scan run as 0.25 (as CMU-1 at --mpp 0.25 in issue 29): the estimate contradicts it
    too_fine = detector.detect(sample, mpp=0.25)
    warnings = check_plausibility(too_fine.scores, 0.25, h * w * 0.25**2 / 1e6, estimates[0.5])
    assert any("looks like" in text and "larger" in text for text in warnings), warnings
    # run as 10 um/px: a handful of nuclei per mm^2, and the estimate is 20x off (the nuclei are the right run's:
    # detecting at 10 um/px would take minutes; the warnings read only their count and scores)
    warnings = check_plausibility(right.scores, 10.0, h * w * 10.0**2 / 1e6, estimates[0.5])
    assert any("implausibly few nuclei" in text for text in warnings), warnings
    assert any("looks like" in text and "smaller" in text for text in warnings), warnings
    assert CONTRADICTION_FACTOR < 2  # a 2x error, the usual 20x / 40x mix-up, is always reported


def test_plausibility_without_estimate_reads_density_and_scores(sample, detector):
    h, w = sample.shape[:2]
    right = detector.detect(sample, mpp=SAMPLE_MPP)
    area = h * w * SAMPLE_MPP**2 / 1e6
    assert check_plausibility(right.scores, SAMPLE_MPP, area) == []
    unsure = np.full(len(right), 0.6)
    assert any("unsure" in text for text in check_plausibility(unsure, SAMPLE_MPP, area))
    # a 40x threshold keeps weak points besides the confident ones: they do not make the run look unsure
    with_weak = np.r_[right.scores, np.full(2 * len(right), 0.2)]
    assert check_plausibility(with_weak, SAMPLE_MPP, area) == []
    packed = np.full(2000, 0.9)  # 2,000 confident nuclei
    assert any("implausibly many" in text for text in check_plausibility(packed, SAMPLE_MPP, 0.05))
    assert check_plausibility(packed, SAMPLE_MPP, 0.01) == []  # too small an area to judge a density


def test_docs_hold_the_tables_of_the_saved_results():
    """docs/pixel_size.md's tables are benchmarks/mpp_tables.py's, read off benchmarks/results (no figure typed)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mpp_tables

    doc = mpp_tables.DOC.read_text()
    for name, table in mpp_tables.sections().items():
        assert table in doc, f"{mpp_tables.DOC}: the {name} tables differ from `python benchmarks/mpp_tables.py`"
