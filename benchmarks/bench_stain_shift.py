"""Stain shift: detection F1 when each image is re-stained to another lab's colours, side by side with the originals.

    python benchmarks/bench_stain_shift.py [--model default] [--split val] [--runtime onnx]
                                           [--out benchmarks/results/stain_shift/stain_shift.json]

A proxy for slides from a lab the model never saw: every image of ``--split`` is re-stained by Reinhard's
colour transfer (per-channel mean and standard deviation of its tissue pixels in CIELAB, L < 90, matched to a
target's) to (a) the other dataset's train split and (b) ../shared/slides/CMU-1-Small-Region.svs (Carnegie
Mellon, another scanner and lab), then detected at the model's own threshold and NMS radius. Reports detection
precision / recall / F1 per dataset and target (`denuc` protocol, 3 um). Re-staining keeps the nuclei where they
are, so the ground truth is unchanged. The CIELAB conversion is denuc's own (``denuc.train.stain``, the one
RandStainNA training uses; within 1e-4 of scikit-image's). Because a model trained with ``--randstainna`` has
seen Reinhard transfers, each target is also reached by a second, different transfer: Macenko's stain-vector
normalisation (torchstain, numpy backend; each image's own H and E vectors estimated and replaced by the
target's). Needs the `bench` extra (torchstain) and OpenSlide.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
from pathlib import Path

import numpy as np
import openslide
import torch
import torchstain
from common import RESULTS, dataset_roots, write_result

from denuc.colour import lab_to_rgb, rgb_to_lab
from denuc.colour import tissue_statistics as lab_statistics
from denuc.datasets import get_dataset
from denuc.inference.detect import Detector
from denuc.io.images import read_image
from denuc.metrics.evaluate import evaluate

DATASETS = dataset_roots(("brcam2c", "crchisto"))  # the 20x datasets: the other's train split is a target

SLIDE = Path(__file__).resolve().parents[2] / "shared" / "slides" / "CMU-1-Small-Region.svs"
TCGA_SLIDE = SLIDE.with_name("TCGA-CR-7395-01A-01-TS1.svs")
TRAIN_IMAGES_FOR_STATISTICS = 30


def tissue_statistics(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of L, a, b over the tissue pixels (L < 90: not white background) of all
    ``images`` together."""
    # float64: summing millions of float32 pixels loses the second decimal of the spread
    return lab_statistics(np.concatenate([rgb_to_lab(image).reshape(-1, 3) for image in images]).astype(np.float64))


def restain(image: np.ndarray, source: tuple[np.ndarray, np.ndarray], target: tuple[np.ndarray, np.ndarray]
            ) -> np.ndarray:
    """Reinhard colour transfer of ``image`` (whose tissue statistics are ``source``) to ``target``'s."""
    lab = (rgb_to_lab(image) - source[0]) / source[1] * target[1] + target[0]
    return lab_to_rgb(lab).round().astype(np.uint8)


def macenko_normaliser(images: list[np.ndarray]) -> "torchstain.normalizers.HENormalizer":
    """Macenko's normaliser (torchstain, numpy backend) fitted to the stain vectors of ``images`` together;
    its ``normalize(image, stains=False)[0]`` re-stains an RGB image to them."""
    normaliser = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    normaliser.fit(np.concatenate([image.reshape(-1, 3) for image in images])[:, None])
    return normaliser


def read_slide_region(path: Path = SLIDE, level: int = 0) -> np.ndarray:
    """The whole of one level of a small slide as RGB: CMU-1-Small-Region.svs (level 0: 2220 x 2967) by default,
    or TCGA_SLIDE (level 1: 2221 x 1783)."""
    slide = openslide.OpenSlide(path)
    return np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--split", default="val")
    parser.add_argument("--runtime", default="onnx", choices=("torch", "onnx"))
    parser.add_argument("--out", type=Path, default=RESULTS / "stain_shift" / "stain_shift.json")
    args = parser.parse_args()

    detector = Detector.from_pretrained(args.model, runtime=args.runtime)
    target_images = {}
    for name, root in DATASETS.items():
        train = list(get_dataset(name, root).samples("train"))[:TRAIN_IMAGES_FOR_STATISTICS]
        target_images[f"{name} train"] = [read_image(s.image_path) for s in train]
    target_images[SLIDE.stem] = [read_slide_region()]
    targets = {k: tissue_statistics(images) for k, images in target_images.items()}
    # Macenko: each target's stain vectors and maximal concentrations
    stain_matrices = {k: macenko_normaliser(images) for k, images in target_images.items()}

    results = {"model": str(args.model), "config": json.loads(detector.config.to_json()), "split": args.split,
               "runtime": args.runtime, "radius_um": 3.0, "protocol": "denuc", "torch": torch.__version__,
               "torchstain": importlib.metadata.version("torchstain"),  # its __version__ lags its releases
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
               "target_statistics": {k: {"mean_lab": m.tolist(), "std_lab": s.tolist()}
                                     for k, (m, s) in targets.items()},
               "target_stains": {k: {"stain_vectors_rgb_od": n.HERef.tolist(), "max_concentrations": n.maxCRef.tolist()}
                                 for k, n in stain_matrices.items()},
               "datasets": {}}
    shifted = {"reinhard": [], "macenko": []}
    for name, root in DATASETS.items():
        samples = list(get_dataset(name, root).samples(args.split))
        images = [read_image(s.image_path) for s in samples]
        own = tissue_statistics(images)  # the split's own colours: one Reinhard transfer for all its images
        conditions = {"original": lambda image: image}
        for target in (t for t in targets if not t.startswith(name)):
            conditions[target] = lambda image, t=target: restain(image, own, targets[t])
            # Macenko estimates each image's own stain vectors: another family of transfer than Reinhard's
            conditions[f"macenko -> {target}"] = (
                lambda image, t=target: stain_matrices[t].normalize(image, stains=False)[0])
        rows = {}
        for condition, transform in conditions.items():
            pairs = [(s.name, detector.detect(transform(image), mpp=s.nuclei.mpp), s.nuclei)
                     for s, image in zip(samples, images)]
            det = evaluate(pairs, radius_um=3.0).detection
            rows[condition] = {"images": len(pairs), "precision": det.precision, "recall": det.recall, "f1": det.f1}
            if condition != "original":
                shifted["macenko" if condition.startswith("macenko") else "reinhard"].append(det.f1)
            print(f"{name} {args.split} -> {condition}: P {det.precision:.3f} R {det.recall:.3f} F1 {det.f1:.3f} "
                  f"({det.f1 - rows['original']['f1']:+.3f})", flush=True)
        results["datasets"][name] = rows
    results["mean_f1_restained"] = {k: float(np.mean(v)) for k, v in shifted.items()}
    print("mean F1 over the re-stained conditions:", {k: round(v, 4) for k, v in results["mean_f1_restained"].items()})
    write_result(args.out, results, models=[args.model])
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
