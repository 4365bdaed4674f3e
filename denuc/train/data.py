"""The images a run learns from and is validated on, at the model's working pixel size.

Each image carries its dataset's name as a field: validation scores are kept per dataset, and each dataset
has its own classifier head (its taxonomy).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import numpy as np

import denuc.datasets as datasets
from denuc.config import ClassifierTrainConfig, DetectorTrainConfig
from denuc.errors import InputError
from denuc.inference.detect import Detector
from denuc.inference.tiling import predict_image
from denuc.io.images import resample
from denuc.nuclei import Nuclei


@dataclass
class SplitImage:
    """One image of a dataset's split, resampled to the working pixel size, with its ground truth."""

    dataset: str  # the dataset's name (``DatasetSpec.name``)
    name: str  # the sample's name within its dataset
    image: np.ndarray  # (H, W, 3) uint8
    nuclei: Nuclei  # every annotated nucleus (labelled or not), in the image's pixels
    scan_mpp: float  # the pixel size the image was scanned at (before the resampling): 20x or 40x thresholds


def load_split(cfg: DetectorTrainConfig | ClassifierTrainConfig, split: str, required: bool = False
               ) -> list[SplitImage]:
    """Every image of ``split`` in every dataset of ``cfg``, at ``cfg.model.mpp``; ``required``: refuse an
    empty split (InputError naming the datasets)."""
    items = []
    for spec in cfg.datasets:
        for sample in datasets.get_dataset(spec.name, spec.root).samples(split):
            image = sample.read_image()  # a file, or an entry of an array file (PanNuke)
            work = resample(image, sample.nuclei.mpp / cfg.model.mpp)
            nuclei = sample.nuclei.scaled(work.shape[1] / image.shape[1])
            items.append(SplitImage(spec.name, sample.name, work, nuclei, sample.nuclei.mpp))
    if required and not items:
        raise InputError(", ".join(spec.root for spec in cfg.datasets) or "--dataset",
                         f"no images in the {split} split")
    return items


def detections(detector: Detector, item: SplitImage) -> Nuclei:
    """The detector's points on ``item`` as inference gives them to users: tile by tile at the score threshold of
    the image's scan, then point NMS across tiles (``predict_image``; the image is already at the detector's pixel
    size, so it is not resampled). They share the ground truth's pixel size, which the resampling to whole pixels
    can move by a hair."""
    found = predict_image(item.image, detector.config.mpp, detector.config,
                          partial(detector.detect_tiles, scan_mpp=item.scan_mpp))
    return replace(found, mpp=item.nuclei.mpp)
