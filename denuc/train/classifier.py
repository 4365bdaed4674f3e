"""Training a nucleus classifier: frozen encoder + head on cached features, LoRA, or full fine-tuning.

What it learns from, per training image (resampled to the working pixel size):
- every *labelled* ground-truth point, with its class; unlabelled points (CRCHisto's nuclei without a class) are
  never a class nor a negative;
- "not a nucleus": the detector's detections farther than ``match_radius_um`` from every ground-truth point,
  labelled or not (``negatives=True``).

Each dataset keeps its own taxonomy and head. Every epoch is scored end to end on the validation splits: the
detector's detections on each validation image are classified and matched to the ground truth
(``denuc.metrics.evaluate``, 3 um); the epoch with the best mean over datasets of the mean class F1 is kept
(``best.safetensors``). Then ``tune_offsets`` chooses, on the same validation images, an offset added to each
head's "not a nucleus" logit (``cfg.offsets`` "nucleus", the default: how readily detections are rejected,
the classifier's counterpart of the detector's threshold sweep) or to every output ("all": also each class's
share of the decisions, which fits the validation split's class mix - only worth it when that mix is the
target's). The run directory holds ``last.pt`` (resumable), ``log.csv`` / ``log.json``, the detections and
(frozen mode) the feature cache, ``best.safetensors`` and ``model.safetensors``: the bundle of the detector
and the selected classifier, offsets folded into its heads.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy.spatial import cKDTree
from torch import nn
from tqdm import tqdm

import denuc.datasets as datasets
import denuc.metrics.evaluate as evaluation
from denuc.config import ClassifierTrainConfig, DatasetSpec
from denuc.inference.classify import Classifier
from denuc.inference.detect import Detector
from denuc.inference.pipeline import Pipeline, model_file
from denuc.train import loop as runs
from denuc.errors import InputError
from denuc.train.loop import lr_factor
from denuc.train.stain import StainTemplates, recolour
from denuc.train.detector import load_split
from denuc.io.atomic import atomic_path
from denuc.nuclei import NOT_A_NUCLEUS, UNLABELLED, Nuclei, NucleusClass


@dataclass
class PointImage:
    """An image at the working pixel size with the points to learn from (or to score on)."""

    name: str  # "<dataset>/<sample>"
    taxonomy: str  # the dataset's name: which head its points go through
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


def detections_of(detector: Detector, items: list[tuple[str, np.ndarray, Nuclei]], cache: Path | None,
                  progress: bool = True) -> dict[str, np.ndarray]:
    """The detector's points on each image (at the working resolution), computed once and cached (unless
    ``cache`` is None)."""
    if cache is not None and cache.exists():
        stored = load_file(str(cache))
        if set(stored) == {name for name, _, _ in items}:
            return {name: xy.numpy().astype(np.float64) for name, xy in stored.items()}
    found = {name: detector.detect_resampled(image)[0] for name, image, _ in tqdm(items, desc="detecting", leave=False,
                                                                               disable=not progress)}
    if cache is None:
        return found
    with atomic_path(cache) as tmp:
        save_file({name: torch.from_numpy(xy.astype(np.float32)) for name, xy in found.items()}, str(tmp))
    return found


def point_images(cfg: ClassifierTrainConfig, detector: Detector, split: str, run_dir: Path | None,
                 progress: bool = True) -> list[PointImage]:
    """Training points (``split`` "train": labelled ground truth + negatives) or validation images (detections).
    The detections are cached in ``run_dir`` (None: not cached)."""
    items = load_split(cfg, split)
    cache = None if run_dir is None else run_dir / f"detections_{split}.safetensors"
    detections = detections_of(detector, items, cache, progress)
    classes = taxonomies(cfg)
    out = []
    for name, image, gt in items:
        taxonomy = name.split("/")[0]
        names = [c.name for c in classes[taxonomy]]
        if split == "train":
            labelled = gt.subset(gt.labels != UNLABELLED)
            targets = np.array([names.index(label) for label in labelled.labels], dtype=np.int64)
            xy = labelled.xy
            if cfg.negatives:
                negatives = false_positives(detections[name], gt, cfg.match_radius_um / cfg.model.mpp)
                xy = np.concatenate([xy, negatives])
                targets = np.concatenate([targets, np.full(len(negatives), len(names), dtype=np.int64)])
        else:
            xy, targets = detections[name], np.full(len(detections[name]), -1, dtype=np.int64)
        out.append(PointImage(name, taxonomy, image, xy.reshape(-1, 2), targets, gt))
    return out


def class_weights(train: list[PointImage], classes: dict[str, list[NucleusClass]], balanced: bool
                  ) -> dict[str, torch.Tensor]:
    """Per taxonomy, the loss weight of each output (classes + "not a nucleus"): inverse frequency, mean 1 over
    the points, when ``balanced``; else all 1."""
    weights = {}
    for taxonomy, names in classes.items():
        counts = np.zeros(len(names) + 1)
        for item in train:
            if item.taxonomy == taxonomy:
                counts += np.bincount(item.targets, minlength=len(names) + 1)
        w = np.ones(len(counts))
        if balanced:
            w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / np.count_nonzero(counts), 0.0)
        weights[taxonomy] = torch.tensor(w, dtype=torch.float32)
    return weights


def point_loss(logits: list[torch.Tensor], targets: list[torch.Tensor], taxonomy: list[str],
               weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Weighted mean cross-entropy over all points of a batch (each image through its own taxonomy's head)."""
    terms, norms = [], []
    for lg, tg, tax in zip(logits, targets, taxonomy):
        w = weights[tax][tg]
        terms.append((F.cross_entropy(lg, tg, reduction="none") * w).sum())
        norms.append(w.sum())
    return torch.stack(terms).sum() / torch.stack(norms).sum().clamp(min=1e-6)


def labelled_crop(item: PointImage, size: int, cfg: ClassifierTrainConfig, rng: np.random.Generator,
                  templates: StainTemplates | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random ``size`` crop (white-padded if the image is smaller), flipped, rotated and colour-augmented as
    ``cfg`` says (``recolour``; re-stained with probability ``cfg.randstainna`` to a template drawn from
    ``templates``), with its points and their targets. Unlike the detector's crop it keeps each point's label."""
    h, w = item.image.shape[:2]
    y0, x0 = rng.integers(0, max(h - size, 0) + 1), rng.integers(0, max(w - size, 0) + 1)
    crop = np.full((size, size, 3), 255, dtype=np.float32)
    part = item.image[y0:y0 + size, x0:x0 + size]
    crop[:part.shape[0], :part.shape[1]] = part
    xy = item.xy - (x0, y0)
    inside = (xy[:, 0] >= -0.5) & (xy[:, 0] <= part.shape[1] - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] <= part.shape[0] - 0.5)
    xy, targets = xy[inside], item.targets[inside]
    if rng.random() < 0.5:  # horizontal flip
        crop, xy = crop[:, ::-1], np.stack([size - 1 - xy[:, 0], xy[:, 1]], 1)
    for _ in range(rng.integers(0, 4)):  # 90-degree rotations (counter-clockwise)
        crop, xy = np.rot90(crop), np.stack([xy[:, 1], size - 1 - xy[:, 0]], 1)
    crop = recolour(crop, cfg, rng, templates)
    return np.ascontiguousarray(crop), xy.reshape(-1, 2), targets


def validation_f1(val: list[PointImage], probs: list[np.ndarray], classes: dict[str, list[NucleusClass]]
                  ) -> dict[str, float]:
    """Mean class F1 per dataset of the classified detections (end to end), and their unweighted mean."""
    per_dataset: dict[str, list] = {}
    for item, p in zip(val, probs):
        names = [c.name for c in classes[item.taxonomy]] + [NOT_A_NUCLEUS]
        labels = np.array([names[i] for i in p.argmax(1)], dtype=object).reshape(-1)
        pred = Nuclei(xy=item.xy, labels=labels, mpp=item.gt.mpp)
        per_dataset.setdefault(item.taxonomy, []).append((item.name, pred, item.gt))
    scores = {ds: evaluation.evaluate(pairs).mean_f1 for ds, pairs in per_dataset.items()}
    scores["mean"] = float(np.mean(list(scores.values())))
    return scores


@torch.inference_mode()
def image_features(classifier: Classifier, items: list[PointImage], progress: bool = True) -> list[torch.Tensor]:
    """The encoder's features at each image's points, one whole image at a time."""
    out = []
    for item in tqdm(items, desc="features", leave=False, disable=not progress):
        image = torch.from_numpy(np.array(item.image)).permute(2, 0, 1)[None].float()
        out.append(classifier.point_features(image, [torch.from_numpy(item.xy)])[0].float())
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


def add_lora(classifier: Classifier, rank: int, alpha: float) -> None:
    """Wrap the encoder in LoRA adapters (peft) on its linear and ungrouped convolution layers; only the
    adapters (and the heads) train. ``merge_lora`` folds them back into plain layers."""
    try:
        from peft import LoraConfig, LoraModel
    except ImportError:
        raise ImportError('mode "lora" needs peft: pip install "denuc[lora]"') from None

    targets = [name for name, m in classifier.encoder.named_modules()
               if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    classifier.encoder = LoraModel(classifier.encoder, config, "default")


def merge_lora(classifier: Classifier) -> Classifier:
    """A copy of a LoRA classifier with the adapters merged into the encoder's weights (to be saved whole)."""
    merged = copy.deepcopy(classifier)
    merged.encoder = merged.encoder.merge_and_unload()
    merged.embed_encoder = True  # the merged weights are no longer those of the encoder's file
    return merged


def train_classifier(cfg: ClassifierTrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
                     epochs_this_run: int | None = None) -> Path:
    """Train (or resume) a classifier in ``run_dir``; returns the bundle ``model.safetensors`` (the detector
    ``cfg.detector`` + the classifier of the best validation epoch)."""
    if cfg.mode == "joint":
        raise ValueError("the joint baseline trains with denuc.train.joint.train_joint")
    run_dir, rng = runs.start(run_dir, cfg)
    classes = taxonomies(cfg)
    classifier = Classifier.create(cfg.model, classes)
    if cfg.mode == "lora":
        add_lora(classifier, cfg.lora_rank, cfg.lora_alpha)
    if cfg.mode != "frozen":
        classifier.embed_encoder = True  # trained weights live in the bundle
    detector = Detector.from_pretrained(cfg.detector)
    if abs(detector.config.mpp - cfg.model.mpp) > 1e-9:
        raise ValueError(f"detector {cfg.detector} works at {detector.config.mpp} um/px, the classifier at "
                         f"{cfg.model.mpp}")

    train = point_images(cfg, detector, "train", run_dir, progress)
    val = point_images(cfg, detector, "val", run_dir, progress)
    weights = class_weights(train, classes, cfg.class_balanced)
    templates = runs.stain_templates(run_dir, [item.image for item in train], cfg.randstainna)
    trainable = classifier.heads.parameters() if cfg.mode == "frozen" else \
        [p for p in classifier.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.mode == "frozen":
        key = {"encoder": cfg.model.to_json(), "detector": cfg.detector, "negatives": cfg.negatives,
               "radius": cfg.match_radius_um, "datasets": [d.name for d in cfg.datasets]}
        train_features = cached_features(classifier, train, run_dir / "features_train.safetensors", key, progress)
        val_features = cached_features(classifier, val, run_dir / "features_val.safetensors", key, progress)
        batches_per_epoch = _frozen_batches(train, cfg.batch_size * 128)
    steps = batches_per_epoch if cfg.mode == "frozen" else cfg.iters_per_epoch
    schedule_cfg = copy.copy(cfg)
    schedule_cfg.iters_per_epoch = steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, schedule_cfg))

    # with ema_decay, an exponential moving average of the weights is what is validated and kept: the epoch-to-epoch
    # swings of a small validation split then pick less of a lucky epoch
    ema = None if cfg.ema_decay is None else runs.weight_average(classifier, cfg.ema_decay)
    modules = {"classifier": classifier} | ({"ema": ema} if ema else {})
    start_epoch, best, history = (runs.resume(run_dir, cfg, modules, optimizer, scheduler, rng)
                                  if resume else (0, -1.0, []))
    runs.write_json(run_dir / "config.json", cfg.to_dict())

    stop = cfg.epochs if epochs_this_run is None else min(cfg.epochs, start_epoch + epochs_this_run)
    for epoch in range(start_epoch, stop):
        started = time.perf_counter()
        # a frozen or LoRA encoder keeps its batch-norm statistics; full fine-tuning updates them
        classifier.train()
        classifier.encoder.train(cfg.mode == "full")
        total = 0.0
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress)
        batches = _frozen_epoch(train, train_features, cfg.batch_size * 128, rng) if cfg.mode == "frozen" else None
        for _ in bar:
            if cfg.mode == "frozen":
                features, targets, taxonomy = next(batches)
                logits = [classifier.heads[t](f) for f, t in zip(features, taxonomy)]
            else:
                picks = rng.integers(0, len(train), cfg.batch_size)
                crops = [labelled_crop(train[i], cfg.crop_size, cfg, rng, templates) for i in picks]
                images = torch.stack([torch.from_numpy(c).permute(2, 0, 1) for c, _, _ in crops])
                taxonomy = [train[i].taxonomy for i in picks]
                targets = [torch.from_numpy(t) for _, _, t in crops]
                points = [torch.from_numpy(xy) for _, xy, _ in crops]
                features = classifier.point_features(images, points)
                logits = [classifier.heads[t](f) for f, t in zip(features, taxonomy)]
            loss = point_loss(logits, targets, taxonomy, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema:
                ema.update_parameters(classifier)
            total += loss.item()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        scored = ema.module if ema else classifier  # what is validated and kept
        scored.eval()
        with torch.inference_mode():
            features = val_features if cfg.mode == "frozen" else image_features(scored, val, progress)
            probs = [scored.heads[item.taxonomy](f).softmax(-1).numpy() for item, f in zip(val, features)]
        val_f1 = validation_f1(val, probs, classes) if val else {"mean": float("nan")}
        row = {"epoch": epoch + 1, "loss": total / steps, "lr": scheduler.get_last_lr()[0],
               "seconds": time.perf_counter() - started, **{f"val_f1_{k}": v for k, v in val_f1.items()}}
        history.append(row)
        if val_f1["mean"] > best or not val:  # without validation images the last epoch is kept
            best = val_f1["mean"]
            chosen = merge_lora(scored) if cfg.mode == "lora" else scored
            Pipeline(detector, copy.deepcopy(chosen)).save(
                run_dir / "best.safetensors", extra_metadata={"epoch": epoch + 1, "val_f1": val_f1,
                                                               "train_config": cfg.to_dict()})
        runs.save_epoch(run_dir, cfg.to_dict(), modules, optimizer, scheduler, rng, epoch, best, history, progress)
    if stop < cfg.epochs:
        return run_dir / "best.safetensors"
    if cfg.offsets != "none":
        tune_offsets(run_dir / "best.safetensors", cfg.datasets, run_dir / "model.safetensors", cfg.offsets,
                     cache_dir=run_dir, progress=progress)
    else:
        shutil.copyfile(run_dir / "best.safetensors", run_dir / "model.safetensors")
    return run_dir / "model.safetensors"


# ---------------------------------------------------------------------------------------------- class offsets

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
    taxonomy = {val[0].taxonomy: classes}
    log_probs = [np.log(np.clip(p, 1e-12, 1.0)) for p in probs]

    def score(offsets: np.ndarray) -> float:
        return validation_f1(val, [lp + offsets for lp in log_probs], taxonomy)["mean"]

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
            last.bias += torch.as_tensor(values, dtype=last.bias.dtype)


_BUNDLE_KEYS = {"format", "denuc_detector", "denuc_classifier", "taxonomies", "encoder_embedded"}


def tune_offsets(bundle: str | Path, specs: list[DatasetSpec], out: str | Path, outputs: str = "nucleus",
                 cache_dir: Path | None = None, progress: bool = True) -> dict[str, dict]:
    """Choose each head's offsets (``best_offsets`` of ``outputs``) on the validation split of the dataset of
    the same name, fold them into the heads and save the bundle to ``out`` (same precision; its other metadata kept, the
    offsets and scores added under "class_offsets"). Heads without such a dataset, or whose dataset has no
    validation images (a warning says so), are left as they are. Validation splits only: test data never
    informs the choice."""
    bundle = model_file(bundle)
    pipeline = Pipeline.from_pretrained(bundle)
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
        probs = [classifier.heads[item.taxonomy](f).softmax(-1).numpy() for item, f in zip(val, features)]
    chosen = {}
    for spec in specs:
        index = [i for i, item in enumerate(val) if item.taxonomy == spec.name]
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


def _frozen_batches(train: list[PointImage], batch_points: int) -> int:
    return max(1, -(-sum(len(item.xy) for item in train) // batch_points))


def _frozen_epoch(train: list[PointImage], features: list[torch.Tensor], batch_points: int,
                  rng: np.random.Generator):
    """Shuffled batches of cached point features: (features per taxonomy, targets, taxonomy names)."""
    taxonomy = np.concatenate([[item.taxonomy] * len(item.xy) for item in train])
    targets = torch.from_numpy(np.concatenate([item.targets for item in train]))
    every = torch.cat(features)
    order = rng.permutation(len(targets))
    for first in range(0, len(order), batch_points):
        index = order[first:first + batch_points]
        names = sorted(set(taxonomy[index]))
        groups = [index[taxonomy[index] == name] for name in names]
        yield [every[g] for g in groups], [targets[g] for g in groups], names
