"""Small patches: what a bundle loses when each image is cut into patches and every patch is predicted alone.

    python benchmarks/bench_patch_size.py [--model default] [--split val] [--size 128 --size 256]
        [--reflect 32] [--out benchmarks/results/patch_size/patch_size.json]

Public datasets are often distributed as small patches (PanNuke: 256 px at 0.25 um/px, which is 128 px at the
models' 0.5 um/px), so a model scored there sees no tissue beyond each patch. Each image of ``--split`` is cut
into non-overlapping square patches of ``--size`` working pixels (``--size`` x 0.5 um; the rest of the image is
not used) and each patch is scored against the ground truth inside it (`denuc` protocol, 3 um; counts pooled
over patches). Conditions, on the same patches:
  whole       the whole image predicted once, points restricted to each patch: the same scoring, full context
  patch       each patch predicted alone: what a user with small patches gets
  reflect M   each patch reflect-padded by M working pixels on every side, predicted, points in the padding
              dropped: mirrored context instead of none
A nucleus that a patch edge cuts is seen whole in `whole` and in part in `patch`, while the ground truth (made
on whole images) has one centre for it: part of the `patch` loss is this cut, which patches annotated as patches
do not have.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from bench_classification import summary
from common import RESULTS, dataset_roots, write_result

from denuc.datasets import get_dataset
from denuc.inference.pipeline import Pipeline
from denuc.io.images import read_image
from denuc.metrics.evaluate import evaluate
from denuc.nuclei import Nuclei


def in_patch(nuclei: Nuclei, x0: int, y0: int, side: int) -> Nuclei:
    """The nuclei inside the square patch at (x0, y0), in the patch's pixels."""
    x, y = nuclei.xy[:, 0] - x0, nuclei.xy[:, 1] - y0
    keep = (x >= -0.5) & (x < side - 0.5) & (y >= -0.5) & (y < side - 0.5)
    kept = nuclei.subset(keep)
    return replace(kept, xy=kept.xy - [x0, y0], image_size=(side, side))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--split", default="val")
    parser.add_argument("--size", type=int, action="append", help="patch side in working pixels (repeat)")
    parser.add_argument("--reflect", type=int, action="append", help="reflected margin in working pixels (repeat)")
    parser.add_argument("--runtime", default="onnx", choices=("torch", "onnx"))
    parser.add_argument("--out", type=Path, default=RESULTS / "patch_size" / "patch_size.json")
    args = parser.parse_args()
    sizes, margins = args.size or [128, 256], args.reflect or [32]

    results = {"model": args.model, "split": args.split, "radius_um": 3.0, "protocol": "denuc",
               "runtime": args.runtime, "torch": torch.__version__,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "datasets": {}}
    for name, root in dataset_roots(("brcam2c", "crchisto")).items():
        model = Pipeline.from_pretrained(args.model, taxonomy=name, runtime=args.runtime)
        samples = list(get_dataset(name, root).samples(args.split))
        images = [read_image(sample.image_path) for sample in samples]
        wholes = [model.predict(image, mpp=sample.nuclei.mpp) for sample, image in zip(samples, images)]
        results["datasets"][name] = {}
        for size in sizes:
            started = time.perf_counter()
            conditions: dict[str, list] = {"whole": [], "patch": [], **{f"reflect {m}": [] for m in margins}}
            for sample, image, whole in zip(samples, images, wholes):
                mpp = sample.nuclei.mpp
                side = int(round(size * model.mpp / mpp))  # in the image's own pixels
                for y0 in range(0, image.shape[0] - side + 1, side):
                    for x0 in range(0, image.shape[1] - side + 1, side):
                        key, patch = f"{sample.name}@{x0},{y0}", image[y0:y0 + side, x0:x0 + side]
                        gt = in_patch(sample.nuclei, x0, y0, side)
                        conditions["whole"].append((key, in_patch(whole, x0, y0, side), gt))
                        conditions["patch"].append((key, model.predict(patch, mpp=mpp), gt))
                        for m in margins:
                            pad = int(round(m * model.mpp / mpp))
                            padded = np.pad(patch, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
                            found = in_patch(model.predict(padded, mpp=mpp), pad, pad, side)
                            conditions[f"reflect {m}"].append((key, found, gt))
            rows = {}
            for condition, pairs in conditions.items():
                report = evaluate(pairs, radius_um=3.0)
                rows[condition] = {"patches": len(pairs), **summary(report)}
                det = report.detection
                print(f"{name:9s} {size:4d} px {condition:10s} ({len(pairs)} patches): detection P {det.precision:.3f} "
                      f"R {det.recall:.3f} F1 {det.f1:.3f}  mean class F1 {report.mean_f1:.3f}", flush=True)
            rows["seconds"] = time.perf_counter() - started  # the patches' predictions (whole images: before)
            results["datasets"][name][f"{size}px"] = rows
    write_result(args.out, results, models=[args.model], kind="bundle")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
