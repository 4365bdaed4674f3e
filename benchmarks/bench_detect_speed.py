"""Detection throughput on this CPU at the model's working resolution.

    python benchmarks/bench_detect_speed.py [--model default] [--repeats 3] [--out benchmarks/results/detect_speed.json]

Two inputs, both real H&E at 0.5 um/px: the 30 BRCAM2C test images (about 500 x 500 px each), and a
4000 x 4000 px mosaic of them (16 mm^2). Reports images/s, tiles/s, seconds per mm^2 (median of repeats,
after a warm-up) and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from denuc.datasets import get_dataset
from denuc.engine.detect import Detector, tile_origins
from denuc.io.atomic import write_json
from denuc.io.images import read_image

BRCAM2C = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "brcam2c"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_tiles(detector: Detector, shape: tuple[int, int]) -> int:
    cfg = detector.config
    return len(tile_origins(shape[0], cfg.tile_size, cfg.tile_overlap)) * len(
        tile_origins(shape[1], cfg.tile_size, cfg.tile_overlap))


def time_run(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "detect_speed.json")
    args = parser.parse_args()

    detector = Detector.from_pretrained(args.model)
    mpp = detector.config.mpp
    images = [read_image(s.image_path) for s in get_dataset("brcam2c", BRCAM2C).samples("test")]
    results = {"model": str(args.model), "config": json.loads(detector.config.to_json()),
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "repeats": args.repeats}

    def run_all() -> None:
        for image in images:
            detector.detect(image, mpp=0.5, batch_size=args.batch_size)

    seconds = time_run(run_all, args.repeats)
    area_mm2 = sum(i.shape[0] * i.shape[1] for i in images) * (0.5 * 1e-3) ** 2
    tiles = sum(count_tiles(detector, i.shape[:2]) for i in images)
    results["brcam2c_test_images"] = {"images": len(images), "area_mm2": area_mm2, "seconds": seconds,
                                      "images_per_s": len(images) / seconds, "tiles_per_s": tiles / seconds,
                                      "s_per_mm2": seconds / area_mm2}

    rows = [np.concatenate([images[(r * 8 + c) % len(images)][:500, :500] for c in range(8)], axis=1)
            for r in range(8)]
    mosaic = np.ascontiguousarray(np.concatenate(rows, axis=0))
    seconds = time_run(lambda: detector.detect(mosaic, mpp=0.5, batch_size=args.batch_size), args.repeats)
    area_mm2 = mosaic.shape[0] * mosaic.shape[1] * (0.5 * 1e-3) ** 2
    tiles = count_tiles(detector, mosaic.shape[:2])
    results["mosaic_4000px"] = {"area_mm2": area_mm2, "tiles": tiles, "seconds": seconds,
                                "tiles_per_s": tiles / seconds, "s_per_mm2": seconds / area_mm2}
    results["peak_rss_mb"] = peak_rss_mb()
    for key in ("brcam2c_test_images", "mosaic_4000px"):
        r = results[key]
        print(f"{key:20s} {r['seconds']:.2f} s  {r['tiles_per_s']:.1f} tiles/s  {r['s_per_mm2']:.3f} s/mm^2")
    print(f"working resolution {mpp} um/px, {results['threads']} threads, peak RSS {results['peak_rss_mb']:.0f} MB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, results)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
