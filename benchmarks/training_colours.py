"""The shipped models' training colours: the centre of the tissue CIELAB statistics of the BRCAM2C and CRCHisto
train images (``denuc.colour.StainNormaliser.fit``), what ``denuc predict --normalise-stain`` moves slides to.
``denuc.hub`` records the printed values for the models trained on those images; a test checks they agree.

    python benchmarks/training_colours.py [--out benchmarks/results/classification/training_colours.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, dataset_roots, write_result

from denuc.colour import StainNormaliser
from denuc.datasets import get_dataset
from denuc.io.images import read_image


def training_colours(roots: dict[str, Path] | None = None) -> StainNormaliser:
    """The BRCAM2C and CRCHisto train images' colours (``roots``: their folders, default ../shared's)."""
    roots = dataset_roots(("brcam2c", "crchisto")) if roots is None else roots
    return StainNormaliser.fit([read_image(sample.image_path) for name, root in roots.items()
                                for sample in get_dataset(name, root).samples("train")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "classification" / "training_colours.json")
    args = parser.parse_args()
    colours = training_colours()
    print(json.dumps(colours.to_dict()))
    write_result(args.out, {"images": "BRCAM2C train + CRCHisto train", **colours.to_dict()}, [])


if __name__ == "__main__":
    main()
