"""Pack the train splits' images of annotated datasets (labels dropped) into small tiled JPEG TIFFs that state
their pixel size, for `denuc pretrain --images` on a machine the datasets are not on (issue 32's GPU run: the
device machine takes 64 MiB). Validation and test images are never packed.

    python benchmarks/pack_pretraining_images.py --dataset brcam2c=../shared/datasets/brcam2c \
        --dataset crchisto=... --dataset monuseg=... --dataset consep=/work/consep_full --out .gpu/images

Each image keeps its pixels (JPEG quality 90, 256-px tiles) and gets its dataset's pixel size (the reader's)
as TIFF resolution, so `denuc pretrain` reads it at the right scale without --mpp; a list of what was packed
(dataset, split, source file, pixel size) is written beside them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import tifffile

from denuc.datasets import get_dataset
from denuc.io.images import read_image


def pack(name: str, root: str, out: Path) -> list[dict]:
    packed = []
    for sample in get_dataset(name, root).samples("train"):
        if sample.image_index is not None:
            raise SystemExit(f"{name}: images kept in an array file; not packed")
        mpp = sample.nuclei.mpp
        path = out / f"{name}_{sample.name}.tif"
        tifffile.imwrite(path, read_image(sample.image_path), tile=(256, 256), photometric="rgb",
                         compression="jpeg", compressionargs={"level": 90},
                         resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
        packed.append({"dataset": name, "split": "train", "source": str(sample.image_path), "mpp": mpp,
                       "file": path.name})
    return packed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append", required=True, metavar="NAME=ROOT")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    packed = [row for spec in args.dataset for row in pack(*spec.split("=", 1), args.out)]
    (args.out / "packed.json").write_text(json.dumps(packed, indent=1))
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"{len(packed)} images, {size / 2**20:.1f} MiB in {args.out}")


if __name__ == "__main__":
    main()
