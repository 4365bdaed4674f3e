"""Time denuc.outlines on one 1000x1000 image: clip_outlines, rasterise and measure, against scikit-image.

Two inputs: 3,000 synthetic nuclei (jittered ellipses of 2-9 px semi-axes at random places, overlapping one another
and running past the image edge, on a random RGB image), and the first MoNuSeg images of the shared data (their
annotated outlines, on the real image) when present. The scikit-image references the figures are checked against
(same values, tests/test_outlines.py) are timed too: ``skimage.draw.polygon`` once per nucleus, and
``regionprops`` with the same measurements read for every nucleus (once: it is slow). Each step is timed
``--repeats`` times: the median wall-clock time, and the least CPU time of the process, which other programs on a
busy machine disturb less (all of it is single-threaded numpy). Writes
benchmarks/results/outlines/measure_speed.json (``--out``).

Usage: python benchmarks/bench_outline_measures.py [--nuclei 3000] [--monuseg-images 3] [--repeats 7] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
from common import RESULTS, write_result
from skimage.draw import polygon as skimage_polygon
from skimage.measure import regionprops

from denuc.nuclei import Nuclei
from denuc.outlines import clip_outlines, measure, rasterise

SIZE = (1000, 1000)
SHARED = Path(os.environ.get("DENUC_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def synthetic(n: int, seed: int = 0) -> tuple[Nuclei, np.ndarray]:
    rng = np.random.default_rng(seed)
    width, height = SIZE
    xy = rng.uniform([-0.5, -0.5], [width - 0.5, height - 0.5], (n, 2))
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    outlines = []
    for x, y in xy:
        a, b = rng.uniform(2, 9, 2)
        angle, radius = rng.uniform(0, np.pi), 1 + rng.uniform(-0.2, 0.2, len(t))
        u, v = a * radius * np.cos(t), b * radius * np.sin(t)
        outlines.append(np.c_[x + np.cos(angle) * u - np.sin(angle) * v, y + np.sin(angle) * u + np.cos(angle) * v])
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Nuclei(xy, outlines=outlines, image_size=SIZE, mpp=0.25), image


def seconds(run, repeats: int) -> dict[str, float]:
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"wall_median": float(np.median(wall)), "cpu_min": float(np.min(cpu))}


def skimage_polygons(nuclei: Nuclei) -> None:
    width, height = nuclei.image_size
    inst_map = np.zeros((height, width), np.int32)
    for i, outline in enumerate(nuclei.outlines):
        if outline is not None:
            rows, cols = skimage_polygon(outline[:, 1], outline[:, 0], (height, width))
            inst_map[rows, cols] = i + 1


def skimage_regionprops(inst_map: np.ndarray, intensity: np.ndarray) -> None:
    for region in regionprops(inst_map, intensity_image=intensity):
        (region.area, region.perimeter, region.equivalent_diameter_area, region.eccentricity, region.solidity,
         region.axis_major_length, region.axis_minor_length, math.degrees(region.orientation), region.intensity_mean)


def time_case(name: str, nuclei: Nuclei, image: np.ndarray, repeats: int) -> dict:
    clipped = clip_outlines(nuclei)
    inst_map = rasterise(clipped)
    intensity = image[..., 0].astype(np.float64)  # any float image: regionprops' intensity mean costs the same
    case = {
        "case": name, "nuclei": len(nuclei), "image_size": list(nuclei.image_size),
        "nuclei_with_pixels": int(len(np.unique(inst_map)) - 1), "pixels_in_nuclei": int((inst_map > 0).sum()),
        "seconds": {
            "clip_outlines": seconds(lambda: clip_outlines(nuclei), repeats),
            "rasterise": seconds(lambda: rasterise(clipped), repeats),
            "measure": seconds(lambda: measure(clipped, image, inst_map=inst_map), repeats),
            "skimage_draw_polygon_per_nucleus": seconds(lambda: skimage_polygons(clipped), repeats),
            "skimage_regionprops_per_nucleus": seconds(lambda: skimage_regionprops(inst_map, intensity), 1),
        },
    }
    steps = case["seconds"]
    steps["denuc_total"] = {key: sum(steps[step][key] for step in ("clip_outlines", "rasterise", "measure"))
                            for key in ("wall_median", "cpu_min")}
    print(f"{name}: {len(nuclei)} nuclei; ms (wall median / cpu min): "
          + ", ".join(f"{k} {v['wall_median'] * 1000:.1f} / {v['cpu_min'] * 1000:.1f}" for k, v in steps.items()))
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nuclei", type=int, default=3000)
    parser.add_argument("--monuseg-images", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "outlines" / "measure_speed.json")
    args = parser.parse_args()
    cases = [time_case("synthetic", *synthetic(args.nuclei), args.repeats)]
    root = SHARED / "datasets" / "monuseg"
    if args.monuseg_images and root.exists():
        from denuc.datasets import get_dataset
        from denuc.io.images import read_image

        dataset = get_dataset("MoNuSeg", root)
        for name in dataset.sample_names("train")[:args.monuseg_images]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a degenerate outline's warning: it is measured as NaN here
                sample = dataset.sample(name)
            cases.append(time_case(f"monuseg {name}", sample.nuclei, read_image(sample.image_path), args.repeats))
    write_result(args.out, {"cpu_count": os.cpu_count(), "load_average_1min_at_start": os.getloadavg()[0],
                            "cases": cases})


if __name__ == "__main__":
    main()
