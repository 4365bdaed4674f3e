"""Detection F1 against the score threshold, per dataset, on the validation splits (issue 30: one threshold that
holds across datasets). Each image is detected once with a low threshold and no point NMS; every threshold then
keeps the points above it and applies the model's own NMS radius (point NMS is greedy by score, so this equals
detecting at that threshold). Reports precision, recall, F1 and crowded-nuclei recall per dataset and threshold,
each dataset's best threshold, the model's own, and which thresholds keep every dataset within 1 point of its
best (the shipping rule of ``denuc.train.detector.tune_thresholds``).

    python benchmarks/bench_thresholds.py [--model default] [--split val] [--table]

``--table`` prints the Markdown table of the model card from the result file instead of measuring.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
from common import RESULTS, write_result

from denuc.datasets import get_dataset
from denuc.inference.detect import Detector
from denuc.inference.nms import point_nms
from denuc.metrics.evaluate import evaluate
from denuc.nuclei import Nuclei

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
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


def summarise(results: dict[str, dict], own: float) -> dict:
    """Each dataset's best threshold, the thresholds within ``TOLERANCE`` of every dataset's best, the best mean."""
    thresholds = list(next(iter(results.values())))
    best = {name: max(rows, key=lambda t: rows[t]["f1"]) for name, rows in results.items()}
    holds = [t for t in thresholds
             if all(rows[t]["f1"] >= rows[best[name]]["f1"] - TOLERANCE for name, rows in results.items())]
    mean = {t: float(np.mean([rows[t]["f1"] for rows in results.values()])) for t in thresholds}
    return {"best_threshold": {name: float(t) for name, t in best.items()},
            "best_f1": {name: results[name][t]["f1"] for name, t in best.items()},
            "own_threshold": own, "own_f1": {name: rows[str(own)]["f1"] for name, rows in results.items()},
            "within_1_point_of_every_best": [float(t) for t in holds],
            "best_mean_threshold": float(max(mean, key=mean.get)), "mean_f1": mean}


def table(path: Path) -> str:
    """The card's Markdown table: F1 (and crowded recall) per dataset and threshold; each best in bold."""
    data = json.loads(path.read_text())
    results, summary = data["results"], data["summary"]
    names = list(results)
    lines = ["| threshold | " + " | ".join(f"{n} F1 (crowded recall)" for n in names) + " | mean F1 |",
             "|---" * (len(names) + 2) + "|"]
    for t in results[names[0]]:
        cells = []
        for n in names:
            row = results[n][t]
            f1 = f"{row['f1']:.3f}"
            cells.append(f"**{f1}** ({row['crowded_recall']:.3f})" if float(t) == summary["best_threshold"][n]
                         else f"{f1} ({row['crowded_recall']:.3f})")
        own = " (shipped)" if float(t) == summary["own_threshold"] else ""
        lines.append(f"| {t}{own} | " + " | ".join(cells) + f" | {summary['mean_f1'][t]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--split", default="val")
    parser.add_argument("--datasets", default="brcam2c,crchisto,consep,monuseg")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: results/detection/thresholds_<split>_<model>.json")
    parser.add_argument("--table", action="store_true", help="print the card's table from --out and exit")
    args = parser.parse_args()
    out = args.out or RESULTS / "detection" / f"thresholds_{args.split}_{Path(args.model).stem}.json"
    if args.table:
        print(table(out))
        return
    warnings.simplefilter("ignore", UserWarning)  # MoNuSeg's known degenerate outlines, missing pixel size
    detector = Detector.from_pretrained(args.model, runtime="auto")
    own, radius_um = detector.config.score_threshold, detector.config.nms_radius_um
    thresholds = tuple(sorted(set(THRESHOLDS) | {own}))
    detector.with_settings(score_threshold=min(thresholds) - 1e-6, nms_radius_um=0.0)
    results = {}
    for name in args.datasets.split(","):
        results[name] = sweep(detector, get_dataset(name, SHARED / name).samples(args.split), thresholds, radius_um)
        print(name, {t: round(r["f1"], 4) for t, r in results[name].items()}, flush=True)
    summary = summarise(results, own)
    print(json.dumps({k: v for k, v in summary.items() if k != "mean_f1"}, indent=1))
    write_result(out, {"split": args.split, "nms_radius_um": radius_um,
                       "working_mpp": detector.config.mpp, "results": results, "summary": summary}, [args.model])


if __name__ == "__main__":
    main()
