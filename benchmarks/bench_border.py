"""Recall of a detector by a nucleus's distance to its image's border and to its nearest annotated neighbour, on
a dataset with instance maps (CoNSeP).

CoNSeP's copy here is 256-px crops (64 um at 40x): a nucleus cut by a crop's border is annotated at the centre of
its visible part, however little of it the crop shows. This reports, per model, recall (``denuc`` protocol, 3 um)
in bands of distance to the border and, within 1 um of it, by the nucleus's area inside the image (from
``inst_map``); whole nuclei's median area for scale. Recall by the distance to the nearest other annotated nucleus
shows what a detector that gives one point to two close nuclei loses.

    python benchmarks/bench_border.py --model precise --split val --out results/four_datasets/border_recall.json
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
from common import write_result
from scipy.spatial import cKDTree

from denuc.datasets import get_dataset
from denuc.inference.detect import Detector
from denuc.metrics.matching import greedy_match

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
BANDS_UM = ((0, 1), (1, 2), (2, 4), (4, 8), (8, None))
AREAS_UM2 = ((0, 2), (2, 4), (4, 8), (8, None))
NEIGHBOUR_UM = ((0, 2), (2, 2.5), (2.5, 3), (3, 4), (4, 6), (6, None))


def within(values: np.ndarray, low: float, high: float | None) -> np.ndarray:
    return (values >= low) & (values < (np.inf if high is None else high))


def recall_by(hit: np.ndarray, values: np.ndarray, bins) -> dict[str, dict]:
    return {f"{lo}-{hi if hi is not None else 'inf'}": {"nuclei": int(s.sum()),
                                                         "recall": float(hit[s].mean()) if s.any() else None}
            for lo, hi in bins for s in [within(values, lo, hi)]}


def measure(model: str, root: Path, split: str, radius_um: float) -> dict:
    detector = Detector.from_pretrained(model)
    dataset = get_dataset("consep", root)
    distance, area, hit, neighbour = [], [], [], []
    for sample in dataset.samples(split):
        gt = sample.nuclei
        if len(gt) == 0:
            continue
        inst = dataset.instance_map(sample.name)
        pixels = np.bincount(inst.ravel(), minlength=len(gt) + 1)[1:len(gt) + 1]
        found = detector.detect(sample.image_path, mpp=gt.mpp)
        _, matched = greedy_match(found.xy, found.scores, gt.xy, radius_um / gt.mpp)
        h, w = inst.shape
        x, y = gt.xy[:, 0], gt.xy[:, 1]
        distance.append(np.minimum.reduce([x + 0.5, y + 0.5, w - 0.5 - x, h - 0.5 - y]) * gt.mpp)
        area.append(pixels * gt.mpp ** 2)
        hit.append(np.isin(np.arange(len(gt)), matched))
        neighbour.append(cKDTree(gt.xy).query(gt.xy, k=2)[0][:, 1] * gt.mpp if len(gt) > 1 else np.full(1, np.inf))
    distance, area, hit, neighbour = map(np.concatenate, (distance, area, hit, neighbour))
    edge = distance < 1.0
    return {"nuclei": int(len(hit)), "recall": float(hit.mean()),
            "by_distance_to_border_um": recall_by(hit, distance, BANDS_UM),
            "within_1_um_by_area_inside_um2": recall_by(hit[edge], area[edge], AREAS_UM2),
            "median_area_um2_farther_than_4_um": float(np.median(area[distance >= 4])),
            "by_nearest_neighbour_um": recall_by(hit, neighbour, NEIGHBOUR_UM)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="detector (shipped name or file); repeatable")
    parser.add_argument("--root", type=Path, default=SHARED / "consep", help="a CoNSeP copy (default: ours)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--radius-um", type=float, default=3.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    models = args.model or ["precise"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = {model: measure(model, args.root, args.split, args.radius_um) for model in models}
    for model, r in results.items():
        print(model, f"recall {r['recall']:.3f};", ", ".join(f"{k} um: {v['recall']:.3f} (n {v['nuclei']})"
                                                               for k, v in r["by_distance_to_border_um"].items()))
        print("  by nearest neighbour:", ", ".join(f"{k} um: {v['recall']:.3f} (n {v['nuclei']})"
                                                   for k, v in r["by_nearest_neighbour_um"].items()))
    write_result(args.out, {"dataset": "consep", "root": str(args.root), "split": args.split,
                            "radius_um": args.radius_um, "results": results}, models)


if __name__ == "__main__":
    main()
