"""Class offsets for a bundle's CoNSeP head chosen by cross-validation on CoNSeP's training images, where the
validation split (2 images, 23 "other" nuclei) is too small to set each class's share of the decisions.

The training source images go into folds (``--folds``; fold = position mod folds, sorted by number). For each fold a
head is trained exactly as the bundle's own (``train-classifier --base BUNDLE --mode frozen --head mlp``, 20 epochs,
best epoch on the validation split, no offsets) on the other folds' images, and classifies the held-out fold's
crops at each detector's points (``--detector``, end to end). From these out-of-fold probabilities, offsets on every
output (``denuc.train.offsets.best_offsets``, "all") are chosen with the first detector's points; their worth is
estimated without scoring what chose them: each fold scored with offsets chosen on the other folds (nested), the mean
class F1 pooled over all held-out images, with and without. Rule: results/consep_reassembled/consep_cv_offsets_rule.txt.

    python benchmarks/consep_cv_offsets.py --root ../shared/datasets/consep --work /tmp/cv \
        --out benchmarks/results/consep_reassembled/consep_cv_offsets.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, write_result

import denuc.datasets as datasets
from denuc.config import ClassifierTrainConfig, DatasetSpec
from denuc.datasets.consep import HELD_OUT_TEST_SOURCES, VAL_SOURCES, source_image
from denuc.inference.detect import Detector
from denuc.inference.pipeline import Pipeline
from denuc.metrics.evaluate import evaluate
from denuc.nuclei import NOT_A_NUCLEUS
from denuc.train.classifier import train_classifier
from denuc.train.data import load_split
from denuc.train.offsets import best_offsets
from denuc.train.points import PointImage, classified, image_features


def link_crops(root: Path, names: list[str], into: Path) -> Path:
    """A CoNSeP copy at ``into`` holding only the crops ``names`` of ``root`` (symbolic links)."""
    for folder, suffix in (("Images", ".jpg"), ("Labels", ".mat")):
        (into / "Train" / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            found = next((root / "Train" / folder).glob(f"{name}.*")) if folder == "Images" else \
                root / "Train" / folder / f"{name}{suffix}"
            target = into / "Train" / folder / found.name
            if not target.exists():
                target.symlink_to(found.resolve())
    return into


def held_out_points(detector: Detector, cfg: ClassifierTrainConfig, root: Path) -> list[PointImage]:
    """The crops of ``root`` at the classifier's pixel size with ``detector``'s points end to end (found at the
    crops' own pixel size, as ``predict`` finds them, then moved to the working pixels)."""
    items = load_split(replace(cfg, datasets=[DatasetSpec("consep", str(root))]), "train")
    samples = {s.name: s for s in datasets.get_dataset("consep", str(root)).samples("train")}
    out = []
    for item in items:
        sample = samples[item.name]
        image = sample.read_image()
        # moved to the working pixels as load_split moves the ground truth
        xy = Pipeline(detector).predict(image, mpp=sample.nuclei.mpp).scaled(item.image.shape[1] / image.shape[1]).xy
        out.append(PointImage("consep", item.name, item.image, xy.reshape(-1, 2),
                              np.full(len(xy), -1, dtype=np.int64), item.nuclei))
    return out


def class_report(points: list[PointImage], log_probs: list[np.ndarray], classes, offsets: np.ndarray) -> dict:
    """Mean class F1 and each class's F1 of the pooled images with ``offsets`` added to the log-probabilities."""
    pairs = classified(points, [lp + offsets for lp in log_probs], {"consep": classes})
    report = evaluate([(name, pred, gt) for _, name, pred, gt in pairs], 3.0)
    return {"mean_f1": report.mean_f1, "classes": {c: s.f1 for c, s in report.classes.items()},
            "detection_recall": report.detection.recall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="the CoNSeP crops (the bundle's head was trained on them)")
    parser.add_argument("--base", default="default-bundle")
    parser.add_argument("--detector", action="append", default=None,
                        help="detectors whose points are classified (repeat; the first chooses; default: precise, "
                             "and the bundle's own as 'bundle')")
    parser.add_argument("--folds", type=int, default=7)
    parser.add_argument("--work", required=True, help="a folder for the fold copies and runs")
    parser.add_argument("--out", default=str(RESULTS / "consep_reassembled" / "consep_cv_offsets.json"))
    args = parser.parse_args()
    root, work = Path(args.root).resolve(), Path(args.work)
    detectors = args.detector or ["precise", "bundle"]
    crops = sorted(p.stem for p in (root / "Train" / "Labels").glob("*.mat"))
    sources = sorted({source_image(n) for n in crops} - set(VAL_SOURCES) - set(HELD_OUT_TEST_SOURCES),
                     key=lambda s: int(s.split("_")[1]))
    fold_of = {s: i % args.folds for i, s in enumerate(sources)}
    val_crops = [n for n in crops if source_image(n) in VAL_SOURCES]
    base = Pipeline.from_pretrained(args.base)
    cfg = ClassifierTrainConfig(mode="frozen", base=args.base, base_head="mlp", offsets="none",
                                model=base.classifier.config)
    found: dict[str, list] = {d: [] for d in detectors}  # per detector: (fold, points, log-probabilities)
    for k in range(args.folds):
        train = [n for n in crops if fold_of.get(source_image(n), -1) not in (-1, k)]
        held = [n for n in crops if fold_of.get(source_image(n), -1) == k]
        fold_root = link_crops(root, train + val_crops, work / f"fold{k}" / "train_root")
        bundle = train_classifier(replace(cfg, datasets=[DatasetSpec("consep", str(fold_root))]),
                                  work / f"fold{k}" / "run", resume=(work / f"fold{k}" / "run" / "last.pt").exists(),
                                  progress=False)
        pipeline = Pipeline.from_pretrained(bundle, taxonomy="consep")
        classifier = pipeline.classifier
        held_root = link_crops(root, held, work / f"fold{k}" / "held_root")
        for name in detectors:
            detector = pipeline.detector if name == "bundle" else Detector.from_pretrained(name)
            points = held_out_points(detector, cfg, held_root)
            with torch.inference_mode():
                log_probs = [classifier.heads["consep"](f).log_softmax(-1).numpy()
                             for f in image_features(classifier, points, progress=False)]
            found[name].append((k, points, log_probs))
        print(f"fold {k}: {len(held)} crops held out, trained on {len(train)}", flush=True)
    classes = base.classifier.taxonomies["consep"]
    zero = np.zeros(len(classes) + 1)

    def pooled(name: str, folds=None) -> tuple[list, list]:
        rows = [r for r in found[name] if folds is None or r[0] in folds]
        return [p for _, ps, _ in rows for p in ps], [lp for _, _, lps in rows for lp in lps]

    def chosen_offsets(folds=None) -> tuple[np.ndarray, float, float]:
        points, log_probs = pooled(chooser, folds)
        return best_offsets(points, [np.exp(lp) for lp in log_probs], classes, "all")

    chooser = detectors[0]
    points, log_probs = pooled(chooser)
    offsets, before, after = chosen_offsets()
    nested_points, nested_log_probs = [], []
    nested_offsets = {}
    for k in range(args.folds):
        chosen, _, _ = chosen_offsets(set(range(args.folds)) - {k})
        nested_offsets[k] = chosen.tolist()
        p, lp = pooled(chooser, {k})
        nested_points += p
        nested_log_probs += [x + chosen for x in lp]
    result = {"base": args.base, "folds": args.folds, "fold_of": fold_of, "chosen_with": chooser,
              "offsets": offsets.tolist(), "classes": [c.name for c in classes] + [NOT_A_NUCLEUS],
              "in_sample": {"before": before, "after": after},
              "nested": {"offsets_per_fold": nested_offsets,
                         "without": class_report(points, log_probs, classes, zero),
                         "with": class_report(nested_points, nested_log_probs, classes, zero)},
              "out_of_fold": {name: {"without": class_report(*pooled(name), classes, zero),
                                     "with_offsets": class_report(*pooled(name), classes, offsets)}
                              for name in detectors}}
    print(json.dumps({k: v for k, v in result.items() if k not in ("fold_of",)}, indent=1))
    write_result(args.out, result, [args.base, *(d for d in detectors if d != "bundle")])


if __name__ == "__main__":
    main()
