"""Detection at a finer working resolution than the detector was trained at: each validation image is enlarged by
``zoom`` beyond its true pixel size before the detector runs (its pixel size is told as ``mpp * zoom``, so the
detector works at an effective 0.5 / zoom um/px), points scored in the image's own pixels. Evidence for the
working-resolution decision (issue 30): which datasets gain from more pixels per nucleus.

    python benchmarks/bench_zoom.py [--model default] [--zoom 1.0 1.25 1.5] [--split val]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from common import RESULTS, write_result

from denuc.datasets import get_dataset
from denuc.inference.detect import Detector
from denuc.metrics.evaluate import evaluate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--zoom", type=float, nargs="+", default=[1.0, 1.25, 1.5])
    parser.add_argument("--split", default="val")
    parser.add_argument("--datasets", default="brcam2c,crchisto,consep,monuseg")
    parser.add_argument("--out", type=Path, default=RESULTS / "detection" / "zoom_val.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)  # MoNuSeg's known degenerate outlines, missing pixel size
    detector = Detector.from_pretrained(args.model, runtime="auto")
    results = {}
    for name in args.datasets.split(","):
        samples = get_dataset(name, SHARED / name).samples(args.split)
        results[name] = {}
        for zoom in args.zoom:
            pairs = []
            for sample in samples:
                found = detector.detect(sample.image_path, mpp=sample.nuclei.mpp * zoom)
                found.mpp = sample.nuclei.mpp  # the points are in the image's own pixels
                pairs.append((sample.name, found, sample.nuclei))
            report = evaluate(pairs)
            results[name][str(zoom)] = {"precision": report.detection.precision, "recall": report.detection.recall,
                                        "f1": report.detection.f1, "crowded_recall": report.crowded.recall}
            print(name, zoom, {k: round(v, 4) for k, v in results[name][str(zoom)].items()}, flush=True)
    write_result(args.out, {"split": args.split, "working_mpp": detector.config.mpp, "results": results},
                 [args.model])


if __name__ == "__main__":
    main()
