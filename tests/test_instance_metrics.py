"""Instance segmentation scores (denuc.metrics.instance): equal to HoVer-Net's, by hand on tiny maps, and in
`evaluate` when the predictions carry outlines."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from skimage.draw import ellipse

from denuc.cli import main
from denuc.errors import InputError
from denuc.metrics.evaluate import evaluate
from denuc.metrics.instance import (
    aggregate,
    aji,
    aji_plus,
    dice,
    instance_scores,
    panoptic_quality,
)
from denuc.nuclei import Nuclei

# ------------------------------------------------------------------------- HoVer-Net's code, as the reference
# The logic of https://github.com/vqdang/hover_net/blob/master/metrics/stats_utils.py (get_fast_pq with
# match_iou >= 0.5, get_fast_aji, get_fast_aji_plus, get_dice_1, remap_label) and of compute_stats.py's
# run_nuclei_inst_stat (remap_label on both maps, then the scores), step for step: a mask per instance, a loop
# over the predicted ids under each true mask, the same float expressions, the same pairing calls.


def hovernet_remap_label(pred: np.ndarray) -> np.ndarray:
    pred_id = list(np.unique(pred))
    pred_id.remove(0)
    if len(pred_id) == 0:
        return pred
    new_pred = np.zeros(pred.shape, np.int32)
    for idx, inst_id in enumerate(pred_id):
        new_pred[pred == inst_id] = idx + 1
    return new_pred


def hovernet_masks(inst: np.ndarray) -> tuple[list, list]:
    id_list = list(np.unique(inst))
    masks = [None] + [np.array(inst == i, np.uint8) for i in id_list[1:]]
    return id_list, masks


def hovernet_pairwise(true: np.ndarray, pred: np.ndarray) -> tuple:
    true_id_list, true_masks = hovernet_masks(true)
    pred_id_list, pred_masks = hovernet_masks(pred)
    pairwise_inter = np.zeros([len(true_id_list) - 1, len(pred_id_list) - 1], dtype=np.float64)
    pairwise_union = np.zeros([len(true_id_list) - 1, len(pred_id_list) - 1], dtype=np.float64)
    pairwise_iou = np.zeros([len(true_id_list) - 1, len(pred_id_list) - 1], dtype=np.float64)
    for true_id in true_id_list[1:]:
        t_mask = true_masks[true_id]
        for pred_id in list(np.unique(pred[t_mask > 0])):
            if pred_id == 0:
                continue
            p_mask = pred_masks[pred_id]
            total = (t_mask + p_mask).sum()
            inter = (t_mask * p_mask).sum()
            pairwise_inter[true_id - 1, pred_id - 1] = inter
            pairwise_union[true_id - 1, pred_id - 1] = total - inter
            pairwise_iou[true_id - 1, pred_id - 1] = inter / (total - inter)  # get_fast_pq's own IoU
    return true_id_list, true_masks, pred_id_list, pred_masks, pairwise_inter, pairwise_union, pairwise_iou


def hovernet_pq(true: np.ndarray, pred: np.ndarray, match_iou: float = 0.5) -> list:
    true_id_list, _, pred_id_list, _, _, _, pairwise_iou = hovernet_pairwise(true, pred)
    pairwise_iou[pairwise_iou <= match_iou] = 0.0
    paired_true, paired_pred = np.nonzero(pairwise_iou)
    paired_iou = pairwise_iou[paired_true, paired_pred]
    paired_true += 1
    paired_pred += 1
    unpaired_true = [idx for idx in true_id_list[1:] if idx not in paired_true]
    unpaired_pred = [idx for idx in pred_id_list[1:] if idx not in paired_pred]
    tp, fp, fn = len(paired_true), len(unpaired_pred), len(unpaired_true)
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = paired_iou.sum() / (tp + 1.0e-6)
    return [dq, sq, dq * sq]


def hovernet_aji_union(paired_true, paired_pred, true_id_list, true_masks, pred_id_list, pred_masks) -> float:
    paired_true, paired_pred = list(paired_true + 1), list(paired_pred + 1)
    unpaired_true = np.array([idx for idx in true_id_list[1:] if idx not in paired_true])
    unpaired_pred = np.array([idx for idx in pred_id_list[1:] if idx not in paired_pred])
    return sum(true_masks[i].sum() for i in unpaired_true) + sum(pred_masks[i].sum() for i in unpaired_pred)


def hovernet_aji(true: np.ndarray, pred: np.ndarray) -> float:
    true_id_list, true_masks, pred_id_list, pred_masks, pairwise_inter, pairwise_union, _ = \
        hovernet_pairwise(true, pred)
    pairwise_iou = pairwise_inter / (pairwise_union + 1.0e-6)
    paired_pred = np.argmax(pairwise_iou, axis=1)
    pairwise_iou = np.max(pairwise_iou, axis=1)
    paired_true = np.nonzero(pairwise_iou > 0.0)[0]
    paired_pred = paired_pred[paired_true]
    overall_inter = (pairwise_inter[paired_true, paired_pred]).sum()
    overall_union = (pairwise_union[paired_true, paired_pred]).sum()
    overall_union += hovernet_aji_union(paired_true, paired_pred, true_id_list, true_masks, pred_id_list,
                                        pred_masks)
    return overall_inter / overall_union


def hovernet_aji_plus(true: np.ndarray, pred: np.ndarray) -> float:
    true_id_list, true_masks, pred_id_list, pred_masks, pairwise_inter, pairwise_union, _ = \
        hovernet_pairwise(true, pred)
    pairwise_iou = pairwise_inter / (pairwise_union + 1.0e-6)
    paired_true, paired_pred = linear_sum_assignment(-pairwise_iou)
    paired_iou = pairwise_iou[paired_true, paired_pred]
    paired_true = paired_true[paired_iou > 0.0]
    paired_pred = paired_pred[paired_iou > 0.0]
    overall_inter = pairwise_inter[paired_true, paired_pred].sum()
    overall_union = pairwise_union[paired_true, paired_pred].sum()
    overall_union += hovernet_aji_union(paired_true, paired_pred, true_id_list, true_masks, pred_id_list,
                                        pred_masks)
    return overall_inter / overall_union


def hovernet_dice_1(true: np.ndarray, pred: np.ndarray) -> float:
    true, pred = np.copy(true), np.copy(pred)
    true[true > 0] = 1
    pred[pred > 0] = 1
    return 2.0 * np.sum(true * pred) / np.sum(true + pred)


def hovernet_scores(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """compute_stats.py's run_nuclei_inst_stat for one image."""
    true, pred = hovernet_remap_label(true), hovernet_remap_label(pred)
    dq, sq, pq = hovernet_pq(true, pred)
    return {"dice": hovernet_dice_1(true, pred), "aji": hovernet_aji(true, pred),
            "aji_plus": hovernet_aji_plus(true, pred), "dq": dq, "sq": sq, "pq": pq}


# --------------------------------------------------------------------------------------------- random maps

def random_nuclei(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """Ellipses at random, later ones painted over earlier ones (so some are cut, some vanish), with ids
    scattered over 1..10n (not contiguous, not in paint order)."""
    inst = np.zeros(shape, dtype=np.int32)
    ids = rng.choice(np.arange(1, 10 * n + 1), size=n, replace=False)
    for k in range(n):
        r, c = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        rr, cc = ellipse(r, c, rng.uniform(2, 8), rng.uniform(2, 8), shape=shape, rotation=rng.uniform(0, np.pi))
        inst[rr, cc] = ids[k]
    return inst


def perturbed(rng: np.random.Generator, true: np.ndarray) -> np.ndarray:
    """A prediction of ``true``: nuclei shifted by up to 2 pixels, some dropped, some split in two, some merged
    with a neighbour, some added."""
    pred = np.zeros_like(true)
    ids = [i for i in np.unique(true) if i]
    next_id = int(true.max()) + 1
    for i in ids:
        rr, cc = np.nonzero(true == i)
        if rng.random() < 0.15:
            continue
        dr, dc = rng.integers(-2, 3, size=2)
        rr, cc = np.clip(rr + dr, 0, true.shape[0] - 1), np.clip(cc + dc, 0, true.shape[1] - 1)
        label = int(rng.choice(ids)) if rng.random() < 0.1 else i  # merged: the label of another nucleus
        pred[rr, cc] = label
        if rng.random() < 0.15:  # split: the right part of it as a new nucleus
            right = cc > np.median(cc)
            pred[rr[right], cc[right]] = next_id
            next_id += 1
    for _ in range(rng.integers(0, 4)):
        rr, cc = ellipse(*rng.uniform(0, true.shape[0], size=2), rng.uniform(2, 6), rng.uniform(2, 6),
                         shape=true.shape)
        pred[rr, cc] = next_id
        next_id += 1
    return pred


@pytest.mark.parametrize("seed", range(60))
def test_equal_to_hovernet_on_random_maps(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
    true = random_nuclei(rng, shape, int(rng.integers(1, 40)))
    pred = perturbed(rng, true) if seed % 4 else random_nuclei(rng, shape, int(rng.integers(1, 40)))
    true[0, 0] = pred[0, 0] = 0  # HoVer-Net's code needs a background pixel in each map
    pred[1:4, 1:4] = pred[1:4, 1:4] if pred.any() else 1  # and its AJI a predicted nucleus
    ours = instance_scores(true, pred)
    for key, value in hovernet_scores(true, pred).items():
        assert getattr(ours, key) == value, key  # bit for bit
    assert (dice(true, pred), aji(true, pred), aji_plus(true, pred)) == (ours.dice, ours.aji, ours.aji_plus)
    assert panoptic_quality(true, pred) == (ours.dq, ours.sq, ours.pq)


def test_equal_to_hovernet_with_ties() -> None:
    """Equal IoUs: AJI takes the lower predicted id, AJI+ the pairing scipy returns on the same matrix."""
    true = np.zeros((8, 12), dtype=np.int32)
    true[2:6, 2:10] = 7
    pred = np.zeros_like(true)
    pred[2:6, 2:6], pred[2:6, 6:10] = 9, 4  # two halves: the same IoU with the true nucleus
    for a, b in ((true, pred), (pred, true)):
        ours = instance_scores(a, b)
        for key, value in hovernet_scores(a, b).items():
            assert getattr(ours, key) == value, key


# ------------------------------------------------------------------------------------------------ by hand

def squares(*boxes: tuple[int, int, int, int], shape: tuple[int, int] = (20, 40)) -> np.ndarray:
    """Boxes (row0, row1, col0, col1) as nuclei 1, 2, ..."""
    inst = np.zeros(shape, dtype=np.int32)
    for k, (r0, r1, c0, c1) in enumerate(boxes):
        inst[r0:r1, c0:c1] = k + 1
    return inst


def test_perfect_match() -> None:
    true = squares((0, 10, 0, 10), (10, 20, 20, 30))
    s = instance_scores(true, true * 5)  # other ids, the same nuclei
    assert (s.dice, s.aji, s.aji_plus, s.dq) == (1.0, 1.0, 1.0, 1.0)
    assert (s.tp, s.fp, s.fn) == (2, 0, 0)
    assert s.sq == s.pq == 2 / (2 + 1e-6)  # HoVer-Net's guard: 1 - 5e-7, not 1


def test_no_overlap() -> None:
    s = instance_scores(squares((0, 10, 0, 10)), squares((0, 10, 20, 30)))
    assert (s.dice, s.aji, s.aji_plus, s.dq, s.sq, s.pq) == (0.0,) * 6
    assert (s.tp, s.fp, s.fn) == (0, 1, 1)


def test_a_nucleus_split_in_halves() -> None:
    """IoU exactly 0.5 is no match (PQ needs > 0.5); AJI pairs it with the first half, the second is unpaired;
    Dice sees one foreground."""
    s = instance_scores(squares((0, 10, 0, 10)), squares((0, 10, 0, 5), (0, 10, 5, 10)))
    assert (s.tp, s.fp, s.fn) == (0, 2, 1) and s.pq == 0.0
    assert s.aji == s.aji_plus == 50 / (100 + 50)
    assert s.dice == 1.0


def test_a_nucleus_split_unevenly() -> None:
    s = instance_scores(squares((0, 10, 0, 10)), squares((0, 10, 0, 6), (0, 10, 6, 10)))
    assert (s.tp, s.fp, s.fn) == (1, 1, 0)
    assert s.dq == 1 / 1.5 and s.sq == 0.6 / (1 + 1e-6) and s.pq == s.dq * s.sq
    assert s.aji == s.aji_plus == 60 / (100 + 40)


def test_two_nuclei_merged_into_one() -> None:
    """AJI counts the merged prediction in both unions (its over-penalisation); AJI+ pairs it once."""
    s = instance_scores(squares((0, 10, 0, 5), (0, 10, 5, 10)), squares((0, 10, 0, 10)))
    assert (s.tp, s.fp, s.fn) == (0, 1, 2)
    assert s.aji == (50 + 50) / (100 + 100)
    assert s.aji_plus == 50 / (100 + 50)


def test_missing_and_extra_predictions() -> None:
    true = squares((0, 10, 0, 10), (0, 10, 20, 30))
    s = instance_scores(true, np.zeros_like(true))
    assert (s.dice, s.aji, s.aji_plus, s.dq, s.sq, s.pq) == (0.0,) * 6 and (s.tp, s.fp, s.fn) == (0, 0, 2)
    s = instance_scores(true, squares((0, 10, 0, 10), (0, 10, 20, 30), (12, 18, 32, 38)))
    assert (s.tp, s.fp, s.fn) == (2, 1, 0) and s.dq == 2 / 2.5
    assert s.aji == s.aji_plus == 200 / 236


def test_nothing_to_score_is_nan_and_left_out_of_the_means() -> None:
    empty = np.zeros((5, 5), dtype=np.int32)
    assert all(math.isnan(v) for v in (dice(empty, empty), aji(empty, empty), *panoptic_quality(empty, empty)))
    one = squares((0, 10, 0, 10))
    half = squares((0, 10, 0, 6), (0, 10, 6, 10))
    per_image = {"a": instance_scores(one, one), "b": instance_scores(one, half),
                 "c": instance_scores(np.zeros_like(one), np.zeros_like(one))}
    report = aggregate(per_image)
    assert report.n_scored == 2 and (report.tp, report.fp, report.fn) == (2, 1, 0)
    assert report.mean["aji"] == (1.0 + 60 / 140) / 2
    assert report.mean["pq"] == pytest.approx((1 + 0.4) / 2, abs=1e-6)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["per_image"]["c"]["pq"] is None and data["n_images"] == 3 and data["aji"] == report.mean["aji"]
    assert "AJI+" in report.format_table() and "1 without nuclei left out" in report.format_table()


def test_ids_need_not_be_contiguous_nor_have_background() -> None:
    true = squares((0, 10, 0, 10), (0, 10, 10, 20), shape=(10, 20))  # no background pixel at all
    pred = squares((0, 10, 0, 12), (0, 10, 12, 20), shape=(10, 20)) * 1000
    s = instance_scores(true, pred)
    assert (s.tp, s.fp, s.fn) == (2, 0, 0) and s.dice == 1.0
    assert s.aji == (100 + 80) / (120 + 100)


def test_bad_maps() -> None:
    with pytest.raises(InputError, match="shape"):
        instance_scores(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(InputError, match="integer"):
        instance_scores(np.zeros((4, 4)), np.zeros((4, 4), int))
    with pytest.raises(InputError, match="negative"):
        instance_scores(np.full((4, 4), -1), np.zeros((4, 4), int))


def test_aggregate_of_no_images() -> None:
    report = aggregate({})
    assert report.n_scored == 0 and math.isnan(report.mean["pq"])


# ------------------------------------------------------------------------------------- in denuc evaluate

def boxes_as_nuclei(*boxes: tuple[int, int, int, int], image_size: tuple[int, int] = (40, 20)) -> Nuclei:
    """Boxes (row0, row1, col0, col1) as nuclei with outlines through the centres of their corner pixels, which
    fill exactly the box (a pixel whose centre lies on the outline belongs to it)."""
    outlines = [np.array([[c0, r0], [c1 - 1, r0], [c1 - 1, r1 - 1], [c0, r1 - 1]], dtype=float)
                for r0, r1, c0, c1 in boxes]
    xy = [((c0 + c1 - 1) / 2, (r0 + r1 - 1) / 2) for r0, r1, c0, c1 in boxes]
    return Nuclei(xy=np.array(xy).reshape(-1, 2), mpp=0.5, image_size=image_size, outlines=outlines)


TRUE_BOXES = ((0, 10, 0, 10), (10, 20, 20, 30))
PRED_BOXES = ((0, 10, 0, 6), (0, 10, 6, 10), (10, 20, 20, 30))  # the first nucleus split unevenly, the second right


def test_evaluate_scores_the_outlines_against_instance_maps() -> None:
    gt, pred = boxes_as_nuclei(*TRUE_BOXES), boxes_as_nuclei(*PRED_BOXES)
    true_map = squares(*TRUE_BOXES)
    report = evaluate([("a", pred, gt), ("b", gt, gt)], instance_maps={"a": true_map, "b": true_map})
    assert report.instance.per_image["a"] == instance_scores(true_map, squares(*PRED_BOXES))
    assert report.instance.per_image["b"].aji == 1.0 and report.instance.n_scored == 2
    assert report.instance.mean["aji"] == (160 / 240 + 1.0) / 2  # the split: 60 px of a 100 px pair, 40 px unpaired
    assert (report.instance.tp, report.instance.fp, report.instance.fn) == (4, 1, 0)
    # the point scores are those without instance maps
    points = evaluate([("a", pred, gt), ("b", gt, gt)])
    assert report.instance is not None and points.instance is None
    assert {k: v for k, v in report.to_dict().items() if k != "instance"} == points.to_dict()
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["instance"]["aji"] == report.instance.mean["aji"] and data["instance"]["n_images"] == 2
    assert "AJI+" in report.format_table() and "AJI+" not in points.format_table()


def test_evaluate_instance_map_errors() -> None:
    gt, pred = boxes_as_nuclei(*TRUE_BOXES), boxes_as_nuclei(*PRED_BOXES)
    with pytest.raises(InputError, match="a: no ground-truth instance map"):
        evaluate([("a", pred, gt)], instance_maps={})
    with pytest.raises(InputError, match="a: the ground-truth instance map is 40x10 px but the image 40x20 px"):
        evaluate([("a", pred, gt)], instance_maps={"a": np.zeros((10, 40), int)})
    points_only = Nuclei(xy=pred.xy, image_size=pred.image_size)
    with pytest.raises(InputError, match="a: the predictions carry no outlines"):
        evaluate([("a", points_only, gt)], instance_maps={"a": squares(*TRUE_BOXES)})
    # an image without predictions needs none: its nuclei are all missed
    report = evaluate([("a", Nuclei(xy=[]), gt)], instance_maps={"a": squares(*TRUE_BOXES)})
    assert report.instance.per_image["a"].fn == 2 and report.instance.mean["pq"] == 0.0


def test_cli_scores_outlines_when_the_dataset_and_the_predictions_have_them(tmp_path: Path, monkeypatch,
                                                                           capsys) -> None:
    gt = boxes_as_nuclei(*TRUE_BOXES)
    asked = []

    def instance_map(name):
        asked.append(name)
        return squares(*TRUE_BOXES)

    dataset = SimpleNamespace(samples=lambda split: [SimpleNamespace(name="s1", nuclei=gt)],
                              instance_map=instance_map)
    monkeypatch.setattr("denuc.datasets.get_dataset", lambda name, root: dataset)
    args = ["evaluate", "--gt-dataset", "toy", "--dataset-root", str(tmp_path)]
    pred = boxes_as_nuclei(*PRED_BOXES)

    points = tmp_path / "points"
    points.mkdir()
    (points / "s1.csv").write_text("x,y\n" + "".join(f"{x},{y}\n" for x, y in pred.xy))
    assert main(args + ["--pred", str(points)]) == 0  # points only: no instance map read, no instance scores
    assert asked == [] and "AJI" not in capsys.readouterr().out

    outlines = tmp_path / "hovernet"  # HoVer-Net's JSON: centroids and contours, in denuc's pixel frame
    outlines.mkdir()
    nuc = {str(i + 1): {"centroid": list(xy), "contour": outline.tolist(), "type": 0}
           for i, (xy, outline) in enumerate(zip(pred.xy.tolist(), pred.outlines))}
    (outlines / "s1.json").write_text(json.dumps({"mag": None, "nuc": nuc}))
    assert main(args + ["--pred", str(outlines), "--out", str(tmp_path / "report.json")]) == 0
    assert asked == ["s1"] and "AJI+" in capsys.readouterr().out
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["instance"]["aji"] == instance_scores(squares(*TRUE_BOXES), squares(*PRED_BOXES)).aji
    assert data["detection"]["tp"] == 2
