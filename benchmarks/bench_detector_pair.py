"""Two detectors timed side by side on the same BRCAM2C test images (two working resolutions, two widths, ...).

    python benchmarks/bench_detector_pair.py MODEL_A MODEL_B [--images 10] [--repeats 3] [--runtime onnx]
        --out benchmarks/results/speed/NAME.json

Each detector gets the images at their native 0.5 um/px and resamples them to its own working resolution, as a
user's call would (so a 0.25 um/px model pays for the upsampling too). PyTorch (or ONNX Runtime with
``--runtime onnx``), the process's default threads;
models alternate within each round; the median round is reported, with seconds per mm^2 of image.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import write_result
from PIL import Image

from denuc.datasets import get_dataset
from denuc.inference.detect import Detector

BRCAM2C = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "brcam2c"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs=2)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runtime", choices=("torch", "onnx"), default="torch")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    samples = list(get_dataset("brcam2c", BRCAM2C).samples("test"))[:args.images]
    mpp = samples[0].nuclei.mpp
    images = [np.asarray(Image.open(s.image_path).convert("RGB")) for s in samples]
    mm2 = sum(im.shape[0] * im.shape[1] for im in images) * (mpp * 1e-3) ** 2
    detectors = {name: Detector.from_pretrained(name, runtime=args.runtime) for name in args.models}
    for detector in detectors.values():
        detector.detect(images[0], mpp=mpp)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in detectors}
    for _ in range(args.repeats):
        for name, detector in detectors.items():
            begin = time.perf_counter()
            for image in images:
                detector.detect(image, mpp=mpp)
            seconds[name].append(time.perf_counter() - begin)
    results = {"images": len(images), "image_mm2": mm2, "input_mpp": mpp, "runtime": args.runtime,
               "torch": torch.__version__,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "models": {}}
    for name, detector in detectors.items():
        median = statistics.median(seconds[name])
        params = sum(p.numel() for p in detector.model.parameters())
        results["models"][name] = {"working_mpp": detector.config.mpp, "backbone": detector.config.backbone,
                                   "params": params, "seconds": seconds[name], "median_s": median,
                                   "s_per_mm2": median / mm2}
        print(f"{name}: {detector.config.backbone} ({params:,} parameters), working {detector.config.mpp} um/px, "
              f"{median:.2f} s for {len(images)} images "
              f"({median / mm2:.2f} s/mm^2; rounds {[round(s, 2) for s in seconds[name]]})")
    a, b = (results["models"][name]["median_s"] for name in args.models)
    results["ratio_b_over_a"] = b / a
    print(f"{args.models[1]} / {args.models[0]}: {b / a:.2f}x")
    write_result(args.out, results, models=args.models)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
