"""The pixel size of an H&E image estimated from its pixels, and a plausibility check of a run's nuclei.

A wrong pixel size gives plausible-looking junk (a 0.5 um/px scan run as 0.25 finds a third of its nuclei), and
many slides carry none. Nuclei have a known size range, so the image itself tells its scale, roughly.

How ``estimate_mpp`` works (docs/pixel_size.md has the measurements and the limits):

1. Candidates: pixel sizes on a geometric grid of four steps per octave, ``CANDIDATES`` (0.1 to 4 um/px, plus
   two steps beyond each end, read as context only).
2. For each candidate c, windows of the image (up to four, at its corners; for a slide or an image over REGION
   pixels, at the corners of SLIDE_REGIONS squares of tissue) are resampled as if their pixels were c um wide, to
   the detector's working resolution, and run through the detector; the measured area never reaches outside the
   image. The evidence for c (``EVIDENCE``): how many points per area the detector finds in four score bands, and
   the shape of the haematoxylin channel's scale-normalised Laplacian-of-Gaussian response over six blob sizes
   (how large the dark blobs look at that resolution). A candidate at which the measured region would be narrower
   than ``MIN_SIDE`` working pixels has no evidence and is never chosen.
3. A conditional-logit model (a quadratic score of each candidate's evidence and of its two neighbours' on each
   side, softmax over the candidates; ``denuc/weights/mpp_estimator.json``, fitted on the train splits of four
   datasets at three pixel sizes, sharp and blurred, by ``benchmarks/bench_mpp.py --fit``) gives each candidate a
   probability. The estimate is the probability-weighted geometric mean over the most probable candidate and two
   steps each side; ``confidence`` is the model's probability that the pixel size lies within 15% of the
   estimate.

The model is fitted to the evidence of the shipped ``default`` detector; another detector's scores differ, so the
estimate is only calibrated for that one (``estimate_mpp`` loads it when given none).

``check_plausibility`` reads a finished run: a density of nuclei outside what real H&E holds at the pixel size
used, or an estimate that contradicts that pixel size, is reported as a warning.

``open_for_run`` is how ``denuc predict`` and ``denuc detect`` open an input: with the pixel size the run uses
(given, the file's own, or ``MPP_AUTO``: estimated) and, where it is cheap next to the run, the estimate that
checks it (``CHECKED_MIN_SIDE``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np
from PIL import Image
from scipy import ndimage

from denuc import hub
from denuc.config import MPP_AUTO
from denuc.errors import InputError
from denuc.inference.detect import Detector
from denuc.inference.nms import point_nms
from denuc.inference.tissue import detect_tissue
from denuc.io.images import to_rgb_uint8
from denuc.io.slides import Slide, open_slide

CANDIDATES = 0.1 * 2.0 ** (np.arange(-2, 24) / 4)
"""Candidate pixel sizes (um/px): four per octave; those outside ESTIMATE_RANGE are context for their neighbours."""
ESTIMATE_RANGE = (0.1, 4.0)
WINDOW = 192  # side of a measured window in working pixels (96 um at 0.5 um/px when the candidate is right)
MIN_SIDE = 48  # a candidate at which the measured region is narrower than this (working pixels) has no evidence
REGION = 1024  # a source larger than this (pixels) is measured in REGION-sized squares of tissue, not whole
SLIDE_REGIONS = 2  # how many such squares, as far apart as the tissue allows
SCORE_BANDS = ((0.2, 0.5), (0.5, 0.8), (0.8, 0.95), (0.95, 1.01))
BLOB_SIGMAS = (1.0, 1.5, 2.5, 4.0, 6.5, 10.0)  # Laplacian-of-Gaussian scales, in working pixels
EVIDENCE = (tuple(f"points_{lo:g}-{min(hi, 1):g}" for lo, hi in SCORE_BANDS)
            + tuple(f"blob_{s:g}" for s in BLOB_SIGMAS) + ("blob_total", "no_evidence"))
"""Per-candidate evidence: log(1 + points per 10^4 working px^2) per score band; the share of each blob scale in
the summed positive LoG response, and the log of that sum; 1 where the candidate has no evidence (the others 0)."""
CONFIDENCE_BAND = 0.15  # ``confidence`` is the probability of being within this relative error
MODEL_FILE = "mpp_estimator.json"
THUMBNAIL_SIDE = 512  # a large source's tissue is found on a thumbnail of this size
NOMINAL_MPP = 0.5  # the tissue mask's morphology needs a pixel size; any within a few times of the truth will do

# Ruifrok and Johnston's haematoxylin, eosin and DAB optical-density vectors: the first column of the inverse of
# their (normalised) matrix projects an RGB optical density onto the haematoxylin (nuclear) stain
_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HAEMATOXYLIN = np.linalg.inv(_HED / np.linalg.norm(_HED, axis=1, keepdims=True))[:, 0].astype(np.float32)


@dataclass
class MppEstimate:
    """The pixel size an image appears to have.

    Attributes:
        mpp: the estimate in um/px.
        confidence: the model's probability that the pixel size is within 15% of ``mpp`` (0-1).
        candidates: the candidate pixel sizes (um/px).
        probabilities: the model's probability of each candidate (0 where it is never chosen).
        evidence: per-candidate measurements, one array per name of ``EVIDENCE``.
        windows: the most image windows measured for one candidate.
        seconds: the time the estimate took.
    """

    mpp: float
    confidence: float
    candidates: np.ndarray
    probabilities: np.ndarray
    evidence: dict[str, np.ndarray] = field(repr=False)
    windows: int = 0
    seconds: float = 0.0

    def factor_to(self, mpp: float) -> float:
        """How many times larger or smaller (>= 1) ``mpp`` is than the estimate."""
        return max(mpp / self.mpp, self.mpp / mpp)

    def summary(self) -> dict:
        """What a run's summary records of it (NaN, an estimate without an answer, as None: JSON has no NaN)."""
        return {"mpp": float(self.mpp) if np.isfinite(self.mpp) else None, "confidence": float(self.confidence),
                "windows": self.windows, "seconds": round(self.seconds, 3)}


def estimate_mpp(image_or_reader: np.ndarray | Slide, detector: Detector | None = None) -> MppEstimate:
    """Estimate the pixel size (um/px) of an RGB H&E image or an open slide from its own pixels.

    ``detector``: the shipped ``default`` detector when None (the model is fitted to its evidence). A slide's
    own pixel size (metadata or ``--mpp``) is never read. Takes a few seconds on a CPU. Where no candidate has
    evidence (an image under 12 px wide) or the detector is confident of no point at any of them (glass, a blank
    image), ``mpp`` is NaN and ``confidence`` 0.
    """
    started = time.perf_counter()
    detector = detector if detector is not None else default_detector()
    evidence, windows = measure_evidence(image_or_reader, detector)
    probabilities = candidate_probabilities(evidence)
    mpp, confidence = summarise(probabilities)
    return MppEstimate(mpp=mpp, confidence=confidence, candidates=CANDIDATES.copy(), probabilities=probabilities,
                       evidence={name: evidence[:, k] for k, name in enumerate(EVIDENCE)}, windows=windows,
                       seconds=time.perf_counter() - started)


def measure_evidence(image_or_reader: np.ndarray | Slide, detector: Detector) -> tuple[np.ndarray, int]:
    """The evidence ``estimate_mpp`` reads, (len(CANDIDATES), len(EVIDENCE)), and the most windows measured for
    one candidate."""
    regions = _regions(image_or_reader)
    rows, most = [], 0
    for c in CANDIDATES:
        tiles = [t for region in regions for t in _windows(region, c / detector.config.mpp)]
        most = max(most, len(tiles))
        rows.append(_evidence(tiles, detector) if tiles else np.r_[np.zeros(len(EVIDENCE) - 1), 1.0])
    return np.array(rows), most


def candidate_probabilities(evidence: np.ndarray, model: MppModel | None = None) -> np.ndarray:
    """Each candidate's probability given the evidence (``model``: the shipped one when None); all zero where no
    candidate can be chosen or the detector is confident of no point at any of them (glass, a blank image)."""
    confident = evidence[:, [EVIDENCE.index(name) for name in ("points_0.5-0.8", "points_0.8-0.95", "points_0.95-1")]]
    if not confident[choosable(evidence)].any():
        return np.zeros(len(evidence))
    return (model or load_model()).probabilities(evidence)


@dataclass
class MppModel:
    """The conditional-logit scorer of candidates: the ``uses`` columns of each candidate's evidence and of
    ``neighbours`` candidates on each side (the grid's ends repeated), standardised, scored by ``linear`` and, on
    the squares, ``quadratic`` weights; softmax over the candidates in ESTIMATE_RANGE that have evidence."""

    neighbours: int
    mean: np.ndarray
    std: np.ndarray
    linear: np.ndarray
    quadratic: np.ndarray
    uses: tuple[str, ...] = EVIDENCE
    provenance: dict = field(default_factory=dict)

    def features(self, evidence: np.ndarray) -> np.ndarray:
        evidence = evidence[:, [EVIDENCE.index(name) for name in self.uses]]
        n, k = len(evidence), self.neighbours
        padded = np.concatenate([np.repeat(evidence[:1], k, 0), evidence, np.repeat(evidence[-1:], k, 0)])
        return np.concatenate([padded[i:i + n] for i in range(2 * k + 1)], axis=1)

    def probabilities(self, evidence: np.ndarray) -> np.ndarray:
        allowed = choosable(evidence)
        if not allowed.any():  # too small an image at every candidate: no answer
            return np.zeros(len(evidence))
        x = (self.features(evidence) - self.mean) / self.std
        scores = np.where(allowed, x @ self.linear + (x * x) @ self.quadratic, -np.inf)
        p = np.exp(scores - scores[allowed].max())
        return p / p.sum()

    def to_json(self) -> str:
        return json.dumps({"evidence": list(EVIDENCE), "candidates": [float(c) for c in CANDIDATES],
                           "uses": list(self.uses), "neighbours": self.neighbours, "mean": self.mean.tolist(),
                           "std": self.std.tolist(), "linear": self.linear.tolist(),
                           "quadratic": self.quadratic.tolist(), "provenance": self.provenance}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "MppModel":
        data = json.loads(text)
        if (data["evidence"] != list(EVIDENCE) or not set(data["uses"]) <= set(EVIDENCE)
                or not np.allclose(data["candidates"], CANDIDATES)):
            raise ValueError("the pixel-size model was fitted to other evidence or candidates than this code measures")
        weights = (np.asarray(data[k], dtype=np.float64) for k in ("mean", "std", "linear", "quadratic"))
        return cls(data["neighbours"], *weights, uses=tuple(data["uses"]), provenance=data.get("provenance", {}))


def choosable(evidence: np.ndarray) -> np.ndarray:
    """Which candidates an estimate may be: inside ESTIMATE_RANGE, with evidence."""
    inside = (CANDIDATES >= ESTIMATE_RANGE[0] * (1 - 1e-9)) & (CANDIDATES <= ESTIMATE_RANGE[1] * (1 + 1e-9))
    return inside & (evidence[:, -1] == 0)


def summarise(probabilities: np.ndarray) -> tuple[float, float]:
    """The estimate (geometric mean of the most probable candidate and two on each side, weighted by their
    probabilities) and the probability of lying within CONFIDENCE_BAND of it (each candidate's probability spread
    evenly over its grid cell in log scale)."""
    if not probabilities.any():
        return float("nan"), 0.0
    log_c = np.log(CANDIDATES)
    step = log_c[1] - log_c[0]
    best = int(np.argmax(probabilities))
    near = slice(max(best - 2, 0), best + 3)
    estimate = float(np.sum(probabilities[near] * log_c[near]) / np.sum(probabilities[near]))
    band = np.log1p(CONFIDENCE_BAND)
    overlap = np.clip(np.minimum(log_c + step / 2, estimate + band) - np.maximum(log_c - step / 2, estimate - band),
                      0, None) / step
    return float(np.exp(estimate)), float(np.sum(probabilities * overlap))


@lru_cache(maxsize=1)
def load_model() -> MppModel:
    """The shipped model (denuc/weights/mpp_estimator.json)."""
    return MppModel.from_json((resources.files("denuc") / "weights" / MODEL_FILE).read_text())


@lru_cache(maxsize=2)
def default_detector(device: str = "cpu", runtime: str = "torch") -> Detector:
    """The shipped ``default`` detector, the one the model is fitted to, loaded once per device and runtime."""
    return Detector.from_pretrained("default", device=device, runtime=runtime)


def _regions(image_or_reader: np.ndarray | Slide) -> list[np.ndarray]:
    """The pixels measured: the whole source when it is at most REGION pixels each way, else SLIDE_REGIONS squares
    of REGION level-0 pixels centred on tissue, as far apart as it allows (the first on the most interior tissue),
    each read once."""
    slide = image_or_reader if isinstance(image_or_reader, Slide) else None
    image = None if slide is not None else to_rgb_uint8(image_or_reader)
    width, height = slide.dimensions if slide is not None else (image.shape[1], image.shape[0])

    def read(x: int, y: int, w: int, h: int) -> np.ndarray:
        return slide.read_region(x, y, 0, w, h) if slide is not None else image[y:y + h, x:x + w]

    if max(width, height) <= REGION:
        return [read(0, 0, width, height)]
    if slide is not None:
        thumbnail = slide.thumbnail(THUMBNAIL_SIDE)
    else:
        scale = THUMBNAIL_SIDE / max(width, height)
        thumbnail = np.asarray(Image.fromarray(image).resize(
            (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BOX))
    to_source = width / thumbnail.shape[1]
    mask = detect_tissue(thumbnail, NOMINAL_MPP * to_source).mask
    if not mask.any():
        mask = np.ones_like(mask)
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    ys, xs = np.nonzero(mask)
    chosen = [int(np.argmax(depth[ys, xs]))]
    distance = np.full(len(ys), np.inf)
    for _ in range(SLIDE_REGIONS - 1):  # farthest-point sampling
        distance = np.minimum(distance, np.hypot(ys - ys[chosen[-1]], xs - xs[chosen[-1]]))
        chosen.append(int(np.argmax(distance)))
    side_x, side_y = min(REGION, width), min(REGION, height)
    return [read(int(np.clip(round((xs[k] + 0.5) * to_source - side_x / 2), 0, width - side_x)),
                 int(np.clip(round((ys[k] + 0.5) * to_source - side_y / 2), 0, height - side_y)), side_x, side_y)
            for k in chosen]


def _windows(region: np.ndarray, factor: float) -> list[np.ndarray]:
    """The region's windows resampled by ``factor`` (working pixels per source pixel): WINDOW working pixels wide,
    or the whole region along a side shorter than that; at the region's corners, up to two along each side.
    Empty when the resampled window would be narrower than MIN_SIDE."""
    height, width = region.shape[:2]
    side = WINDOW / factor
    size_x, size_y = min(width, round(side)), min(height, round(side))
    out_x, out_y = round(size_x * factor), round(size_y * factor)
    if min(out_x, out_y) < MIN_SIDE:
        return []
    starts_x = [0, width - size_x] if width > size_x else [0]
    starts_y = [0, height - size_y] if height > size_y else [0]
    return [np.asarray(Image.fromarray(region[y:y + size_y, x:x + size_x]).resize(
        (out_x, out_y), Image.Resampling.BICUBIC, reducing_gap=None)) for y in starts_y for x in starts_x]


def _evidence(windows: list[np.ndarray], detector: Detector) -> np.ndarray:
    """One candidate's evidence (EVIDENCE) from its windows, all of one size, at the working resolution."""
    height, width = windows[0].shape[:2]
    # the network needs multiples of 32: pad with white (glass), and count only what lies in the window
    batch = np.full((len(windows), -(-height // 32) * 32, -(-width // 32) * 32, 3), 255, dtype=np.uint8)
    for k, window in enumerate(windows):
        batch[k, :height, :width] = window
    probs, points = detector.forward(batch)
    probs, points = probs.cpu().numpy().astype(np.float64), points.cpu().numpy().astype(np.float64)
    radius = detector.config.nms_radius_um / detector.config.mpp
    scores = []
    blob = np.zeros(len(BLOB_SIGMAS))
    for k, window in enumerate(windows):
        keep = probs[k] > SCORE_BANDS[0][0]
        xy, s = points[k][keep], probs[k][keep]
        kept = point_nms(xy, s, radius)
        xy, s = xy[kept], s[kept]
        scores.append(s[(xy[:, 0] < width) & (xy[:, 1] < height)])
        haematoxylin = -np.log((window.astype(np.float32) + 1) / 256) @ _HAEMATOXYLIN
        for q, sigma in enumerate(BLOB_SIGMAS):
            response = -sigma ** 2 * ndimage.gaussian_laplace(haematoxylin, sigma, mode="reflect")
            blob[q] += np.maximum(response, 0).sum()
    scores = np.concatenate(scores)
    area = len(windows) * height * width
    counts = [np.log1p(((scores >= lo) & (scores < hi)).sum() / (area / 1e4)) for lo, hi in SCORE_BANDS]
    blob = blob / area
    return np.r_[counts, blob / (blob.sum() + 1e-6), np.log(blob.sum() + 1e-3), 0.0]


DENSITY_RANGE = (200.0, 30000.0)
"""Nuclei per mm^2 outside which a run is implausible H&E: at the right pixel size, 70 dev images of four datasets
held 365-10,341 detected nuclei per mm^2 (benchmarks/results/mpp/plausibility.json); nuclei 5 um wide packed edge
to edge would be 40,000."""
DENSITY_MIN_AREA_MM2 = 0.05  # below this a sparse or crowded patch says little about the pixel size
MEDIAN_SCORE_FLOOR = 0.8  # at the right pixel size the lowest median detection score of those images was 0.84
MEDIAN_SCORE_OF = 0.5
"""The median is of the scores above this: the floor was set on `default`'s points at its 20x threshold, 0.5; the
lower 40x thresholds keep weaker points too, which would pull the median under the floor with nothing wrong (41%
of CoNSeP's crops at 0.1, against 8% with the median of the points above 0.5)."""
SCORE_MIN_NUCLEI = 30
CONTRADICTION_FACTOR = 1.6
"""An estimate this many times larger or smaller than the pixel size used contradicts it (docs/pixel_size.md:
the rate of false alarms and of caught 2x errors per factor)."""


def check_plausibility(scores: np.ndarray, mpp: float, area_mm2: float,
                       estimate: MppEstimate | None = None) -> list[str]:
    """Warnings (empty when none) about a run whose nuclei, with detection ``scores`` (one per nucleus, e.g.
    ``Nuclei.scores``), were found at ``mpp`` um/px over ``area_mm2`` of tissue (the image's area for a plain
    image), both measured with that pixel size. ``estimate``: the image's ``estimate_mpp``, compared with ``mpp``
    when given."""
    found = []
    count = len(scores)
    if area_mm2 >= DENSITY_MIN_AREA_MM2:
        density = count / area_mm2
        if not DENSITY_RANGE[0] <= density <= DENSITY_RANGE[1]:
            what = "few" if density < DENSITY_RANGE[0] else "many"
            found.append(f"implausibly {what} nuclei for H&E at {mpp:.3g} um/px: {density:,.0f} per mm^2 "
                         f"({count:,} in {area_mm2:.3g} mm^2; real tissue holds about "
                         f"{DENSITY_RANGE[0]:,.0f}-{DENSITY_RANGE[1]:,.0f}): is the pixel size right?")
    confident = scores[scores > MEDIAN_SCORE_OF]
    if len(confident) >= SCORE_MIN_NUCLEI:
        median = float(np.median(confident))
        if median < MEDIAN_SCORE_FLOOR:
            found.append(f"the detector is unsure of most nuclei (median score {median:.2f} of those above "
                         f"{MEDIAN_SCORE_OF:g}, under {MEDIAN_SCORE_FLOOR:g}): a wrong pixel size ({mpp:.3g} um/px "
                         "used) or unusual staining")
    if estimate is not None and np.isfinite(estimate.mpp) and estimate.factor_to(mpp) > CONTRADICTION_FACTOR:
        direction = "larger" if estimate.mpp > mpp else "smaller"
        found.append(f"the image looks like {estimate.mpp:.2g} um/px (estimated from its nuclei), "
                     f"{estimate.factor_to(mpp):.1f}x {direction} than the {mpp:.3g} um/px used: check the pixel size")
    return found


# --- the pixel size of a run ------------------------------------------------------------------------------------

CHECKED_MIN_SIDE = REGION
"""An input larger than this (pixels, either side) is estimated on every run, to check the pixel size used: it is
measured in SLIDE_REGIONS squares, so the estimate takes a few seconds however large the input (a few % of a
whole slide's run). A smaller image, often one of many tiles, is checked by its density and scores only: its
estimate would take many times as long as its detection (docs/pixel_size.md has the figures)."""


def estimating_detector(detector: Detector, source: str | os.PathLike | None) -> Detector:
    """The detector ``estimate_mpp`` should use in a run of ``detector``, loaded from the weights file ``source``
    (None: not a detector file of its own, e.g. a bundle's detector): that one when ``source`` is the shipped
    ``default`` detector's file (the model is fitted to its scores), else ``default`` on the same device and
    runtime, loaded once."""
    if source is not None and os.path.samefile(source, hub.resolve("default", kind="detector")):
        return detector
    return default_detector(str(detector.device), detector.runtime)


@contextlib.contextmanager
def open_for_run(path: str | os.PathLike, mpp: float | str | None, detector: Callable[[], Detector],
                 source: str | None = None) -> Iterator[tuple[Slide, MppEstimate | None]]:
    """Open ``path`` (``open_slide``) with the pixel size a run uses, and the image's own estimate of it when one
    is taken; the slide is closed on leaving the block.

    ``mpp``: um/px (``source`` says where it came from, recorded as ``mpp_source``; default "--mpp"), None for
    the file's metadata, or ``MPP_AUTO`` for the estimate (``mpp_source`` "estimated"; metadata that contradicts
    it by more than CONTRADICTION_FACTOR is warned about and recorded, as a contradicted ``--mpp`` is). The
    estimate is taken with ``MPP_AUTO`` and for an input larger than CHECKED_MIN_SIDE; ``detector()`` gives the
    detector it runs (``estimating_detector``), called only then. An image whose pixel size cannot be estimated
    with ``MPP_AUTO`` is an InputError naming it.
    """
    auto = mpp == MPP_AUTO
    with open_slide(path, None if auto else mpp, mpp_required=not auto) as slide:
        if source is not None and not auto:
            slide.mpp_source = source
        estimate = estimate_mpp(slide, detector()) if auto or max(slide.dimensions) > CHECKED_MIN_SIDE else None
        if auto:
            _use_estimate(slide, estimate)
        yield slide, estimate


def _use_estimate(slide: Slide, estimate: MppEstimate) -> None:
    """Set the slide's pixel size to the estimate (``MPP_AUTO``): an InputError where there is none; a warning
    when its metadata, unused, contradicts it."""
    if not np.isfinite(estimate.mpp):
        evidence = np.stack([estimate.evidence[name] for name in EVIDENCE], axis=1)
        why = ("too small to estimate its pixel size from" if not choosable(evidence).any() else
               "no nuclei found at any candidate pixel size (blank, or not H&E?), so its pixel size cannot be "
               "estimated")
        width, height = slide.dimensions
        raise InputError(slide.path, f"{why} ({width} x {height} px): pass it with --mpp (um/px)")
    stated = slide.mpp  # the metadata's, NaN when it has none
    slide.mpp, slide.mpp_source = estimate.mpp, "estimated"
    if np.isfinite(stated) and estimate.factor_to(stated) > CONTRADICTION_FACTOR:
        slide.mpp_source = f"estimated (the metadata says {stated:g} um/px)"
        warnings.warn(f"{slide.path}: the image looks like {estimate.mpp:.2g} um/px (estimated from its nuclei), "
                      f"{estimate.factor_to(stated):.1f}x off the {stated:g} um/px in its metadata; using the "
                      f"estimate, as --mpp auto asks (pass --mpp {stated:g} for the metadata's)", stacklevel=4)
