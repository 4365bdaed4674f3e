"""Detection F1 against the score threshold, per dataset, on the validation splits (issue 30: one threshold that
holds across datasets). Each image is detected once with a low threshold and no point NMS; every threshold then
keeps the points above it and applies the model's own NMS radius, or ``--nms-radius`` (point NMS is greedy by score,
so this equals detecting at that threshold). Reports precision, recall, F1 and crowded-nuclei recall per dataset and
threshold, each dataset's best threshold, the model's own, and which thresholds keep every dataset within 1 point of
its best (the shipping rule of ``denuc.train.detector.tune_thresholds``).

    python benchmarks/bench_thresholds.py [--model default] [--split val] [--table]

``--table`` prints the Markdown table of the model card from the result file instead of measuring.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
from common import RESULTS, dataset_roots, write_result

from denuc.config import FINE_SCAN_MPP
from denuc.datasets import get_dataset
from denuc.inference.detect import Detector
from denuc.inference.nms import point_nms
from denuc.metrics.evaluate import evaluate
from denuc.nuclei import Nuclei
from denuc.train.detector import rule_threshold, scan_group

THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7)
TOLERANCE = 0.01


def sweep(detector: Detector, samples, thresholds: tuple[float, ...], radius_um: float) -> dict[str, dict]:
    """Per threshold (as a string), the detection precision, recall, F1 and crowded recall on ``samples``, with
    point NMS at ``radius_um``; ``detector`` must be set to a threshold below all of them and no NMS."""
    raw = [(sample, detector.detect(sample.image_path, mpp=sample.nuclei.mpp)) for sample in samples]
    rows = {}
    for threshold in thresholds:
        pairs = []
        for sample, found in raw:
            above = found.scores > threshold
            xy, scores = found.xy[above], found.scores[above]
            keep = point_nms(xy, scores, radius_um / sample.nuclei.mpp)
            pairs.append((sample.name, Nuclei(xy=xy[keep], scores=scores[keep], mpp=sample.nuclei.mpp), sample.nuclei))
        report = evaluate(pairs)
        rows[str(threshold)] = {"precision": report.detection.precision, "recall": report.detection.recall,
                                "f1": report.detection.f1, "crowded_recall": report.crowded.recall}
    return rows


def per_scan(results: dict[str, dict], groups: dict[str, list[str]]) -> dict:
    """The shipping rule within each scan group (``rule_threshold``): each group's threshold, each dataset's F1 at
    its group's threshold, their mean, and whether every dataset is then within ``TOLERANCE`` of its best."""
    f1 = {name: {t: row["f1"] for t, row in rows.items()} for name, rows in results.items()}
    best = {name: max(v.values()) for name, v in f1.items()}
    chosen = {g: rule_threshold({d: f1[d] for d in names}, best, TOLERANCE) for g, names in groups.items()}
    at = {d: f1[d][chosen[g]] for g, names in groups.items() for d in names}
    return {"groups": groups, "threshold": {g: float(t) for g, t in chosen.items()}, "f1": at,
            "mean_f1": float(np.mean(list(at.values()))),
            "within_1_point_of_every_best": all(at[d] >= best[d] - TOLERANCE for d in at)}


def summarise(results: dict[str, dict], own: dict[str, float]) -> dict:
    """Each dataset's best threshold and its F1 at its ``own`` (the model's threshold for that dataset's scans), the
    thresholds within ``TOLERANCE`` of every dataset's best, the best mean."""
    thresholds = list(next(iter(results.values())))
    best = {name: max(rows, key=lambda t: rows[t]["f1"]) for name, rows in results.items()}
    holds = [t for t in thresholds
             if all(rows[t]["f1"] >= rows[best[name]]["f1"] - TOLERANCE for name, rows in results.items())]
    mean = {t: float(np.mean([rows[t]["f1"] for rows in results.values()])) for t in thresholds}
    return {"best_threshold": {name: float(t) for name, t in best.items()},
            "best_f1": {name: results[name][t]["f1"] for name, t in best.items()},
            "own_threshold": own, "own_f1": {name: rows[str(own[name])]["f1"] for name, rows in results.items()},
            "within_1_point_of_every_best": [float(t) for t in holds],
            "best_mean_threshold": float(max(mean, key=mean.get)), "mean_f1": mean}


def table(path: Path) -> str:
    """The card's Markdown table: F1 (and crowded recall) per dataset and threshold; each best in bold."""
    data = json.loads(path.read_text())
    results, summary = data["results"], data["summary"]
    names = list(results)
    lines = ["| threshold | " + " | ".join(f"{n} F1 (crowded recall)" for n in names) + " | mean F1 |",
             "|---" * (len(names) + 2) + "|"]
    own = summary["own_threshold"]
    own = own if isinstance(own, dict) else dict.fromkeys(names, own)  # files of models with one threshold
    for t in results[names[0]]:
        cells = []
        for n in names:
            row = results[n][t]
            f1 = f"{row['f1']:.3f}"
            cells.append(f"**{f1}** ({row['crowded_recall']:.3f})" if float(t) == summary["best_threshold"][n]
                         else f"{f1} ({row['crowded_recall']:.3f})")
        shipped = [n for n in names if float(t) == own[n]]
        mark = (" (shipped)" if len(shipped) == len(names) else f" (shipped: {', '.join(shipped)})" if shipped
                else "")
        lines.append(f"| {t}{mark} | " + " | ".join(cells) + f" | {summary['mean_f1'][t]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--split", default="val")
    parser.add_argument("--datasets", default="brcam2c,crchisto,consep,monuseg")
    parser.add_argument("--root", action="append", default=[], metavar="NAME=ROOT",
                        help="read dataset NAME from ROOT instead of ../shared/datasets/NAME (repeatable)")
    parser.add_argument("--nms-radius", type=float, default=None, metavar="UM",
                        help="point NMS radius in um (default: the model's own)")
    parser.add_argument("--tile", type=int, nargs=2, default=None, metavar=("SIZE", "OVERLAP"),
                        help="detect in tiles of SIZE working pixels overlapping by OVERLAP (default: the model's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: results/detection/thresholds_<split>_<model>.json")
    parser.add_argument("--table", action="store_true", help="print the card's table from --out and exit")
    args = parser.parse_args()
    out = args.out or RESULTS / "detection" / f"thresholds_{args.split}_{Path(args.model).stem}.json"
    if args.table:
        print(table(out))
        return
    roots = dataset_roots(args.datasets.split(","), args.root)
    warnings.simplefilter("ignore", UserWarning)  # MoNuSeg's known degenerate outlines, missing pixel size
    detector = Detector.from_pretrained(args.model, runtime="auto")
    if args.tile is not None:
        detector.with_settings(tile_size=args.tile[0], tile_overlap=args.tile[1])
    config = detector.config  # the model's own settings at these tiles (its large-tile thresholds, if it has some)
    radius_um = config.nms_radius_um if args.nms_radius is None else args.nms_radius
    own_thresholds = {config.threshold_for(None), config.threshold_for(FINE_SCAN_MPP / 2)}  # 20x and 40x scans
    thresholds = tuple(sorted(set(THRESHOLDS) | own_thresholds))
    detector.with_settings(score_threshold=min(thresholds) - 1e-6, score_threshold_40x=None, nms_radius_um=0.0)
    results, groups, own = {}, {}, {}
    for name in args.datasets.split(","):
        samples = get_dataset(name, roots[name]).samples(args.split)
        results[name] = sweep(detector, samples, thresholds, radius_um)
        scans = [sample.nuclei.mpp for sample in samples]
        groups.setdefault(scan_group(scans), []).append(name)
        own[name] = config.threshold_for(float(np.median(scans)))
        print(name, {t: round(r["f1"], 4) for t, r in results[name].items()}, flush=True)
    summary = summarise(results, own) | {"per_scan": per_scan(results, groups)}
    print(json.dumps({k: v for k, v in summary.items() if k != "mean_f1"}, indent=1))
    write_result(out, {"split": args.split, "roots": {name: str(root) for name, root in roots.items()},
                       "nms_radius_um": radius_um,
                       "tile": [detector.config.tile_size, detector.config.tile_overlap],
                       "working_mpp": detector.config.mpp, "results": results, "summary": summary}, [args.model])


if __name__ == "__main__":
    main()
