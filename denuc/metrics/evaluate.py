"""Scoring predicted nucleus points against ground truth over a set of images, by a published protocol.

``evaluate(pairs, radius_um=3.0, protocol="denuc")`` matches the points of each image within a radius given in
micrometres (converted to pixels with the image's pixel size), pools true positives, false positives and false
negatives over the images, and returns a ``Report``: precision, recall and F1 per class, their mean, micro F1,
class-agnostic detection scores and, optionally, bootstrap confidence intervals over images. Given ground-truth
instance maps and predictions that carry outlines, it adds HoVer-Net's instance segmentation scores of the outlines
(denuc.metrics.instance).

The protocols and every rule below (unlabelled points, empty classes, ties) are specified in docs/evaluation.md.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from denuc.config import PROTOCOLS  # noqa: F401  (re-exported; named in config so the CLI lists them cheaply)
from denuc.errors import InputError
from denuc.metrics.crowding import CROWDED_MIN_NEIGHBOURS, CROWDED_RADIUS_UM, crowded_nuclei
from denuc.metrics.instance import InstanceReport, InstanceScores, aggregate, instance_scores
from denuc.metrics.matching import Candidates, candidate_pairs, greedy_match, hungarian_match, puma_match
from denuc.nuclei import NOT_A_NUCLEUS, UNLABELLED, Nuclei

CI_LEVEL = 95.0
"""Width of the bootstrap percentile interval, in percent."""


@dataclass
class Counts:
    """Matching outcome of one class, or of detection, pooled over images; the scores follow from the counts.

    ``ignored`` counts predictions excused by an unlabelled ground-truth point: neither true nor false.
    Precision (recall) is 0 when there are no predictions (no ground truth); F1 is 0 when either is 0.
    """

    tp: int
    fp: int
    fn: int
    ignored: int = 0
    f1_ci: tuple[float, float] | None = None

    @property
    def precision(self) -> float:
        return _precision_recall_f1(self.tp, self.fp, self.fn)[0]

    @property
    def recall(self) -> float:
        return _precision_recall_f1(self.tp, self.fp, self.fn)[1]

    @property
    def f1(self) -> float:
        return _precision_recall_f1(self.tp, self.fp, self.fn)[2]

    def to_dict(self) -> dict:
        out = {"tp": self.tp, "fp": self.fp, "fn": self.fn, "ignored": self.ignored,
               "precision": self.precision, "recall": self.recall, "f1": self.f1}
        if self.f1_ci is not None:
            out["f1_ci"] = list(self.f1_ci)
        return out


@dataclass
class CrowdedRecall:
    """Detection recall over the crowded ground-truth nuclei: those with at least ``min_neighbours`` other
    ground-truth nuclei within ``radius_um``, centre to centre (see denuc.metrics.crowding), pooled over images.

    ``total`` crowded nuclei, ``found`` of them matched by the detection matching; recall is 0 when none is crowded.
    """

    found: int
    total: int
    radius_um: float = CROWDED_RADIUS_UM
    min_neighbours: int = CROWDED_MIN_NEIGHBOURS

    @property
    def recall(self) -> float:
        return self.found / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"found": self.found, "total": self.total, "recall": self.recall, "radius_um": self.radius_um,
                "min_neighbours": self.min_neighbours}


@dataclass
class Report:
    """Scores of a set of images under one protocol.

    Attributes:
        protocol: the protocol name (see PROTOCOLS).
        radius_um: the matching radius in micrometres.
        radius_px: the matching radius in pixels of each image, by image name.
        n_images: the number of images scored.
        classes: counts and scores per class, by class name, in taxonomy order.
        mean_f1: the protocol's mean of the per-class F1 (None without classes).
        micro_f1: F1 of the class counts summed over classes (None without classes).
        detection: class-agnostic counts and scores; None for the class-only protocols (ocelot, puma).
        bootstrap: the number of bootstrap resamples behind the confidence intervals (0: none).
        seed: the seed of the bootstrap resampling.
        mean_f1_ci: the 95% bootstrap percentile interval of mean_f1, when bootstrapped.
        puma_leaderboard: for ``puma``, the challenge's own aggregate: per class, the F1 of each image averaged
            over all images, and the mean of those ("macro_f1_nuclei_average").
        crowded: detection recall over the crowded ground-truth nuclei, beside ``detection.recall``; None where
            there is no detection score (ocelot, puma).
        instance: the instance segmentation scores of the predicted outlines, when ground-truth instance maps
            were given; else None.
    """

    protocol: str
    radius_um: float
    radius_px: dict[str, float]
    n_images: int
    classes: dict[str, Counts]
    mean_f1: float | None
    micro_f1: float | None
    detection: Counts | None
    bootstrap: int = 0
    seed: int = 0
    mean_f1_ci: tuple[float, float] | None = None
    puma_leaderboard: dict | None = None
    crowded: CrowdedRecall | None = None
    instance: InstanceReport | None = None

    def to_dict(self) -> dict:
        """A JSON-serialisable summary (plain floats, ints, strings, lists and dicts)."""
        out = {
            "protocol": self.protocol,
            "radius_um": self.radius_um,
            "radius_px": {"unique": sorted(set(self.radius_px.values())), "per_image": dict(self.radius_px)},
            "n_images": self.n_images,
            "classes": {name: counts.to_dict() for name, counts in self.classes.items()},
            "mean_f1": self.mean_f1,
            "micro_f1": self.micro_f1,
            "detection": None if self.detection is None else self.detection.to_dict(),
            "crowded": None if self.crowded is None else self.crowded.to_dict(),
            "bootstrap": {"resamples": self.bootstrap, "seed": self.seed, "level_percent": CI_LEVEL},
        }
        if self.mean_f1_ci is not None:
            out["mean_f1_ci"] = list(self.mean_f1_ci)
        if self.puma_leaderboard is not None:
            out["puma_leaderboard"] = self.puma_leaderboard
        if self.instance is not None:
            out["instance"] = self.instance.to_dict()
        return out

    def format_table(self) -> str:
        """The report as a table for the terminal."""
        radii = sorted(set(self.radius_px.values()))
        px = ", ".join(f"{r:g}" for r in radii[:4]) + (", ..." if len(radii) > 4 else "")
        lines = [f"protocol {self.protocol}, radius {self.radius_um:g} um ({px} px), {self.n_images} images"
                 + (f", {self.bootstrap} bootstrap resamples" if self.bootstrap else "")]
        width = max([len(name) for name in self.classes] + [len("detection"), len("class")])
        ci_head = f"  {CI_LEVEL:g}% CI of F1" if self.bootstrap else ""
        lines.append(f"{'class':<{width}}  {'TP':>8} {'FP':>8} {'FN':>8} {'ignored':>8}"
                     f"  {'precision':>9} {'recall':>6} {'F1':>6}{ci_head}")

        def row(name: str, c: Counts) -> str:
            ci = f"  [{c.f1_ci[0]:.4f}, {c.f1_ci[1]:.4f}]" if c.f1_ci is not None else ""
            return (f"{name:<{width}}  {c.tp:>8} {c.fp:>8} {c.fn:>8} {c.ignored:>8}"
                    f"  {c.precision:>9.4f} {c.recall:>6.4f} {c.f1:>6.4f}{ci}")

        lines += [row(name, c) for name, c in self.classes.items()]

        def summary(name: str, f1: float, ci: tuple[float, float] | None = None) -> str:
            interval = f"  [{ci[0]:.4f}, {ci[1]:.4f}]" if ci is not None else ""
            return f"{name:<{width}}  {'':>8} {'':>8} {'':>8} {'':>8}  {'':>9} {'':>6} {f1:>6.4f}{interval}"

        if self.mean_f1 is not None:
            lines.append(summary("mean F1", self.mean_f1, self.mean_f1_ci))
            lines.append(summary("micro F1", self.micro_f1))
        if self.detection is not None:
            lines.append(row("detection", self.detection))
            if self.crowded is not None:
                c = self.crowded
                lines.append(f"crowded nuclei (>= {c.min_neighbours} others within {c.radius_um:g} um): recall "
                             f"{c.recall:.4f} ({c.found} of {c.total}), overall recall {self.detection.recall:.4f}")
        else:
            lines.append(f"(no class-agnostic detection score: the {self.protocol} protocol scores classes only)")
        if self.puma_leaderboard is not None:
            lines.append(f"PUMA leaderboard (per-image F1 averaged over images): macro F1 "
                         f"{self.puma_leaderboard['macro_f1_nuclei_average']:.4f}")
        if self.instance is not None:
            lines.append(self.instance.format_table())
        return "\n".join(lines)


def evaluate(
    pairs: Iterable[tuple[str, Nuclei, Nuclei]],
    radius_um: float = 3.0,
    protocol: str = "denuc",
    bootstrap: int = 0,
    seed: int = 0,
    instance_maps: Mapping[str, np.ndarray] | None = None,
) -> Report:
    """Score predictions against ground truth over a set of images.

    Args:
        pairs: ``(name, pred, gt)`` per image. The pixel size is ``gt.mpp``, else ``pred.mpp``; the two must
            agree when both are given (the points must share one pixel grid).
        radius_um: matching radius in micrometres (3 um is the usual nucleus-centre tolerance).
        protocol: one of PROTOCOLS (see docs/evaluation.md).
        bootstrap: number of resamples of the images (with replacement) for 95% percentile intervals of the
            per-class F1, the mean F1 and the detection F1; 0 for none.
        seed: seed of the resampling, so intervals are reproducible.
        instance_maps: ground-truth instance maps by image name ((H, W) ints, 0 background, in the ground
            truth's pixel grid, as ``Dataset.instance_map`` gives them); with them, the predicted outlines are
            rasterised and scored as HoVer-Net does (``Report.instance``).

    Raises InputError naming the image for a missing pixel size, conflicting pixel sizes, a predicted class
    outside the ground-truth taxonomy (except for ``puma``, which scores the union), or invalid points; with
    ``instance_maps``, for an image without a map, a map of another size than the image, or predictions
    without outlines.
    """
    if protocol not in PROTOCOLS:
        raise InputError("evaluate", f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    if not (isinstance(radius_um, numbers.Real) and math.isfinite(radius_um) and radius_um > 0):
        raise InputError("evaluate", f"matching radius must be a positive number of micrometres, got {radius_um}")
    if not (isinstance(bootstrap, numbers.Integral) and bootstrap >= 0):
        raise InputError("evaluate", f"bootstrap must be a whole number >= 0, got {bootstrap}")
    images = [(str(name), pred, gt) for name, pred, gt in pairs]
    if not images:
        raise InputError("evaluate", "no images to evaluate")
    names = [name for name, _, _ in images]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise InputError("evaluate", f"image names must be unique; repeated: {duplicated}")

    radius_px, mpp = {}, {}
    for name, pred, gt in images:
        pred.validate(f"{name} (predictions)")
        gt.validate(f"{name} (ground truth)")
        mpp[name] = _pixel_size(name, pred, gt)
        radius_px[name] = radius_um / mpp[name]
    class_names = _taxonomy(images, protocol)
    if protocol in ("ocelot", "puma") and not class_names:
        raise InputError("evaluate", f"the {protocol} protocol scores classes only, but the ground truth has no "
                                     "classes; use the denuc or hungarian protocol for detection")

    matcher = _MATCHERS[protocol]
    per_image = np.zeros((len(images), len(class_names), 4), dtype=np.int64)  # tp, fp, fn, ignored
    detection = np.zeros((len(images), 3), dtype=np.int64)  # tp, fp, fn
    crowded = np.zeros(2, dtype=np.int64)  # crowded ground-truth nuclei found, all of them
    outline_scores: dict[str, InstanceScores] = {}
    for i, (name, pred, gt) in enumerate(images):
        pred = pred.subset(pred.labels != NOT_A_NUCLEUS)  # rejected by the classifier: not a prediction
        if instance_maps is not None:
            outline_scores[name] = _outline_scores(name, pred, gt, instance_maps)
        radius = radius_px[name]
        # One search for pairs within the radius serves detection and every class: each is a subset of them.
        image = _Image(pred, gt, radius, candidate_pairs(pred.xy, gt.xy, radius),
                       _class_codes(pred.labels, class_names), _class_codes(gt.labels, class_names))
        for k in range(len(class_names)):
            per_image[i, k] = _class_counts(matcher, image, k)
        if protocol in ("denuc", "hungarian"):
            detection[i], found = _detection_counts(matcher, image)
            dense = crowded_nuclei(gt.xy, CROWDED_RADIUS_UM / mpp[name])
            crowded += (np.count_nonzero(dense[found]), np.count_nonzero(dense))

    total = per_image.sum(axis=0)
    classes = {c: Counts(*map(int, total[k])) for k, c in enumerate(class_names)}
    mean_f1 = float(_mean_f1(total[None], protocol)[0]) if class_names else None
    micro_f1 = _f1(*total[:, :3].sum(axis=0)) if class_names else None
    det = Counts(*map(int, detection.sum(axis=0))) if protocol in ("denuc", "hungarian") else None
    report = Report(protocol, float(radius_um), radius_px, len(images), classes, mean_f1, micro_f1, det,
                    int(bootstrap), int(seed))
    if det is not None:
        report.crowded = CrowdedRecall(*map(int, crowded))
    if protocol == "puma":
        report.puma_leaderboard = _puma_leaderboard(per_image, class_names)
    if instance_maps is not None:
        report.instance = aggregate(outline_scores)
    if bootstrap:
        _add_bootstrap_intervals(report, per_image, detection, bootstrap, seed)
    return report


def per_dataset_scores(pairs: Iterable[tuple[str, str, Nuclei, Nuclei]], score: Callable[[Report], float],
                       radius_um: float = 3.0) -> dict[str, float]:
    """``score`` of each dataset's images evaluated apart, by dataset, and "mean": their unweighted mean.

    ``pairs``: ``(dataset, name, pred, gt)`` per image. A dataset without images has no entry, so no part in
    the mean; ``score`` picks the figure, e.g. ``lambda report: report.detection.f1``.
    """
    images: dict[str, list[tuple[str, Nuclei, Nuclei]]] = {}
    for dataset, name, pred, gt in pairs:
        images.setdefault(dataset, []).append((name, pred, gt))
    if not images:
        raise InputError("evaluate", "no images to evaluate")
    scores = {dataset: float(score(evaluate(group, radius_um))) for dataset, group in images.items()}
    scores["mean"] = float(np.mean(list(scores.values())))
    return scores


# ------------------------------------------------------------------------------------------- matching

@dataclass
class _Image:
    """One image being scored: its points, the radius in pixels, the pairs within it, the class codes."""

    pred: Nuclei
    gt: Nuclei
    radius: float
    candidates: Candidates
    pred_class: np.ndarray
    gt_class: np.ndarray


def _greedy(image: _Image, candidates: Candidates) -> tuple[np.ndarray, np.ndarray]:
    return greedy_match(image.pred.xy, image.pred.scores, image.gt.xy, image.radius, True, candidates)


def _puma(image: _Image, candidates: Candidates) -> tuple[np.ndarray, np.ndarray]:
    return puma_match(image.pred.xy, image.pred.scores, image.gt.xy, image.radius, candidates)


def _hungarian(image: _Image, candidates: Candidates) -> tuple[np.ndarray, np.ndarray]:
    return hungarian_match(image.pred.xy, image.gt.xy, image.radius, candidates)


Matcher = Callable[[_Image, Candidates], tuple[np.ndarray, np.ndarray]]
_MATCHERS: dict[str, Matcher] = {"denuc": _greedy, "ocelot": _greedy, "puma": _puma, "hungarian": _hungarian}
_NO_CLASS = -1
"""Class code of an unlabelled point."""


def _class_codes(labels: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Index of each label in class_names; _NO_CLASS for an unlabelled point."""
    codes = np.full(len(labels), _NO_CLASS, dtype=np.int64)
    for k, name in enumerate(class_names):
        codes[labels == name] = k
    return codes


def _class_counts(matcher: Matcher, image: _Image, k: int) -> list[int]:
    """TP, FP, FN, ignored of class k in one image.

    First the predictions of the class are matched to the ground truth of the class: that gives TP and FN,
    exactly as if the unlabelled ground-truth points were absent. Then the predictions left over are matched,
    by the same rule, to the unlabelled ground-truth points: each one matched is ignored rather than counted as
    a false positive, since that nucleus may well be of this class. Unlabelled points thus only ever excuse a
    would-be false positive and are never missed; unlabelled predictions take part in detection only.
    """
    pi, gj, dist = image.candidates
    of_class = image.pred_class[pi] == k
    first = of_class & (image.gt_class[gj] == k)
    matched, _ = matcher(image, (pi[first], gj[first], dist[first]))
    is_matched = np.zeros(len(image.pred), dtype=bool)
    is_matched[matched] = True
    second = of_class & (image.gt_class[gj] == _NO_CLASS) & ~is_matched[pi]
    ignored = len(matcher(image, (pi[second], gj[second], dist[second]))[0])
    tp = len(matched)
    n_pred, n_gt = int(np.count_nonzero(image.pred_class == k)), int(np.count_nonzero(image.gt_class == k))
    return [tp, n_pred - tp - ignored, n_gt - tp, ignored]


def _outline_scores(name: str, pred: Nuclei, gt: Nuclei, instance_maps: Mapping[str, np.ndarray]) -> InstanceScores:
    """The instance segmentation scores of one image's predicted outlines against its ground-truth instance map.

    The predictions are in the ground truth's pixel grid (``_pixel_size`` refuses two pixel sizes), so the
    outlines are rasterised at the map's size as they are."""
    from denuc.outlines import rasterise  # scikit-image: loaded only when outlines are scored

    if name not in instance_maps:
        raise InputError(name, "no ground-truth instance map for this image")
    true = np.asarray(instance_maps[name])
    if true.ndim != 2:
        raise InputError(name, f"the ground-truth instance map must be 2-D, got shape {true.shape}")
    height, width = true.shape
    if gt.image_size is not None and tuple(gt.image_size) != (width, height):
        raise InputError(name, f"the ground-truth instance map is {width}x{height} px but the image "
                               f"{gt.image_size[0]}x{gt.image_size[1]} px")
    if len(pred) and pred.outlines is None:
        raise InputError(name, "the predictions carry no outlines, which the instance segmentation scores need")
    return instance_scores(true, rasterise(pred, (width, height)))


def _detection_counts(matcher: Matcher, image: _Image) -> tuple[list[int], np.ndarray]:
    """TP, FP, FN of all points of one image, classes ignored, and the indices of the ground truth matched."""
    found = matcher(image, image.candidates)[1]
    tp = len(found)
    return [tp, len(image.pred) - tp, len(image.gt) - tp], found


# ---------------------------------------------------------------------------------------------- scores

def _precision_recall_f1(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    """The formula of the PUMA scorer (and, without its 1e-7 guards, of OCELOT's and DeNuC's)."""
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return float(precision), float(recall), float(f1)


def _f1(tp: float, fp: float, fn: float) -> float:
    return _precision_recall_f1(tp, fp, fn)[2]


def _f1_array(counts: np.ndarray) -> np.ndarray:
    """F1 of counts[..., :3] = (tp, fp, fn), elementwise, by the same formula as _precision_recall_f1."""
    tp, fp, fn = (counts[..., k].astype(np.float64) for k in range(3))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        return np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)


def _mean_f1(counts: np.ndarray, protocol: str) -> np.ndarray:
    """Mean F1 over classes of counts (..., classes, 4). Every class of the taxonomy counts, except for
    ``puma``, which averages over the classes present in ground truth or predictions."""
    f1 = _f1_array(counts)
    if protocol != "puma":
        return f1.mean(axis=-1)
    present = counts.sum(axis=-1) > 0
    with np.errstate(invalid="ignore"):
        return np.where(present.any(axis=-1), (f1 * present).sum(axis=-1) / present.sum(axis=-1), 0.0)


def _puma_leaderboard(per_image: np.ndarray, class_names: list[str]) -> dict:
    """PUMA's aggregate over images: per image, F1 of each class present in that image; per class, the sum of
    those over images divided by the number of images; then the mean over classes present in any image."""
    f1 = _f1_array(per_image)
    present = per_image.sum(axis=-1) > 0
    seen = present.any(axis=0)
    per_class = (f1 * present).sum(axis=0) / len(per_image)
    leaderboard = {name: float(per_class[k]) for k, name in enumerate(class_names) if seen[k]}
    macro = float(np.mean(list(leaderboard.values()))) if leaderboard else 0.0
    return {"f1_nuclei": leaderboard, "macro_f1_nuclei_average": macro}


def _add_bootstrap_intervals(
    report: Report, per_image: np.ndarray, detection: np.ndarray, resamples: int, seed: int
) -> None:
    """Percentile intervals over resamples of the images with replacement; counts are pooled per resample."""
    n = len(per_image)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    weights = np.bincount((draws + n * np.arange(resamples)[:, None]).ravel(), minlength=resamples * n)
    weights = weights.reshape(resamples, n).astype(np.float64)
    pooled = np.einsum("bi,ick->bck", weights, per_image.astype(np.float64))
    tail = (100.0 - CI_LEVEL) / 2

    def interval(values: np.ndarray) -> tuple[float, float]:
        low, high = np.percentile(values, [tail, 100.0 - tail])
        return float(low), float(high)

    class_f1 = _f1_array(pooled)
    for k, counts in enumerate(report.classes.values()):
        counts.f1_ci = interval(class_f1[:, k])
    if report.classes:
        report.mean_f1_ci = interval(_mean_f1(pooled, report.protocol))
    if report.detection is not None:
        report.detection.f1_ci = interval(_f1_array(weights @ detection.astype(np.float64)))


# -------------------------------------------------------------------------------------------- checking

def _pixel_size(name: str, pred: Nuclei, gt: Nuclei) -> float:
    if gt.mpp is None and pred.mpp is None:
        raise InputError(name, "pixel size unknown: neither the ground truth nor the predictions give it "
                               "(um/px); it is needed to convert the matching radius to pixels")
    if gt.mpp is not None and pred.mpp is not None and not math.isclose(gt.mpp, pred.mpp, rel_tol=1e-6):
        raise InputError(name, f"predictions are at {pred.mpp} um/px but the ground truth at {gt.mpp} um/px; "
                               "both must be in the same pixel grid")
    return float(gt.mpp if gt.mpp is not None else pred.mpp)


def _taxonomy(images: list[tuple[str, Nuclei, Nuclei]], protocol: str) -> list[str]:
    """The classes scored: those of the ground truth (its taxonomy, then any other label it uses), in order of
    first appearance over the images; for ``puma`` also the predicted classes, after them."""
    names: dict[str, None] = {}
    for _, _, gt in images:
        names.update(dict.fromkeys(gt.class_names))
        names.update(dict.fromkeys(gt.labels.tolist()))
    names.pop(UNLABELLED, None)
    for image, pred, _ in images:
        predicted = set(pred.labels.tolist()) - {UNLABELLED, NOT_A_NUCLEUS}
        extra = sorted(predicted - names.keys())
        if not extra:
            continue
        if protocol != "puma":
            raise InputError(image, f"predicted class(es) {extra} are not in the ground-truth classes "
                                    f"{list(names)}; check the class names (spelling, case)")
        names.update(dict.fromkeys(extra))
    return list(names)
