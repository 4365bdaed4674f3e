"""The points a classifier learns from and is scored on, and the scores.

Training points, per image: every *labelled* ground-truth point with its class (unlabelled points, such as
CRCHisto's nuclei without a class, are never a class nor a negative), and "not a nucleus": the detector's
detections farther than ``match_radius_um`` from every ground-truth point, labelled or not. Validation points:
the detector's detections, classified and matched to the ground truth end to end (``class_f1``). Detections
are the detector's as users get them (``denuc.train.data.detections``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy.spatial import cKDTree
from tqdm import tqdm

import denuc.datasets as datasets
from denuc.config import ClassifierTrainConfig
from denuc.errors import InputError
from denuc.inference.classify import Classifier
from denuc.inference.detect import Detector
from denuc.io.atomic import atomic_path
from denuc.metrics.evaluate import per_dataset_scores
from denuc.nuclei import NOT_A_NUCLEUS, UNLABELLED, Nuclei, NucleusClass
from denuc.train.data import SplitImage, detections, load_split


@dataclass
class PointImage:
    """An image at the working pixel size with the points to learn from (or to score on)."""

    dataset: str  # the dataset's name: which head (taxonomy) its points go through
    name: str  # the sample's name within its dataset
    image: np.ndarray  # (H, W, 3) uint8
    xy: np.ndarray  # (n, 2) training: labelled ground truth + negatives; validation: detections
    targets: np.ndarray  # (n,) class index; len(classes) is "not a nucleus"; validation: unused (-1)
    gt: Nuclei  # the image's ground truth at the working pixel size


def taxonomies(cfg: ClassifierTrainConfig) -> dict[str, list[NucleusClass]]:
    """The class list of each training dataset, by dataset name."""
    found = {spec.name: list(datasets.get_dataset(spec.name, spec.root).classes) for spec in cfg.datasets}
    for spec in cfg.datasets:
        if not found[spec.name]:
            raise InputError(spec.root, "the dataset has no classes (a points dataset lists them in dataset.json's "
                                        "'classes'): it can train a detector, not a classifier")
    return found


def false_positives(detections: np.ndarray, gt: Nuclei, radius_px: float) -> np.ndarray:
    """The detections farther than ``radius_px`` from every ground-truth point (unlabelled ones included:
    an unlabelled point is a nucleus, so a detection on it is no negative)."""
    if len(gt) == 0 or len(detections) == 0:
        return detections
    distance, _ = cKDTree(gt.xy).query(detections, k=1)
    return detections[distance > radius_px]


def detector_key(detector: Detector) -> str:
    """What a detector's points depend on: its settings and weights (a cache written by another is stale)."""
    digest = hashlib.sha256(detector.config.to_json().encode())
    for name, tensor in sorted(detector.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def detections_of(detector: Detector, items: list[SplitImage], cache: Path | None, progress: bool = True
                  ) -> dict[tuple[str, str], np.ndarray]:
    """The detector's points on each image (``denuc.train.data.detections``), by (dataset, name), computed once
    and cached in ``cache`` (None: not cached) for this detector."""
    names = {f"{item.dataset}/{item.name}": (item.dataset, item.name) for item in items}
    key = detector_key(detector)
    if cache is not None and cache.exists():
        with safe_open(str(cache), framework="pt") as f:
            cached_key = (f.metadata() or {}).get("detector")
        stored = load_file(str(cache))
        if cached_key == key and set(stored) == set(names):
            return {names[name]: xy.numpy().astype(np.float64) for name, xy in stored.items()}
    found = {(item.dataset, item.name): detections(detector, item).xy
             for item in tqdm(items, desc="detecting", leave=False, disable=not progress)}
    if cache is not None:
        with atomic_path(cache) as tmp:
            save_file({f"{d}/{n}": torch.from_numpy(xy.astype(np.float32)) for (d, n), xy in found.items()},
                      str(tmp), metadata={"detector": key})
    return found


def point_images(cfg: ClassifierTrainConfig, detector: Detector, split: str, run_dir: Path | None,
                 progress: bool = True) -> list[PointImage]:
    """Training points (``split`` "train": labelled ground truth + negatives) or validation images (detections).
    The detections are cached in ``run_dir`` (None: not cached)."""
    items = load_split(cfg, split, required=split == "train")
    cache = None if run_dir is None else run_dir / f"detections_{split}.safetensors"
    found = detections_of(detector, items, cache, progress)
    classes = taxonomies(cfg)
    out = []
    for item in items:
        names = [c.name for c in classes[item.dataset]]
        gt, detected = item.nuclei, found[item.dataset, item.name]
        if split == "train":
            labelled = gt.subset(gt.labels != UNLABELLED)
            targets = np.array([names.index(label) for label in labelled.labels], dtype=np.int64)
            xy = labelled.xy
            if cfg.negatives:
                negatives = false_positives(detected, gt, cfg.match_radius_um / cfg.model.mpp)
                xy = np.concatenate([xy, negatives])
                targets = np.concatenate([targets, np.full(len(negatives), len(names), dtype=np.int64)])
        else:
            xy, targets = detected, np.full(len(detected), -1, dtype=np.int64)
        out.append(PointImage(item.dataset, item.name, item.image, xy.reshape(-1, 2), targets, gt))
    return out


def points_key(items: list[PointImage]) -> str:
    """A digest of the images' points (what cached features were read at)."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.dataset}/{item.name}:{len(item.xy)}".encode())
        digest.update(np.ascontiguousarray(item.xy, dtype=np.float64).tobytes())
    return digest.hexdigest()


@torch.inference_mode()
def image_features(classifier: Classifier, items: list[PointImage], progress: bool = True) -> list[torch.Tensor]:
    """The encoder's features at each image's points, one whole image at a time, on the CPU (wherever the encoder
    runs)."""
    out = []
    for item in tqdm(items, desc="features", leave=False, disable=not progress):
        image = torch.from_numpy(np.array(item.image)).permute(2, 0, 1)[None].float()
        out.append(classifier.point_features(image, [torch.from_numpy(item.xy)])[0].float().cpu())
    return out


def cached_features(classifier: Classifier, items: list[PointImage], path: Path, key: dict, progress: bool = True
                    ) -> list[torch.Tensor]:
    """``image_features``, read from ``path`` when it was written for the same ``key`` (encoder, points)."""
    if path.exists():
        stored = load_file(str(path))
        if json.loads(bytes(stored.pop("key").tolist()).decode()) == key and len(stored) == len(items):
            return [stored[str(i)].float() for i in range(len(items))]
    features = image_features(classifier, items, progress)
    tensors = {str(i): f.half() for i, f in enumerate(features)}
    tensors["key"] = torch.tensor(list(json.dumps(key, sort_keys=True).encode()), dtype=torch.uint8)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    return features


def classified(val: list[PointImage], scores: list[np.ndarray], classes: dict[str, list[NucleusClass]]
               ) -> Iterator[tuple[str, str, Nuclei, Nuclei]]:
    """(dataset, name, prediction, ground truth) per image: its points labelled with the output of highest score
    (``scores`` (n, classes + 1) per image: probabilities or logits; the last output "not a nucleus")."""
    for item, p in zip(val, scores):
        names = [c.name for c in classes[item.dataset]] + [NOT_A_NUCLEUS]
        labels = np.array([names[i] for i in p.argmax(1)], dtype=object).reshape(-1)
        yield item.dataset, item.name, Nuclei(xy=item.xy, labels=labels, mpp=item.gt.mpp), item.gt


def class_f1(val: list[PointImage], probs: list[np.ndarray], classes: dict[str, list[NucleusClass]]
             ) -> dict[str, float]:
    """Mean class F1 per dataset of the classified detections (end to end), and their unweighted mean."""
    return per_dataset_scores(classified(val, probs, classes), lambda report: report.mean_f1)
