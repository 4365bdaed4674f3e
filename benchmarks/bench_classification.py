"""Detection + classification on the BRCAM2C and CRCHisto test splits (`denuc` protocol, 3 um), end to end.

    python benchmarks/bench_classification.py [--model default=default --model frozen=runs/x/model.safetensors ...]
        [--joint joint=runs/y/best.safetensors] [--tta 1] [--split test] [--restain none|macenko-cmu1|macenko-tcga|...]
        [--normalise]
        [--datasets brcam2c,crchisto] [--detector NAME] [--out benchmarks/results/classification/classification.json]

For each model bundle and dataset: the model runs on the raw images at their native pixel size (detector,
then classifier with the dataset's own head), and the points are scored per class (F1), as the mean class F1
and as class-agnostic detection F1. Then the same classifier at the ground-truth coordinates (the upper bound
of classification: every point is a true nucleus, so the class is the argmax over the taxonomy alone;
unlabelled ground truth is not scored). A dataset without a head of its own name (e.g. MoNuSeg: no classes) is
run with the bundle's first head and scored for detection only. Bundles are also scored as the detector alone
(``detector_alone``): the recall the "not a nucleus" class costs is ``detector_alone.recall`` minus
``end_to_end.detection.recall``. ``--detector`` replaces the bundle's own detector by another one (e.g. one at
another working resolution), as ``denuc predict --detector`` does (``Pipeline.with_detector``). ``--normalise`` moves
each image (after any re-staining) to the training images' colours first, as ``denuc predict --normalise-stain``
moves a slide (``denuc.colour.StainNormaliser``; there one transfer per slide). Prints a table and
saves every figure as JSON; models already in the output file (same split, radius and re-staining) are kept, so
models can be scored one run at a time; the provenance of the runs that scored them is kept too (``earlier_runs``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, dataset_roots, write_result
from training_colours import training_colours

from denuc.datasets import get_dataset
from denuc.inference.detect import Detector
from denuc.inference.pipeline import Pipeline
from denuc.io.images import read_image, resample
from denuc.metrics.evaluate import Report, evaluate
from denuc.nuclei import UNLABELLED, Nuclei
from denuc.train.joint import JointModel

REFERENCES = {  # published BRCAM2C test figures (3 um), from the dataset notes
    "brcam2c": {"MCSpatNet": {"lymphocyte": 0.6315, "tumour": 0.7856, "stromal": 0.5466, "mean_f1": 0.6546},
                "DeNuC (UNI2-H, 40x)": {"lymphocyte": 0.6973, "tumour": 0.8510, "stromal": 0.6108,
                                        "mean_f1": 0.7197}}}


def summary(report: Report) -> dict:
    out = {"mean_f1": report.mean_f1, "micro_f1": report.micro_f1,
           "classes": {name: c.to_dict() for name, c in report.classes.items()}}
    if report.detection is not None:
        out["detection"] = report.detection.to_dict()
    return out


def at_ground_truth(model: Pipeline, sample, image: np.ndarray) -> np.ndarray:
    """Labels the classifier gives the ground-truth points (argmax over the taxonomy, "not a nucleus" ignored)."""
    work = resample(image, sample.nuclei.mpp / model.classifier.config.mpp)
    gt = sample.nuclei.scaled(work.shape[1] / image.shape[1])
    ((probs, _),) = model.classifier.classify_tiles(work[None], [gt.xy])
    names = np.array([c.name for c in model.classes], dtype=object)
    return names[probs[:, : len(names)].argmax(1)] if len(gt) else np.zeros(0, dtype=object)


def bench(name: str, path: str, split: str, radius_um: float, roots: dict[str, Path], joint: bool = False,
          views: int = 1, restain: Callable[[np.ndarray], np.ndarray] | None = None, detector: str | None = None
          ) -> dict:
    """End-to-end figures of a bundle (and at the ground-truth points), or of a joint model (end to end only).
    ``views``: test-time views of the bundle's detector and classifier (``Pipeline.with_test_time_views``);
    ``restain``: applied to every image first (another lab's colours). ``roots``: the datasets and their folders."""
    result = {"bundle": path, "kind": "joint" if joint else "bundle", "datasets": {}}
    if detector is not None:
        result["detector"] = detector
        other = Detector.from_pretrained(detector, runtime="auto")
    if views != 1:
        result["test_time_views"] = views
    if Path(path).is_file():
        result["bundle_bytes"] = Path(path).stat().st_size
    for dataset in roots:
        own_head = True
        if joint:
            model = JointModel.load(path)
            predict = lambda image, sample: model.predict(image, sample.nuclei.mpp, dataset)  # noqa: E731
        else:
            model = Pipeline.from_pretrained(path)
            own_head = dataset in model.classifier.taxonomies
            model.classifier.use_taxonomy(dataset if own_head else model.classifier.taxonomy)
            if detector is not None:
                model = model.with_detector(other)
            model.with_test_time_views(views)
            predict = lambda image, sample: model.predict(image, mpp=sample.nuclei.mpp)  # noqa: E731
        seconds = 0.0
        end_to_end, upper, alone = [], [], []
        for sample in get_dataset(dataset, roots[dataset]).samples(split):
            image = read_image(sample.image_path)
            image = image if restain is None else restain(image)
            started = time.perf_counter()
            found = predict(image, sample)
            seconds += time.perf_counter() - started
            if not own_head:  # another taxonomy's labels: scored as points only
                found = Nuclei(xy=found.xy, scores=found.scores, mpp=found.mpp)
            end_to_end.append((sample.name, found, sample.nuclei))
            if not joint:
                found_alone = Pipeline(model.detector).predict(image, mpp=sample.nuclei.mpp)
                alone.append((sample.name, found_alone, sample.nuclei))
            if not joint and own_head:
                labels = np.where(sample.nuclei.labels == UNLABELLED, UNLABELLED, at_ground_truth(model, sample, image))
                upper.append((sample.name, replace(sample.nuclei, labels=labels), sample.nuclei))
        e2e = evaluate(end_to_end, radius_um=radius_um)
        entry = {"images": len(end_to_end), "seconds": seconds,
                 "end_to_end": summary(e2e) if own_head else {"detection": e2e.detection.to_dict()}}
        if not joint:
            entry["head"] = model.classifier.taxonomy
            entry["detector_alone"] = evaluate(alone, radius_um=radius_um).detection.to_dict()
            print(f"{'':10s} {dataset:9s} detection recall: detector alone {entry['detector_alone']['recall']:.4f}, "
                  f"after 'not a nucleus' {e2e.detection.recall:.4f}", flush=True)
        per_class = "  ".join(f"{k} {c.f1:.4f}" for k, c in e2e.classes.items()) + "  " if own_head else ""
        print(f"{name:10s} {dataset:9s} end to end: {per_class}detection F1 {e2e.detection.f1:.4f}"
              + (f"  mean F1 {e2e.mean_f1:.4f}" if own_head else ""), flush=True)
        if upper:
            gt = evaluate(upper, radius_um=radius_um)
            entry["ground_truth_points"] = summary(gt)
            per_class = "  ".join(f"{k} {c.f1:.4f}" for k, c in gt.classes.items())
            print(f"{'':10s} {dataset:9s} at GT points: {per_class}  mean F1 {gt.mean_f1:.4f}", flush=True)
        result["datasets"][dataset] = entry
    return result


def restainer(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The re-staining ``--restain`` names: to a slide's colours by Macenko's transfer (its stain vectors and
    maximal concentrations) or by Reinhard's (each image's own tissue statistics in CIELAB mapped to the slide's;
    per image, where bench_stain_shift.py pools a split). The slide: CMU-1 (``-cmu1``) or the TCGA slide
    (``-tcga``, its level 1), both in ../shared/slides."""
    from bench_stain_shift import TCGA_SLIDE, macenko_normaliser, read_slide_region, restain, tissue_statistics

    method, source = name.split("-")
    slide = read_slide_region() if source == "cmu1" else read_slide_region(TCGA_SLIDE, level=1)
    if method == "macenko":
        normaliser = macenko_normaliser([slide])
        return lambda image: normaliser.normalize(image, stains=False)[0]
    target = tissue_statistics([slide])
    return lambda image: restain(image, tissue_statistics([image]), target)


def normalised(restain: Callable[[np.ndarray], np.ndarray] | None, train_roots: dict[str, Path]
               ) -> Callable[[np.ndarray], np.ndarray]:
    """``restain`` (or nothing) followed by ``denuc.colour.StainNormaliser``: Reinhard's transfer of each image to
    the training images' colours (the centre of their tissue statistics), what ``predict --normalise-stain`` does."""
    normaliser = training_colours(train_roots)
    return lambda image: normaliser.apply(image if restain is None else restain(image))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", metavar="NAME=BUNDLE",
                        help="a bundle to score under a name (repeat); default: default=default")
    parser.add_argument("--joint", action="append", default=[], metavar="NAME=FILE",
                        help="a joint end-to-end baseline (denuc.train.joint) to score end to end (repeat)")
    parser.add_argument("--tta", type=int, default=1, help="test-time views of the bundles (1, 2, 4, 8)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--radius-um", type=float, default=3.0)
    parser.add_argument("--restain", default="none",
                        choices=("none", "macenko-cmu1", "reinhard-cmu1", "macenko-tcga", "reinhard-tcga"),
                        help="re-stain every image first to the colours of CMU-1-Small-Region.svs (-cmu1) or of "
                             "the TCGA slide (-tcga): Macenko's stain vectors, or Reinhard's CIELAB statistics of "
                             "each image's tissue (bench_stain_shift.py; needs torchstain and OpenSlide)")
    parser.add_argument("--normalise", action="store_true",
                        help="then move every image to the training images' colours (Reinhard's transfer to the "
                             "centre of the BRCAM2C and CRCHisto train images' CIELAB tissue statistics) before "
                             "the models see it")
    parser.add_argument("--datasets", default="brcam2c,crchisto",
                        help="comma-separated: brcam2c, crchisto, consep, monuseg (../shared/datasets)")
    parser.add_argument("--detector", default=None,
                        help="detect with this detector instead of each bundle's own (bundles only)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more only contend on a busy CPU)")
    parser.add_argument("--root", action="append", default=[], metavar="NAME=ROOT",
                        help="read dataset NAME from ROOT instead of ../shared/datasets/NAME (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS / "classification" / "classification.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = dict(item.split("=", 1) for item in (args.model or ([] if args.joint else ["default=default"])))
    joints = dict(item.split("=", 1) for item in args.joint)
    restain = None if args.restain == "none" else restainer(args.restain)
    roots = dataset_roots(args.datasets.split(","), args.root)
    if args.normalise:
        restain = normalised(restain, dataset_roots(("brcam2c", "crchisto"), args.root))
    results = {"split": args.split, "radius_um": args.radius_um, "protocol": "denuc", "restain": args.restain,
               "normalise": args.normalise,
               "torch": torch.__version__,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "references": REFERENCES,
               "models": {}}
    if args.root:  # recorded where a dataset is not ../shared's copy: figures on other copies are not merged
        results["roots"] = {name: str(root) for name, root in roots.items()}
    if args.out.exists():  # keep the figures of models scored by earlier runs with the same protocol
        earlier = json.loads(args.out.read_text())
        if (all(earlier.get(k, "none") == results[k] for k in ("split", "radius_um", "protocol", "restain"))
                and earlier.get("normalise", False) == results["normalise"]
                and earlier.get("roots") == results.get("roots")):
            results["models"] = earlier["models"]
            # files written before results recorded their provenance have none to keep
            results["earlier_runs"] = earlier.get("earlier_runs", []) + (
                [earlier["provenance"]] if "provenance" in earlier else [])
    for name, path in models.items():
        results["models"][name] = bench(name, path, args.split, args.radius_um, roots, views=args.tta,
                                         restain=restain, detector=args.detector)
    for name, path in joints.items():
        results["models"][name] = bench(name, path, args.split, args.radius_um, roots, joint=True,
                                         restain=restain)
    write_result(args.out, results, models=[*models.values(), *joints.values()],
                 kind="bundle")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
