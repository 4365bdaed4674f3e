"""How much the typical nucleus size varies between images of one dataset, from the annotated outlines: the floor
under any pixel-size estimate read off nucleus size (docs/pixel_size.md, Limits).

    python benchmarks/nucleus_size_spread.py

Per image (CoNSeP: per source image, its crops pooled), the median equivalent diameter (um) of the annotated
nuclei at the dataset's stated pixel size; then their spread over the images of each dataset.
"""

from __future__ import annotations

import warnings

import numpy as np
from common import RESULTS, write_result

from denuc.datasets import get_dataset
from denuc.datasets.consep import source_image

DATASETS = RESULTS.parents[2] / "shared" / "datasets"




def main() -> None:
    warnings.simplefilter("ignore", UserWarning)  # MoNuSeg's known degenerate outlines, missing pixel size
    out = {}
    for name in ("consep", "monuseg"):
        dataset = get_dataset(name, DATASETS / name)
        per_image: dict[str, list[np.ndarray]] = {}
        for split in ("train", "val", "test"):
            for sample_name in dataset.sample_names(split):
                areas = np.bincount(dataset.instance_map(sample_name).ravel())[1:]
                diameters = np.sqrt(4 * areas[areas > 0] / np.pi) * dataset.sample(sample_name).nuclei.mpp
                key = source_image(sample_name) if name == "consep" else sample_name
                per_image.setdefault(key, []).append(diameters)
        medians = np.array([np.median(np.concatenate(parts)) for parts in per_image.values()])
        out[name] = {"images": len(medians), "median_diameter_um": dict(zip(per_image, medians.round(3).tolist())),
                     "mean_um": float(medians.mean()), "cv": float(medians.std() / medians.mean()),
                     "within_15pct_of_dataset_median": float(np.mean(np.abs(medians / np.median(medians) - 1) <= 0.15))}
        print(name, {k: v for k, v in out[name].items() if k != "median_diameter_um"})
    write_result(RESULTS / "mpp" / "nucleus_size_spread.json", out)


if __name__ == "__main__":
    main()
