"""One-to-one matching of predicted points to ground-truth points within a radius, as each scoring protocol does.

Every matcher takes pixel coordinates (``(n, 2)`` arrays) and a radius in pixels, and returns the matched pairs
as two index arrays ``(pred_idx, gt_idx)``. The rules, their sources and their tie-breaking are in
docs/evaluation.md; in short:

* ``greedy_match`` (DeNuC, OCELOT 2023): predictions in descending score take the nearest free ground truth.
* ``puma_match`` (PUMA 2024): ground truth in file order takes the best-scoring, then nearest, free prediction.
* ``hungarian_match`` (HoVer-Net / CellViT / TIAToolbox ``pair_coordinates``): optimal assignment on distance.

Distances are always ``np.hypot`` of the coordinate differences, compared exactly with the radius. The k-d tree
(``scipy.spatial.cKDTree``) only proposes candidate pairs, with a radius widened by a relative 1e-9 so that no
pair within the exact radius is lost to the tree's own rounding; the exact test then decides. This keeps the
matchers exact and near-linear in the number of points: a million predictions against a million ground-truth
points take seconds, where a dense distance matrix would take terabytes.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

_SLACK = 1e-9
"""Relative widening of the radius for the tree's candidate search; the exact distance test follows."""

Candidates = tuple[np.ndarray, np.ndarray, np.ndarray]
"""Candidate pairs ``(pred_idx, gt_idx, distance)``, as ``candidate_pairs`` returns them."""


def greedy_match(
    pred_xy: np.ndarray,
    pred_scores: np.ndarray | None,
    gt_xy: np.ndarray,
    radius: float,
    inclusive: bool = True,
    candidates: Candidates | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Match predictions greedily in descending score, each to the nearest still-unmatched ground truth.

    A pair is eligible when its distance is ``<= radius`` (``inclusive``) or ``< radius``. Ties in score keep
    the input order (stable sort; no scores means input order); ties in distance go to the lower ground-truth
    index. ``candidates`` restricts the pairs considered (see ``candidate_pairs``). Returns
    ``(pred_idx, gt_idx)`` in the order the matches were made.
    """
    pred_xy, gt_xy = _points(pred_xy), _points(gt_xy)
    pi, gj, dist = _eligible(pred_xy, gt_xy, radius, inclusive, candidates)
    if len(pi) == 0:
        return _no_pairs()
    rank = _descending_rank(pred_scores, len(pred_xy))
    # Candidates of each prediction together, predictions in processing order, each one's nearest first
    # (ties: lower ground-truth index). Distances enter as their rank among the distinct distances, so that
    # prediction and distance fit one integer key and the sort needs two keys instead of three.
    distinct, distance_rank = np.unique(dist, return_inverse=True)
    order = np.lexsort((gj, rank[pi] * len(distinct) + distance_rank.reshape(-1)))
    pi, gj = pi[order], gj[order]
    starts = np.flatnonzero(np.r_[True, pi[1:] != pi[:-1]])
    ends = np.r_[starts[1:], len(pi)]
    # The greedy order makes each choice depend on the earlier ones, so this walk is sequential; it touches
    # each candidate pair at most once, in plain Python lists (numpy scalar access would be slower).
    candidates = gj.tolist()
    taken = bytearray(len(gt_xy))
    chosen = []
    for start, end in zip(starts.tolist(), ends.tolist()):
        for k in range(start, end):
            j = candidates[k]
            if not taken[j]:
                taken[j] = 1
                chosen.append(k)
                break
    chosen = np.asarray(chosen, dtype=np.int64)
    return pi[chosen], gj[chosen]


def puma_match(
    pred_xy: np.ndarray,
    pred_scores: np.ndarray | None,
    gt_xy: np.ndarray,
    radius: float,
    candidates: Candidates | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Match as the PUMA 2024 track-2 scorer: ground truth in input order, each taking one free prediction.

    Eligible predictions lie at distance ``< radius`` (strict). A ground-truth point takes the eligible one with
    the highest score, then the smallest distance, then the lowest index (PUMA's stable sort over its list in
    input order); no scores means all equal. As in PUMA, the prediction then removed is the first still-free
    one (in input order) *at the same coordinates* as the chosen one: the chosen one itself unless several
    predictions share those coordinates, in which case a better-scoring duplicate can stay free for a later
    ground-truth point. ``candidates`` restricts the pairs considered (see ``candidate_pairs``). Returns
    ``(pred_idx, gt_idx)``, pred_idx being the removed predictions.
    """
    pred_xy, gt_xy = _points(pred_xy), _points(gt_xy)
    pi, gj, dist = _eligible(pred_xy, gt_xy, radius, False, candidates)
    if len(pi) == 0:
        return _no_pairs()
    scores = np.zeros(len(pred_xy)) if pred_scores is None else np.asarray(pred_scores, dtype=np.float64)
    # Predictions at identical coordinates form one site. Only predictions with a candidate matter: a prediction
    # at the coordinates of a candidate is itself one. members lists them site by site, in input order within a
    # site (lexsort is stable).
    in_play = np.flatnonzero(np.bincount(pi, minlength=len(pred_xy)))
    members = in_play[np.lexsort((pred_xy[in_play, 1], pred_xy[in_play, 0]))]
    x, y = pred_xy[members, 0], pred_xy[members, 1]
    new_site = np.r_[True, (x[1:] != x[:-1]) | (y[1:] != y[:-1])]
    site_start = np.r_[np.flatnonzero(new_site), len(members)]
    site_of = np.empty(len(pred_xy), dtype=np.int64)
    site_of[members] = np.cumsum(new_site) - 1
    best = _best_of_remaining(members, site_start, scores)
    order = np.argsort(gj, kind="stable")
    gj, site, dist = gj[order], site_of[pi[order]], dist[order]
    starts = np.flatnonzero(np.r_[True, gj[1:] != gj[:-1]])
    ends = np.r_[starts[1:], len(gj)]
    site_l, dist_l, best_l = site.tolist(), dist.tolist(), best.tolist()
    start_l, neg_score = site_start.tolist(), (-scores).tolist()
    removed = [0] * (len(site_start) - 1)
    pred_out, gt_out = [], []
    for start, end in zip(starts.tolist(), ends.tolist()):
        best_key = best_site = None
        for k in range(start, end):
            s = site_l[k]
            position = start_l[s] + removed[s]
            if position == start_l[s + 1]:
                continue  # every prediction at this site is taken
            m = best_l[position]
            key = (neg_score[m], dist_l[k], m)
            if best_key is None or key < best_key:
                best_key, best_site = key, s
        if best_site is not None:
            pred_out.append(start_l[best_site] + removed[best_site])
            removed[best_site] += 1
            gt_out.append(gj[start])
    return members[np.asarray(pred_out, dtype=np.int64)], np.asarray(gt_out, dtype=np.int64)


def hungarian_match(
    pred_xy: np.ndarray, gt_xy: np.ndarray, radius: float, candidates: Candidates | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Match by optimal assignment on Euclidean distance, dropping assigned pairs farther than ``radius``.

    This is HoVer-Net's and TIAToolbox's ``pair_coordinates`` (rows ground truth, columns predictions,
    ``scipy.optimize.linear_sum_assignment``, keep distance ``<= radius``), solved separately on each connected
    component of the graph of pairs within ``radius``. docs/evaluation.md explains how that differs from one
    assignment over all points of an image. ``candidates`` restricts the pairs, and with them the points,
    considered (see ``candidate_pairs``). Returns ``(pred_idx, gt_idx)`` sorted by prediction.
    """
    pred_xy, gt_xy = _points(pred_xy), _points(gt_xy)
    pi, gj, dist = _eligible(pred_xy, gt_xy, radius, True, candidates)
    if len(pi) == 0:
        return _no_pairs()
    n_pred = len(pred_xy)
    graph = coo_matrix((np.ones(len(pi), dtype=np.int8), (pi, gj + n_pred)), shape=(n_pred + len(gt_xy),) * 2)
    n_components, component = connected_components(graph, directed=False)
    pred_comp, gt_comp = component[:n_pred], component[n_pred:]
    preds = np.flatnonzero(np.bincount(pi, minlength=n_pred))  # the points with a partner within the radius
    gts = np.flatnonzero(np.bincount(gj, minlength=len(gt_xy)))
    preds_in = np.bincount(pred_comp[preds], minlength=n_components)
    gts_in = np.bincount(gt_comp[gts], minlength=n_components)
    pair_comp = pred_comp[pi]
    pred_out, gt_out = [], []
    # A component with a single prediction (ground-truth point) is a star: every point in it lies within the
    # radius of that one, and the assignment takes the nearest, the lowest index among equals, as
    # linear_sum_assignment does for a single row or column.
    single_pred = preds_in[pair_comp] == 1
    single_gt = (gts_in[pair_comp] == 1) & ~single_pred
    for star, partner in ((single_pred, gj), (single_gt, pi)):
        order = np.flatnonzero(star)
        order = order[np.lexsort((partner[order], dist[order], pair_comp[order]))]
        comps = pair_comp[order]
        first = order[np.r_[True, comps[1:] != comps[:-1]][: len(order)]]
        pred_out.append(pi[first])
        gt_out.append(gj[first])
    # The rest: the full distance matrix of each component, as pair_coordinates would see it.
    rest = np.flatnonzero((preds_in > 1) & (gts_in > 1))
    rest_preds = preds[np.isin(pred_comp[preds], rest)]
    rest_gts = gts[np.isin(gt_comp[gts], rest)]
    rest_preds = rest_preds[np.argsort(pred_comp[rest_preds], kind="stable")]
    rest_gts = rest_gts[np.argsort(gt_comp[rest_gts], kind="stable")]
    pred_bounds = np.r_[0, np.cumsum(preds_in[rest])].tolist()
    gt_bounds = np.r_[0, np.cumsum(gts_in[rest])].tolist()
    for k in range(len(rest)):
        p = rest_preds[pred_bounds[k]:pred_bounds[k + 1]]
        g = rest_gts[gt_bounds[k]:gt_bounds[k + 1]]
        cost = np.hypot(gt_xy[g, None, 0] - pred_xy[None, p, 0], gt_xy[g, None, 1] - pred_xy[None, p, 1])
        rows, cols = linear_sum_assignment(cost)
        keep = cost[rows, cols] <= radius
        pred_out.append(p[cols[keep]])
        gt_out.append(g[rows[keep]])
    pred_idx, gt_idx = np.concatenate(pred_out), np.concatenate(gt_out)
    order = np.argsort(pred_idx, kind="stable")
    return pred_idx[order], gt_idx[order]


def candidate_pairs(a_xy: np.ndarray, b_xy: np.ndarray, radius: float, inclusive: bool = True) -> Candidates:
    """All pairs (i, j, distance) of points a[i], b[j] within ``radius`` (``<=`` or, not inclusive, ``<``).

    The distance is ``np.hypot`` of the differences. Pairs come in no particular order. The matchers accept
    these (a = predictions, b = ground truth), or any subset of them, as ``candidates``: scoring several
    subsets of the same points (classes) then needs one search instead of one per subset.
    """
    a_xy, b_xy = _points(a_xy), _points(b_xy)
    if not (np.isfinite(radius) and radius >= 0):
        raise ValueError(f"matching radius must be a finite number >= 0, got {radius}")
    if len(a_xy) == 0 or len(b_xy) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    # Unbalanced trees without compacted nodes build about twice as fast and query as fast for such points.
    tree_a = cKDTree(a_xy, balanced_tree=False, compact_nodes=False)
    tree_b = cKDTree(b_xy, balanced_tree=False, compact_nodes=False)
    found = tree_a.sparse_distance_matrix(tree_b, radius * (1 + _SLACK), output_type="ndarray")
    i, j = found["i"].astype(np.int64), found["j"].astype(np.int64)
    dist = np.hypot(a_xy[i, 0] - b_xy[j, 0], a_xy[i, 1] - b_xy[j, 1])
    keep = dist <= radius if inclusive else dist < radius
    return i[keep], j[keep], dist[keep]


def _eligible(
    pred_xy: np.ndarray, gt_xy: np.ndarray, radius: float, inclusive: bool, candidates: Candidates | None
) -> Candidates:
    """The candidate pairs within the radius: searched for, or the given ones that pass the exact test."""
    if candidates is None:
        return candidate_pairs(pred_xy, gt_xy, radius, inclusive)
    pi, gj, dist = candidates
    keep = dist <= radius if inclusive else dist < radius
    return pi[keep], gj[keep], dist[keep]


def _best_of_remaining(members: np.ndarray, site_start: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """For each position in ``members`` (grouped by site), the best-scoring member from there to the site's
    end, the earliest among equals: the one PUMA picks at a site whose earlier members are taken."""
    best = members.copy()
    sizes = np.diff(site_start)
    for site in np.flatnonzero(sizes > 1).tolist():
        for position in range(site_start[site + 1] - 2, site_start[site] - 1, -1):
            here, after = members[position], best[position + 1]
            best[position] = here if scores[here] >= scores[after] else after
    return best


def _descending_rank(scores: np.ndarray | None, n: int) -> np.ndarray:
    """rank[i] = the position of prediction i when sorted by descending score, ties in input order."""
    if scores is None:
        return np.arange(n)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank


def _points(xy: np.ndarray) -> np.ndarray:
    return np.asarray(xy, dtype=np.float64).reshape(-1, 2)


def _no_pairs() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
