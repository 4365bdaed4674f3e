"""Detection accuracy of a detector on the test splits of BRCAM2C and CRCHisto (by default; also CoNSeP and
MoNuSeg with --datasets), `denuc` protocol, 3 um.

    python benchmarks/bench_detection.py [--model default] [--split test] [--tta 1] [--datasets brcam2c,crchisto]
        [--out benchmarks/results/detection/detection.json]

Prints precision / recall / F1 and the recall over crowded nuclei per dataset and saves them as JSON. Images are
read at their native pixel size and the detector resamples them to its working resolution, as a user's call would.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from common import RESULTS, dataset_roots, write_result

from denuc.datasets import get_dataset
from denuc.inference.detect import Detector
from denuc.metrics.evaluate import evaluate

DATASETS = ("brcam2c", "crchisto", "consep", "monuseg")  # folders of the same names under ../shared/datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tta", type=int, default=1, help="test-time views (1, 2, 4, 8)")
    parser.add_argument("--radius-um", type=float, default=3.0)
    parser.add_argument("--datasets", default="brcam2c,crchisto", help=f"comma-separated, of {DATASETS}")
    parser.add_argument("--root", action="append", default=[], metavar="NAME=ROOT",
                        help="read dataset NAME from ROOT instead of ../shared/datasets/NAME (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS / "detection" / "detection.json")
    args = parser.parse_args()

    roots = dataset_roots(args.datasets.split(","), args.root)
    detector = Detector.from_pretrained(args.model).with_settings(test_time_views=args.tta)
    results = {"model": str(args.model), "config": json.loads(detector.config.to_json()), "split": args.split,
               "radius_um": args.radius_um, "protocol": "denuc",
               "roots": {name: str(root) for name, root in roots.items()}, "torch": torch.__version__,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "datasets": {}}
    for name in args.datasets.split(","):
        started = time.perf_counter()
        pairs = []
        for sample in get_dataset(name, roots[name]).samples(args.split):
            pred = detector.detect(sample.image_path, mpp=sample.nuclei.mpp)
            pairs.append((sample.name, pred, sample.nuclei))
        report = evaluate(pairs, radius_um=args.radius_um)
        det = report.detection
        results["datasets"][name] = {"images": len(pairs), "tp": det.tp, "fp": det.fp, "fn": det.fn,
                                     "precision": det.precision, "recall": det.recall, "f1": det.f1,
                                     "crowded": report.crowded.to_dict(), "seconds": time.perf_counter() - started}
        print(f"{name:9s} {args.split}: P {det.precision:.4f}  R {det.recall:.4f}  F1 {det.f1:.4f} "
              f"crowded recall {report.crowded.recall:.4f} ({report.crowded.total} crowded) "
              f"({len(pairs)} images, TP {det.tp} FP {det.fp} FN {det.fn})")
    write_result(args.out, results, models=[args.model])
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
