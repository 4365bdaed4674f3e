"""Detection test-time augmentation: F1 and time per number of views, side by side on one split.

    python benchmarks/bench_tta.py [--model default] [--split val] [--runtime onnx]
        [--out benchmarks/results/tta/tta.json]

For 1, 2, 4 and 8 views (``DetectorConfig.test_time_views``) at the model's own threshold and NMS radius:
detection precision / recall / F1 per dataset (`denuc` protocol, 3 um), their mean, and the seconds the whole
split took. Choose on ``val``; ``test`` is for reading the chosen setting afterwards.
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

DATASETS = dataset_roots(("brcam2c", "crchisto"))  # the datasets the TTA figures are measured on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--split", default="val")
    parser.add_argument("--runtime", default="onnx", choices=("torch", "onnx"))
    parser.add_argument("--out", type=Path, default=RESULTS / "tta" / "tta.json")
    args = parser.parse_args()

    detector = Detector.from_pretrained(args.model, runtime=args.runtime)
    samples = {name: list(get_dataset(name, root).samples(args.split)) for name, root in DATASETS.items()}
    results = {"model": str(args.model), "config": json.loads(detector.config.to_json()), "split": args.split,
               "runtime": args.runtime, "radius_um": 3.0, "protocol": "denuc", "torch": torch.__version__,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "views": {}}
    for views in (1, 2, 4, 8):
        detector.with_settings(test_time_views=views)
        row, started = {}, time.perf_counter()
        for name, items in samples.items():
            pairs = [(s.name, detector.detect(s.image_path, mpp=s.nuclei.mpp), s.nuclei) for s in items]
            det = evaluate(pairs, radius_um=3.0).detection
            row[name] = {"images": len(pairs), "precision": det.precision, "recall": det.recall, "f1": det.f1}
        row["mean_f1"] = sum(row[name]["f1"] for name in samples) / len(samples)
        row["seconds"] = time.perf_counter() - started
        results["views"][views] = row
        print(f"{views} views: " + "  ".join(f"{name} F1 {row[name]['f1']:.4f}" for name in samples)
              + f"  mean {row['mean_f1']:.4f}  {row['seconds']:.1f} s "
              f"({row['seconds'] / results['views'][1]['seconds']:.1f}x)", flush=True)
    write_result(args.out, results, models=[args.model])
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
