"""Detection throughput on this CPU at the model's working resolution, for several detectors side by side.

    python benchmarks/bench_detect_speed.py [--model default --model fast] [--runtime torch --runtime onnx]
        [--repeats 3] [--out benchmarks/results/speed/detect_speed.json]

Two inputs, both real H&E at 0.5 um/px: the 30 BRCAM2C test images (about 500 x 500 px each), and a
4000 x 4000 px mosaic of 250 px crops of them (4 mm^2). Every (model, runtime) pair runs once per round, in
turn, after a warm-up round, so load from other processes falls on all alike; the median round is reported, as
images/s,
tiles/s and seconds per mm^2. Peak resident memory is the whole process's (all pairs loaded at once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, write_result

from denuc.config import RUNTIMES
from denuc.datasets import get_dataset
from denuc.inference.detect import Detector
from denuc.inference.tiling import tile_origins
from denuc.io.images import read_image

BRCAM2C = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "brcam2c"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_tiles(detector: Detector, shape: tuple[int, int]) -> int:
    cfg = detector.config
    return len(tile_origins(shape[0], cfg.tile_size, cfg.tile_overlap)) * len(
        tile_origins(shape[1], cfg.tile_size, cfg.tile_overlap))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="shipped name or file; repeat (default: default, fast)")
    parser.add_argument("--runtime", action="append", choices=RUNTIMES, help="repeat (default: torch, onnx)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "speed" / "detect_speed.json")
    args = parser.parse_args()

    pairs = [(m, r) for m in args.model or ["default", "fast"] for r in args.runtime or list(RUNTIMES)]
    detectors = {(model, runtime): Detector.from_pretrained(model, runtime=runtime) for model, runtime in pairs}
    images = [read_image(s.image_path) for s in get_dataset("brcam2c", BRCAM2C).samples("test")]
    # 16 x 16 crops of 250 px (the smallest test image is 328 px)
    rows = [np.concatenate([images[(r * 16 + c) % len(images)][:250, :250] for c in range(16)], axis=1)
            for r in range(16)]
    mosaic = np.ascontiguousarray(np.concatenate(rows, axis=0))
    inputs = {"brcam2c_test_images": images, "mosaic_4000px": [mosaic]}

    times: dict[tuple[str, str, str], list[float]] = {}
    for round_index in range(args.repeats + 1):  # round 0 is the warm-up
        for pair, detector in detectors.items():
            for key, batch in inputs.items():
                started = time.perf_counter()
                for image in batch:
                    detector.detect(image, mpp=0.5, batch_size=args.batch_size)
                if round_index:
                    times.setdefault((*pair, key), []).append(time.perf_counter() - started)

    runs = []
    for (model, runtime), detector in detectors.items():
        run = {"model": model, "runtime": runtime, "config": json.loads(detector.config.to_json())}
        for key, batch in inputs.items():
            seconds = statistics.median(times[model, runtime, key])
            area_mm2 = sum(i.shape[0] * i.shape[1] for i in batch) * (0.5 * 1e-3) ** 2
            tiles = sum(count_tiles(detector, i.shape[:2]) for i in batch)
            run[key] = {"images": len(batch), "area_mm2": area_mm2, "tiles": tiles, "seconds": seconds,
                        "rounds_s": times[model, runtime, key], "images_per_s": len(batch) / seconds,
                        "tiles_per_s": tiles / seconds, "s_per_mm2": seconds / area_mm2}
            print(f"{model:10s} {runtime:6s} {key:20s} {seconds:6.2f} s  {len(batch) / seconds:6.2f} images/s  "
                  f"{tiles / seconds:6.1f} tiles/s  {seconds / area_mm2:.3f} s/mm^2")
        runs.append(run)
    results = {"runs": runs, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "repeats": args.repeats,
               "load_average_at_end": os.getloadavg(), "peak_rss_mb": peak_rss_mb()}
    print(f"{results['threads']} threads, peak RSS {results['peak_rss_mb']:.0f} MB (all detectors loaded)")
    write_result(args.out, results, models=sorted({model for model, _ in pairs}))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
