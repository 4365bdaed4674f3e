"""The matchers: hand-computed cases per protocol and cross-checks against plain transcriptions of the sources."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from denuc.metrics.matching import candidate_pairs, greedy_match, hungarian_match, puma_match


def pairs(result: tuple[np.ndarray, np.ndarray]) -> list[tuple[int, int]]:
    return sorted(zip(result[0].tolist(), result[1].tolist()))


# ------------------------------------------------------------------------------ brute-force references

def brute_greedy(pred, scores, gt, radius, inclusive=True):
    """OCELOT 2023's _calc_scores loop (after its fix to sort by probability), with a stable sort."""
    dist = np.hypot(pred[:, None, 0] - gt[None, :, 0], pred[:, None, 1] - gt[None, :, 1])
    eligible = dist <= radius if inclusive else dist < radius
    order = range(len(pred)) if scores is None else np.argsort(-scores, kind="stable")
    out = []
    for p in order:
        neighbours = eligible[p].nonzero()[0]
        if len(neighbours):
            g = min(neighbours, key=lambda j: dist[p, j])  # min keeps the first (lowest index) among equals
            out.append((int(p), int(g)))
            eligible[:, g] = False
    return sorted(out)


def brute_puma(pred, scores, gt, radius):
    """PUMA track 2's calculate_centroid_distance, on points instead of polygon centroids."""
    remaining = [{"centroid": pred[i].tolist(), "score": 1 if scores is None else scores[i], "index": i}
                 for i in range(len(pred))]
    out = []
    for j, point in enumerate(gt):
        eligible = []
        for candidate in remaining:
            distance = float(np.hypot(*(point - np.array(candidate["centroid"]))))
            if distance < radius:
                eligible.append((candidate, distance))
        eligible.sort(key=lambda e: (-e[0]["score"], e[1]))
        if eligible:
            best = eligible[0][0]
            for k, candidate in enumerate(remaining):
                if np.array_equal(candidate["centroid"], best["centroid"]):
                    out.append((candidate["index"], j))
                    del remaining[k]
                    break
    return sorted(out)


def brute_hungarian(pred, gt, radius):
    """pair_coordinates (rows ground truth) on each connected component of the within-radius graph."""
    if len(pred) == 0 or len(gt) == 0:
        return []
    dist = np.hypot(gt[:, None, 0] - pred[None, :, 0], gt[:, None, 1] - pred[None, :, 1])
    near = dist <= radius
    component = -np.ones(len(gt) + len(pred), dtype=int)  # ground truth first, then predictions
    for start in range(len(component)):
        if component[start] >= 0:
            continue
        component[start], stack = start, [start]
        while stack:
            node = stack.pop()
            neighbours = (np.flatnonzero(near[node]) + len(gt) if node < len(gt)
                          else np.flatnonzero(near[:, node - len(gt)]))
            for other in neighbours:
                if component[other] < 0:
                    component[other] = start
                    stack.append(other)
    out = []
    for label in np.unique(component):
        rows = np.flatnonzero(component[: len(gt)] == label)
        cols = np.flatnonzero(component[len(gt):] == label)
        if len(rows) and len(cols):
            cost = dist[np.ix_(rows, cols)]
            r, c = linear_sum_assignment(cost)
            out += [(int(cols[b]), int(rows[a])) for a, b in zip(r, c) if cost[a, b] <= radius]
    return sorted(out)


def random_points(seed: int, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Predictions, scores, ground truth and a radius of one of three kinds:
    uniform real coordinates; a small integer grid (exact ties in distance and score, duplicate points);
    tight clusters (many candidates per prediction)."""
    rng = np.random.default_rng(seed)
    n, m = rng.integers(0, 40, size=2)
    if kind == "uniform":
        pred, gt = rng.uniform(0, 30, (n, 2)), rng.uniform(0, 30, (m, 2))
        scores, radius = rng.random(n), float(rng.uniform(0.5, 5))
    elif kind == "integer":
        pred, gt = rng.integers(0, 8, (n, 2)).astype(float), rng.integers(0, 8, (m, 2)).astype(float)
        scores, radius = rng.integers(0, 3, n).astype(float), float(rng.choice([0, 1, 2, np.sqrt(5), 3]))
    else:
        centres = rng.uniform(0, 40, (3, 2))
        pred = centres[rng.integers(0, 3, n)] + rng.normal(0, 1.5, (n, 2))
        gt = centres[rng.integers(0, 3, m)] + rng.normal(0, 1.5, (m, 2))
        scores, radius = rng.random(n), float(rng.uniform(2, 8))
    return pred, scores, gt, radius


# --------------------------------------------------------------------------------- hand-computed cases

def test_greedy_takes_predictions_by_descending_score_and_the_nearest_ground_truth() -> None:
    # The stronger prediction takes the nearer point; the weaker one then has nothing left within reach,
    # although an assignment could have matched both.
    pred, gt = np.array([[0.0, 0], [2, 0]]), np.array([[1.0, 0], [-1.5, 0]])
    assert pairs(greedy_match(pred, np.array([0.9, 0.1]), gt, 1.6)) == [(0, 0)]
    assert pairs(greedy_match(pred, np.array([0.1, 0.9]), gt, 1.6)) == [(0, 1), (1, 0)]
    assert pairs(hungarian_match(pred, gt, 1.6)) == [(0, 1), (1, 0)]


def test_greedy_ties_in_score_keep_input_order() -> None:
    pred, gt = np.array([[1.0, 0], [0.5, 0]]), np.array([[0.0, 0]])
    assert pairs(greedy_match(pred, np.array([0.5, 0.5]), gt, 2)) == [(0, 0)]
    assert pairs(greedy_match(pred, None, gt, 2)) == [(0, 0)]
    assert pairs(greedy_match(pred, np.array([0.5, 0.6]), gt, 2)) == [(1, 0)]


def test_greedy_ties_in_distance_go_to_the_lower_ground_truth_index() -> None:
    pred, gt = np.array([[0.0, 0]]), np.array([[1.0, 0], [-1.0, 0], [0, 1.0]])
    assert pairs(greedy_match(pred, None, gt, 2)) == [(0, 0)]
    assert pairs(greedy_match(pred, None, gt[::-1], 2)) == [(0, 0)]


def test_a_point_exactly_at_the_radius() -> None:
    pred, gt = np.array([[0.0, 0]]), np.array([[3.0, 4]])  # distance exactly 5
    assert pairs(greedy_match(pred, None, gt, 5.0)) == [(0, 0)]  # denuc, ocelot: <= r
    assert pairs(greedy_match(pred, None, gt, 5.0, inclusive=False)) == []
    assert pairs(puma_match(pred, None, gt, 5.0)) == []  # puma: < r
    assert pairs(hungarian_match(pred, gt, 5.0)) == [(0, 0)]  # pair_coordinates: <= r
    assert pairs(puma_match(pred, None, gt, np.nextafter(5.0, 6))) == [(0, 0)]


@pytest.mark.parametrize("n_pred, n_gt", [(0, 0), (0, 3), (3, 0)])
def test_empty_inputs(n_pred: int, n_gt: int) -> None:
    pred, gt = np.zeros((n_pred, 2)), np.zeros((n_gt, 2))
    assert pairs(greedy_match(pred, np.ones(n_pred), gt, 3)) == []
    assert pairs(puma_match(pred, np.ones(n_pred), gt, 3)) == []
    assert pairs(hungarian_match(pred, gt, 3)) == []


def test_puma_takes_the_highest_score_then_the_nearest() -> None:
    gt = np.array([[0.0, 0]])
    pred = np.array([[1.0, 0], [2, 0], [0, 2]])
    assert pairs(puma_match(pred, np.array([0.2, 0.9, 0.9]), gt, 3)) == [(1, 0)]  # score first; (1) before (2)
    assert pairs(puma_match(pred, np.array([0.2, 0.9, 0.9])[::-1], gt, 3)) == [(0, 0)]  # 0.9 at distance 1
    assert pairs(puma_match(pred, None, gt, 3)) == [(0, 0)]  # no scores: nearest


def test_puma_is_driven_by_ground_truth_order() -> None:
    pred, scores = np.array([[0.0, 0], [2, 0]]), np.array([0.9, 0.1])
    gt = np.array([[1.0, 0], [-1.5, 0]])
    assert pairs(puma_match(pred, scores, gt, 1.6)) == [(0, 0)]  # point 0 takes the 0.9; point 1 has none
    assert pairs(puma_match(pred, scores, gt[::-1], 1.6)) == [(0, 0), (1, 1)]


def test_puma_removes_the_first_prediction_at_the_chosen_coordinates() -> None:
    # Predictions 0 and 1 share coordinates; ground truth 0 chooses the 0.9 (prediction 1), but PUMA's scorer
    # deletes the first prediction with those coordinates (prediction 0), so the 0.9 is chosen again by ground
    # truth 1, and prediction 2 stays free for ground truth 2.
    pred = np.array([[1.0, 0], [1.0, 0], [3.5, 0]])
    scores = np.array([0.1, 0.9, 0.5])
    gt = np.array([[0.0, 0], [2.0, 0], [5.0, 0]])
    assert pairs(puma_match(pred, scores, gt, 2.0)) == [(0, 0), (1, 1), (2, 2)]
    assert brute_puma(pred, scores, gt, 2.0) == [(0, 0), (1, 1), (2, 2)]


def test_hungarian_minimises_total_distance_within_a_component() -> None:
    pred = np.array([[0.0, 0], [3.0, 0]])
    gt = np.array([[1.0, 0], [4.5, 0]])
    assert pairs(hungarian_match(pred, gt, 2.0)) == [(0, 0), (1, 1)]
    # ties: a star component keeps the lowest index, as linear_sum_assignment does
    assert pairs(hungarian_match(np.array([[0.0, 0]]), np.array([[1.0, 0], [-1.0, 0]]), 2.0)) == [(0, 0)]


def test_candidate_pairs_are_exact_at_the_radius() -> None:
    a, b = np.array([[0.0, 0]]), np.array([[0.1, 0.2], [np.nextafter(0.3, 1), 0.4]])
    radius = float(np.hypot(0.1, 0.2))
    assert candidate_pairs(a, b, radius)[1].tolist() == [0]
    assert candidate_pairs(a, b, radius, inclusive=False)[1].tolist() == []
    with pytest.raises(ValueError):
        candidate_pairs(a, b, float("nan"))


# --------------------------------------------------------------------------- cross-checks (hypothesis)

KINDS = st.sampled_from(["uniform", "integer", "clustered"])
SEEDS = st.integers(0, 2**32 - 1)


@settings(max_examples=150, deadline=None)
@given(seed=SEEDS, kind=KINDS, inclusive=st.booleans())
def test_greedy_equals_brute_force(seed: int, kind: str, inclusive: bool) -> None:
    pred, scores, gt, radius = random_points(seed, kind)
    assert pairs(greedy_match(pred, scores, gt, radius, inclusive)) == brute_greedy(pred, scores, gt, radius,
                                                                                   inclusive)


@settings(max_examples=150, deadline=None)
@given(seed=SEEDS, kind=KINDS)
def test_puma_equals_brute_force(seed: int, kind: str) -> None:
    pred, scores, gt, radius = random_points(seed, kind)
    assert pairs(puma_match(pred, scores, gt, radius)) == brute_puma(pred, scores, gt, radius)
    assert pairs(puma_match(pred, None, gt, radius)) == brute_puma(pred, None, gt, radius)


@settings(max_examples=150, deadline=None)
@given(seed=SEEDS, kind=KINDS)
def test_hungarian_equals_brute_force(seed: int, kind: str) -> None:
    pred, _, gt, radius = random_points(seed, kind)
    assert pairs(hungarian_match(pred, gt, radius)) == brute_hungarian(pred, gt, radius)


def test_matches_are_one_to_one_and_within_the_radius_on_a_dense_field() -> None:
    rng = np.random.default_rng(7)
    pred, gt = rng.uniform(0, 300, (3000, 2)), rng.uniform(0, 300, (3000, 2))
    for match in (greedy_match(pred, rng.random(3000), gt, 6.0), puma_match(pred, None, gt, 6.0),
                  hungarian_match(pred, gt, 6.0)):
        p, g = match
        assert len(set(p.tolist())) == len(p) and len(set(g.tolist())) == len(g)
        assert (np.hypot(*(pred[p] - gt[g]).T) <= 6.0).all()


@settings(max_examples=100, deadline=None)
@given(seed=SEEDS, kind=KINDS)
def test_candidates_of_a_subset_match_as_the_subset_does(seed: int, kind: str) -> None:
    """Matching a subset of the points through a subset of the candidate pairs (how evaluate scores each class
    with one search per image) equals matching the subset's own arrays."""
    pred, scores, gt, radius = random_points(seed, kind)
    rng = np.random.default_rng(seed)
    pred_in, gt_in = rng.random(len(pred)) < 0.6, rng.random(len(gt)) < 0.6
    p_idx, g_idx = np.flatnonzero(pred_in), np.flatnonzero(gt_in)
    pi, gj, dist = candidate_pairs(pred, gt, radius * 1.5)
    keep = pred_in[pi] & gt_in[gj]
    candidates = (pi[keep], gj[keep], dist[keep])

    def on_subset(match):
        return sorted(zip(p_idx[match[0]].tolist(), g_idx[match[1]].tolist()))

    assert pairs(greedy_match(pred, scores, gt, radius, candidates=candidates)) == on_subset(
        greedy_match(pred[pred_in], scores[pred_in], gt[gt_in], radius))
    assert pairs(puma_match(pred, scores, gt, radius, candidates=candidates)) == on_subset(
        puma_match(pred[pred_in], scores[pred_in], gt[gt_in], radius))
    assert pairs(hungarian_match(pred, gt, radius, candidates=candidates)) == on_subset(
        hungarian_match(pred[pred_in], gt[gt_in], radius))
