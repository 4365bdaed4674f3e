"""Time `evaluate` on one image of a million predictions against a million ground-truth points, per protocol.

The points are uniform in one square image at about the density of nuclei (1 per 100 px^2), scored at 3 um
with 0.5 um/px, i.e. a 6 px radius. Two cases: detector output (no classes; detection only) and three classes
(labels uniform at random, so about a third of each class). Prints the times and writes
benchmarks/results/matching/matching.json (``--out``). The requirement: the denuc protocol under 10 s on a 2-core
machine.

Usage: python benchmarks/bench_matching.py [--points N] [--protocols denuc,ocelot,puma,hungarian] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
from common import RESULTS, write_result

from denuc.metrics.evaluate import PROTOCOLS, evaluate
from denuc.nuclei import Nuclei, NucleusClass

CLASSES = ["tumour", "lymphocyte", "stroma"]
MPP, RADIUS_UM, AREA_PER_POINT = 0.5, 3.0, 100.0


def make_points(n: int, labelled: bool, seed: int = 0) -> tuple[Nuclei, Nuclei]:
    rng = np.random.default_rng(seed)
    side = float(np.sqrt(n * AREA_PER_POINT))
    names = np.array(CLASSES, dtype=object)
    gt = Nuclei(
        xy=rng.uniform(0, side, (n, 2)),
        labels=names[rng.integers(0, len(CLASSES), n)] if labelled else None,
        classes=[NucleusClass(c) for c in CLASSES] if labelled else [],
        mpp=MPP,
    )
    pred = Nuclei(
        xy=rng.uniform(0, side, (n, 2)),
        labels=names[rng.integers(0, len(CLASSES), n)] if labelled else None,
        scores=rng.random(n),
    )
    return pred, gt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--out", type=Path, default=RESULTS / "matching" / "matching.json")
    args = parser.parse_args()
    protocols = args.protocols.split(",")
    runs = []
    for labelled in (False, True):
        pred, gt = make_points(args.points, labelled)
        for protocol in protocols:
            if not labelled and protocol in ("ocelot", "puma"):
                continue  # class-only protocols: nothing to score without classes
            start = time.perf_counter()
            report = evaluate([("bench", pred, gt)], radius_um=RADIUS_UM, protocol=protocol)
            seconds = time.perf_counter() - start
            run = {
                "protocol": protocol,
                "classes": len(report.classes),
                "seconds": round(seconds, 3),
                "mean_f1": report.mean_f1,
                "detection_f1": None if report.detection is None else report.detection.f1,
            }
            runs.append(run)
            print(f"{protocol:>9}  {'3 classes' if labelled else 'no classes':>10}  {seconds:7.2f} s"
                  f"  mean F1 {run['mean_f1'] if run['mean_f1'] is not None else '-'}"
                  f"  detection F1 {run['detection_f1'] if run['detection_f1'] is not None else '-'}", flush=True)
    result = {
        "points": args.points,
        "radius_px": RADIUS_UM / MPP,
        "points_per_100_px2": 100.0 / AREA_PER_POINT,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "runs": runs,
    }
    write_result(args.out, result)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
