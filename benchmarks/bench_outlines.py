"""Outlines on datasets with instance annotations: HoVer-Net's DQ / SQ / PQ, AJI and Dice, and the outline head's
time beside the detector's.

For each image of the split: the detector's points (``Detector.detect`` at the dataset's pixel size, the runtime
the command line uses on this device), then ``Outliner.outline``, clipped to the image; scored with
``denuc.metrics.evaluate`` against ``Dataset.instance_map``. The same outline head is also run at the ground-truth
centres ("oracle points"), which separates the outlines' quality (SQ) from the detector's (DQ). Times: median over
images of detection and of outlining (+ clipping), measured one after the other on the same image; with --slide,
what ``--outlines`` adds to ``predict --detector-only`` on a whole slide (``time_slide``). Both networks run in
``--runtime`` (default auto: ONNX Runtime on a CPU). On the images the head runs its network itself
(``Outliner.outline``: points from anywhere); on the slide it shares the detector's pass when it is the head's own
detector.

    python benchmarks/bench_outlines.py --outlines default-outlines --split test \
        --dataset consep=../shared/datasets/consep --dataset monuseg=../shared/datasets/monuseg \
        --slide ../shared/slides/CMU-1-Small-Region.svs
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from common import RESULTS, write_result

import denuc.datasets as datasets
from denuc.inference.detect import Detector
from denuc.inference.outline import Outliner
from denuc.inference.pipeline import Pipeline
from denuc.inference.slide import predict_slide
from denuc.io.slides import open_slide
from denuc.metrics.evaluate import evaluate
from denuc.outlines import clip_outlines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outlines", default="default-outlines")
    parser.add_argument("--detector", default="default")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--split", default="test")
    parser.add_argument("--dataset", action="append", required=True, help="NAME=ROOT (consep, monuseg)")
    parser.add_argument("--slide", action="append", default=[],
                        help="also time predict --detector-only --outlines on this slide: the summary's seconds in "
                             "the detector and in outlining, per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "outlines" / "outlines_test.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)  # MoNuSeg's known degenerate outlines, missing pixel size

    detector = Detector.from_pretrained(args.detector, runtime=args.runtime)
    outliner = Outliner.from_pretrained(args.outlines, runtime=args.runtime)
    results = {}
    for spec in args.dataset:
        name, root = spec.split("=", 1)
        dataset = datasets.get_dataset(name, root)
        detected, oracle, maps, detect_s, outline_s, counts = [], [], {}, [], [], []
        for sample_name in dataset.sample_names(args.split):
            sample = dataset.sample(sample_name)
            image, gt = sample.read_image(), sample.nuclei
            size = (image.shape[1], image.shape[0])
            started = time.perf_counter()
            found = detector.detect(image, mpp=gt.mpp)
            detect_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            found = clip_outlines(outliner.outline(image, found, gt.mpp), size)
            outline_s.append(time.perf_counter() - started)
            counts.append(len(found))
            at_truth = clip_outlines(outliner.outline(image, gt, gt.mpp), size)
            detected.append((sample_name, found, gt))
            oracle.append((sample_name, at_truth, gt))
            maps[sample_name] = dataset.instance_map(sample_name)
        report = evaluate(detected, instance_maps=maps)
        results[name] = {
            "images": len(maps),
            "detected_points": {"detection_f1": report.detection.f1, **report.instance.to_dict()},
            "oracle_points": evaluate(oracle, instance_maps=maps).instance.to_dict(),
            "seconds": {"detect_median": float(np.median(detect_s)), "outline_median": float(np.median(outline_s)),
                        "detect_total": float(np.sum(detect_s)), "outline_total": float(np.sum(outline_s)),
                        "outline_over_detect": float(np.sum(outline_s) / np.sum(detect_s)),
                        "nuclei_per_image_median": float(np.median(counts))},
        }
        print(name, {k: v for k, v in results[name]["detected_points"].items() if k != "per_image"},
              results[name]["seconds"])
    slides = {path: time_slide(Path(path), detector, outliner, args.rounds) for path in args.slide}
    for path, timing in slides.items():
        print(path, timing)
    write_result(Path(args.out), {"split": args.split, "runtime": detector.runtime, "results": results,
                                  "slides": slides}, [args.detector, args.outlines])


def time_slide(path: Path, detector: Detector, outliner: Outliner, rounds: int) -> dict:
    """What ``--outlines`` costs in ``predict --detector-only`` on a slide: per round, a run without outlines and a run
    with them, one after the other; the cost is the outlined run's seconds in the network and in outlining less the
    plain run's seconds in the network (``predict_slide``'s own timing), over the plain run's. (Behind the head's own
    detector the outlined run's network pass also computes the head's maps, so its "model" seconds grow too.)"""
    plain, model, outline = [], [], []
    with tempfile.TemporaryDirectory() as out, open_slide(path) as slide:
        for _ in range(rounds):
            plain.append(predict_slide(slide, Pipeline(detector), out, overwrite=True, progress=False)["timing_s"])
            run = predict_slide(slide, Pipeline(detector), out, overwrite=True, progress=False, outliner=outliner)
            model.append(run["timing_s"]["model"])
            outline.append(run["timing_s"]["outlines"])
    detect = np.array([t["model"] for t in plain])
    cost = (np.array(model) + np.array(outline) - detect) / detect
    return {"nuclei": run["nuclei"], "detect_s": detect.tolist(), "outlined_model_s": model, "outline_s": outline,
            "outline_over_detect_median": float(np.median(cost))}


if __name__ == "__main__":
    main()
