"""Class offsets: a number added to each output of a classifier head, chosen on validation data.

After training, an offset added to a head's "not a nucleus" logit ("nucleus", the default) sets how readily
detections are rejected - the classifier's counterpart of the detector's threshold sweep; offsets on every
output ("all") also set each class's share of the decisions, which fits the validation split's class mix (only
worth it when that mix is the target's). They are chosen to maximise the mean class F1 end to end on the
validation split of each head's dataset and folded into the head's last bias.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

import denuc.datasets as datasets
from denuc.config import ClassifierTrainConfig, DatasetSpec
from denuc.errors import InputError
from denuc.hub import resolve
from denuc.inference.classify import Classifier
from denuc.inference.pipeline import Pipeline
from denuc.nuclei import NucleusClass
from denuc.train.points import PointImage, class_f1, image_features, point_images

OFFSET_OUTPUTS = ("nucleus", "all")
OFFSET_GRID = tuple(np.round(np.arange(-2.0, 2.001, 0.25), 2))
"""Offsets tried for each output, in logits (a factor of e^2 ~ 7.4 either way in the odds)."""


def best_offsets(val: list[PointImage], probs: list[np.ndarray], classes: list[NucleusClass], outputs: str = "nucleus",
                 grid: tuple[float, ...] = OFFSET_GRID, sweeps: int = 3) -> tuple[np.ndarray, float, float]:
    """Offsets for the outputs of one head (its classes, then "not a nucleus") that maximise the mean class F1
    of ``val`` (all of that head's taxonomy) end to end. ``outputs`` "nucleus": only the "not a nucleus" offset
    moves; "all": every output but the first (only differences matter), by coordinate ascent. Values come from
    ``grid``; a change is kept only if it raises the score. Returns (offsets, F1 before, F1 after)."""
    if outputs not in OFFSET_OUTPUTS:
        raise ValueError(f"unknown offsets {outputs!r}; choose from {list(OFFSET_OUTPUTS)}")
    taxonomy = {val[0].dataset: classes}
    log_probs = [np.log(np.clip(p, 1e-12, 1.0)) for p in probs]

    def score(offsets: np.ndarray) -> float:
        return class_f1(val, [lp + offsets for lp in log_probs], taxonomy)["mean"]

    offsets = np.zeros(len(classes) + 1)
    before = best = score(offsets)
    for _ in range(sweeps):
        improved = False
        for k in range(1, len(offsets)) if outputs == "all" else [len(offsets) - 1]:
            for value in grid:
                trial = offsets.copy()
                trial[k] = value
                if (s := score(trial)) > best + 1e-6:
                    best, offsets, improved = s, trial, True
        if not improved:
            break
    return offsets, before, best


def add_offsets(classifier: Classifier, offsets: dict[str, np.ndarray]) -> None:
    """Fold per-output offsets into the bias of each named head's last linear layer."""
    for taxonomy, values in offsets.items():
        last = [m for m in classifier.heads[taxonomy].modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            last.bias += torch.as_tensor(values, dtype=last.bias.dtype, device=last.bias.device)


_BUNDLE_KEYS = {"format", "denuc_detector", "denuc_classifier", "taxonomies", "encoder_embedded"}


def tune_offsets(bundle: str | Path, specs: list[DatasetSpec], out: str | Path, outputs: str = "nucleus",
                 cache_dir: Path | None = None, progress: bool = True, device: str = "cpu") -> dict[str, dict]:
    """Choose each head's offsets (``best_offsets`` of ``outputs``) on the validation split of the dataset of
    the same name, fold them into the heads and save the bundle to ``out`` (same precision; its other metadata kept, the
    offsets and scores added under "class_offsets"). Heads without such a dataset, or whose dataset has no
    validation images (a warning says so), are left as they are. Validation splits only: test data never
    informs the choice. ``device``: where the bundle's networks run."""
    bundle = resolve(bundle, kind="bundle")
    pipeline = Pipeline.from_pretrained(bundle, device=device)
    classifier = pipeline.classifier
    if classifier is None:
        raise InputError(bundle, "a detector-only model has no classes to tune")
    for spec in specs:
        if spec.name not in classifier.taxonomies:
            raise InputError(spec.root, f"dataset {spec.name!r} matches no head of {bundle} "
                                        f"(heads: {sorted(classifier.taxonomies)})")
        found = [c.name for c in datasets.get_dataset(spec.name, spec.root).classes]
        expected = [c.name for c in classifier.taxonomies[spec.name]]
        if found != expected:
            raise InputError(spec.root, f"classes {found} differ from head {spec.name!r}'s {expected}")
    cfg = ClassifierTrainConfig(datasets=list(specs), model=classifier.config)
    val = point_images(cfg, pipeline.detector, "val", cache_dir, progress)
    features = image_features(classifier, val, progress)
    with torch.inference_mode():
        probs = [classifier.heads[item.dataset](f.to(device)).softmax(-1).cpu().numpy()
                 for item, f in zip(val, features)]
    chosen = {}
    for spec in specs:
        index = [i for i, item in enumerate(val) if item.dataset == spec.name]
        if not index:
            warnings.warn(f"{spec.root}: no validation images; head {spec.name!r} keeps its offsets", stacklevel=2)
            continue
        offsets, before, after = best_offsets([val[i] for i in index], [probs[i] for i in index],
                                              classifier.taxonomies[spec.name], outputs)
        chosen[spec.name] = {"outputs": outputs, "offsets": offsets.tolist(), "val_f1_before": before,
                             "val_f1_after": after}
    add_offsets(classifier, {name: np.array(c["offsets"]) for name, c in chosen.items()})
    with safe_open(str(bundle), framework="pt") as f:
        metadata = f.metadata()
        half = f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    extra = {k: json.loads(v) for k, v in metadata.items() if k not in _BUNDLE_KEYS}
    previous = extra.get("class_offsets", {})
    for name, c in chosen.items():  # record the total folded in since training
        if name in previous:
            c["offsets"] = (np.array(previous[name]["offsets"]) + np.array(c["offsets"])).tolist()
    extra["class_offsets"] = previous | chosen
    pipeline.save(out, half=half, extra_metadata=extra)
    return chosen


