"""Instance segmentation scores of nucleus outlines, as HoVer-Net computes them (Graham et al., Medical Image
Analysis 2019; github.com/vqdang/hover_net, ``metrics/stats_utils.py`` and ``compute_stats.py``).

Every score compares a ground-truth and a predicted instance map: (H, W) integer arrays, 0 the background, one id
per nucleus. Per image:

* ``dice``: binary Dice of the foregrounds, instances ignored (HoVer-Net's ``get_dice_1``).
* ``aji``: Aggregated Jaccard Index as MoNuSeg distributes it (``get_fast_aji``): every true nucleus takes the
  predicted one of highest IoU (ties: the lower id), a prediction may serve several; the summed intersections
  over the summed unions, unpaired true and predicted nuclei adding their areas to the unions.
* ``aji_plus``: AJI+ (``get_fast_aji_plus``): the same, with a one-to-one pairing of maximal summed IoU
  (``scipy.optimize.linear_sum_assignment``), so a prediction that merges nuclei is not counted twice.
* ``dq``, ``sq``, ``pq``: panoptic quality (Kirillov et al. 2019; ``get_fast_pq`` at ``match_iou=0.5``): a true
  and a predicted nucleus pair when their IoU exceeds 0.5 (such pairs are unique); DQ = TP / (TP + FP/2 + FN/2),
  SQ = the mean IoU of the pairs, PQ = DQ x SQ.

Over images, as ``compute_stats.py`` (``run_nuclei_inst_stat``) does: each score per image, then the unweighted
mean over the images (``aggregate``); TP, FP and FN are also pooled, for reference only.

The figures equal HoVer-Net's bit for bit (tests/test_instance_metrics.py checks them against a re-implementation
of its loops), quirks included: SQ divides by TP + 1e-6, so a perfect match scores 1 - 1e-6 / TP; AJI and AJI+
rank pairs by intersection / (union + 1e-6). The pair search is vectorised (one ``np.unique`` over the pixels
instead of a mask per pair). Where HoVer-Net's code fails, this one gives an answer:

* ids need not be contiguous (HoVer-Net needs ``remap_label`` first; the order of the ids is kept, so ties
  resolve as after ``remap_label``), and a map may have no background pixel (there HoVer-Net's ``remap_label``
  raises, and its scores skip the first instance);
* an image without predicted nuclei scores AJI 0 (HoVer-Net's ``get_fast_aji`` raises on it);
* an image without nuclei in either map has no score (NaN, HoVer-Net raises): it is left out of the means.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from denuc.errors import InputError

PQ_MATCH_IOU = 0.5
"""A true and a predicted nucleus pair for PQ when their IoU exceeds this (HoVer-Net's ``match_iou``)."""

_SQ_EPS = 1.0e-6
"""HoVer-Net's guard in SQ = sum(IoU) / (TP + 1e-6), kept so that the figures are the same."""

_AJI_EPS = 1.0e-6
"""HoVer-Net's guard in the IoU that AJI and AJI+ pair by, inter / (union + 1e-6); it can decide a tie."""

SCORES = ("dice", "aji", "aji_plus", "dq", "sq", "pq")
"""The per-image scores, in the order of the report."""

_HEADINGS = {"dice": "Dice", "aji": "AJI", "aji_plus": "AJI+", "dq": "DQ", "sq": "SQ", "pq": "PQ"}


@dataclass(frozen=True)
class InstanceScores:
    """The scores of one image (NaN when neither map has a nucleus) and its PQ pairing counts."""

    dice: float
    aji: float
    aji_plus: float
    dq: float
    sq: float
    pq: float
    tp: int
    fp: int
    fn: int

    def to_dict(self) -> dict:
        return {key: _json_number(value) for key, value in asdict(self).items()}


@dataclass(frozen=True)
class InstanceReport:
    """Scores over a set of images: per image, and each score's mean over the images where it is defined.

    Attributes:
        per_image: the scores of each image, by image name.
        mean: each of SCORES averaged over the images (NaN where no image has it).
        n_scored: the number of images in the means (those with a nucleus in either map).
        tp, fp, fn: the PQ pairing counts summed over the images.
    """

    per_image: dict[str, InstanceScores]
    mean: dict[str, float]
    n_scored: int
    tp: int
    fp: int
    fn: int

    def to_dict(self) -> dict:
        """A JSON-serialisable summary; NaN is written as null."""
        return {"match_iou": PQ_MATCH_IOU, "n_images": len(self.per_image), "n_scored": self.n_scored,
                **{key: _json_number(value) for key, value in self.mean.items()},
                "tp": self.tp, "fp": self.fp, "fn": self.fn,
                "per_image": {name: scores.to_dict() for name, scores in self.per_image.items()}}

    def format_table(self) -> str:
        """The means as a table for the terminal."""
        left_out = len(self.per_image) - self.n_scored
        note = f", {left_out} without nuclei left out" if left_out else ""
        return "\n".join([
            f"instance segmentation (HoVer-Net's metrics, PQ at IoU > {PQ_MATCH_IOU:g}), mean over "
            f"{self.n_scored} images{note}:",
            "  ".join(f"{_HEADINGS[key]:>6}" for key in SCORES) + f"  {'TP':>8} {'FP':>8} {'FN':>8}",
            "  ".join(f"{self.mean[key]:>6.4f}" for key in SCORES) + f"  {self.tp:>8} {self.fp:>8} {self.fn:>8}",
        ])


def instance_scores(true: np.ndarray, pred: np.ndarray) -> InstanceScores:
    """All scores of one image: ``true`` and ``pred`` instance maps of one shape."""
    overlaps = _Overlaps.of(true, pred)
    if overlaps.empty:
        return InstanceScores(*[math.nan] * len(SCORES), 0, 0, 0)
    dq, sq, pq, tp, fp, fn = overlaps.panoptic_quality()
    return InstanceScores(overlaps.dice(), overlaps.aji(), overlaps.aji_plus(), dq, sq, pq, tp, fp, fn)


def panoptic_quality(true: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """(DQ, SQ, PQ) at IoU > 0.5, as HoVer-Net's ``get_fast_pq``; NaN when neither map has a nucleus."""
    overlaps = _Overlaps.of(true, pred)
    return (math.nan,) * 3 if overlaps.empty else overlaps.panoptic_quality()[:3]


def aji(true: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index, as HoVer-Net's ``get_fast_aji``; NaN when neither map has a nucleus."""
    overlaps = _Overlaps.of(true, pred)
    return math.nan if overlaps.empty else overlaps.aji()


def aji_plus(true: np.ndarray, pred: np.ndarray) -> float:
    """AJI+, as HoVer-Net's ``get_fast_aji_plus``; NaN when neither map has a nucleus."""
    overlaps = _Overlaps.of(true, pred)
    return math.nan if overlaps.empty else overlaps.aji_plus()


def dice(true: np.ndarray, pred: np.ndarray) -> float:
    """Binary Dice of the foregrounds, as HoVer-Net's ``get_dice_1``; NaN when neither map has a nucleus."""
    overlaps = _Overlaps.of(true, pred)
    return math.nan if overlaps.empty else overlaps.dice()


def aggregate(per_image: dict[str, InstanceScores]) -> InstanceReport:
    """The mean of each score over the images where it is defined, as ``compute_stats.py`` averages them."""
    scored = [scores for scores in per_image.values() if not math.isnan(scores.dice)]
    mean = {key: float(np.mean([getattr(s, key) for s in scored])) if scored else math.nan for key in SCORES}
    counts = [sum(getattr(s, key) for s in per_image.values()) for key in ("tp", "fp", "fn")]
    return InstanceReport(dict(per_image), mean, len(scored), *counts)


@dataclass(frozen=True)
class _Overlaps:
    """The instances of two maps and every overlapping (true, predicted) pair.

    Instances are numbered 0.. in ascending order of id, per map; the pairs are sorted by (true, predicted),
    the order of HoVer-Net's loops.
    """

    true_area: np.ndarray
    pred_area: np.ndarray
    t: np.ndarray
    p: np.ndarray
    inter: np.ndarray

    @classmethod
    def of(cls, true: np.ndarray, pred: np.ndarray) -> _Overlaps:
        true, pred = _instance_map(true, "true"), _instance_map(pred, "pred")
        if true.shape != pred.shape:
            raise InputError("instance maps", f"the true map has shape {true.shape} but the predicted one {pred.shape}")
        (t_index, n_true), (p_index, n_pred) = _instances(true), _instances(pred)
        both = (t_index >= 0) & (p_index >= 0)
        pairs, inter = np.unique(t_index[both] * n_pred + p_index[both], return_counts=True)
        return cls(np.bincount(t_index[t_index >= 0], minlength=n_true),
                   np.bincount(p_index[p_index >= 0], minlength=n_pred),
                   pairs // max(n_pred, 1), pairs % max(n_pred, 1), inter)

    @property
    def empty(self) -> bool:
        """Neither map has a nucleus: no score is defined."""
        return self.n_true == 0 and self.n_pred == 0

    @property
    def n_true(self) -> int:
        return len(self.true_area)

    @property
    def n_pred(self) -> int:
        return len(self.pred_area)

    @property
    def union(self) -> np.ndarray:
        return self.true_area[self.t] + self.pred_area[self.p] - self.inter

    def dice(self) -> float:
        return 2.0 * int(self.inter.sum()) / (int(self.true_area.sum()) + int(self.pred_area.sum()))

    def panoptic_quality(self) -> tuple[float, float, float, int, int, int]:
        iou = self.inter / self.union
        paired_iou = iou[iou > PQ_MATCH_IOU]  # in (true, pred) order, as HoVer-Net sums them
        tp = len(paired_iou)
        fp, fn = self.n_pred - tp, self.n_true - tp
        dq = tp / (tp + 0.5 * fp + 0.5 * fn)
        sq = paired_iou.sum() / (tp + _SQ_EPS)
        return float(dq), float(sq), float(dq * sq), tp, fp, fn

    def aji(self) -> float:
        """Each true nucleus with its predicted one of highest IoU (lower index on ties), if it overlaps one."""
        iou = self.inter / (self.union + _AJI_EPS)
        order = np.lexsort((self.p, -iou, self.t))
        first = order[np.r_[True, self.t[order][1:] != self.t[order][:-1]]] if len(order) else order
        return self._aggregated_jaccard(first)

    def aji_plus(self) -> float:
        """The one-to-one pairing of maximal summed IoU, found on the dense IoU matrix as HoVer-Net does (the
        same matrix gives the same pairing among equally good ones)."""
        iou = np.zeros((self.n_true, self.n_pred))
        iou[self.t, self.p] = self.inter / (self.union + _AJI_EPS)
        rows, cols = linear_sum_assignment(-iou)
        keep = iou[rows, cols] > 0.0
        # the pairs are sorted by this key, so each kept (row, col) finds its index by bisection
        return self._aggregated_jaccard(np.searchsorted(self.t * self.n_pred + self.p,
                                                        rows[keep] * self.n_pred + cols[keep]))

    def _aggregated_jaccard(self, chosen: np.ndarray) -> float:
        """Summed intersections over summed unions of the ``chosen`` pairs (indices into the pair arrays), the
        areas of the true and predicted nuclei in none of them added to the union."""
        paired_true = np.zeros(self.n_true, dtype=bool)
        paired_pred = np.zeros(self.n_pred, dtype=bool)
        paired_true[self.t[chosen]] = True
        paired_pred[self.p[chosen]] = True
        inter = int(self.inter[chosen].sum())
        union = (int(self.union[chosen].sum()) + int(self.true_area[~paired_true].sum())
                 + int(self.pred_area[~paired_pred].sum()))
        return inter / union


def _instance_map(array: np.ndarray, which: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise InputError("instance maps", f"the {which} map must be a 2-D integer array, got {array.dtype} "
                                          f"of shape {array.shape}")
    if array.size and array.min() < 0:
        raise InputError("instance maps", f"the {which} map has negative ids; 0 is the background, nuclei > 0")
    return array


def _instances(instance_map: np.ndarray) -> tuple[np.ndarray, int]:
    """Per pixel, the index of its instance in ascending order of id (-1: background); and their number."""
    ids, index = np.unique(instance_map.ravel(), return_inverse=True)
    index = index.reshape(-1).astype(np.int64)
    if len(ids) and ids[0] == 0:
        return index - 1, len(ids) - 1
    return index, len(ids)


def _json_number(value: float) -> float | int | None:
    return None if isinstance(value, float) and math.isnan(value) else value
