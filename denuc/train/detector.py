"""Training a point detector: a plain loop in the style of torchvision's detection references.

One run trains on the train splits of one or more datasets (resampled to the model's working pixel size),
checkpoints every epoch (``last.pt``, resumable exactly), keeps the epoch with the best validation detection F1
(``best.safetensors``), then chooses the score threshold and NMS radius on the validation splits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from denuc.config import DetectorTrainConfig
import denuc.datasets as datasets
from denuc.train import loop as runs
from denuc.inference.detect import Detector
from denuc.inference.nms import point_nms
from denuc.train.loop import lr_factor
from denuc.train.stain import StainTemplates, recolour
from denuc.errors import InputError
import denuc.metrics.evaluate as evaluation
from denuc.io.images import read_image, resample
from denuc.models.detector import PointDetector
from denuc.nuclei import Nuclei


@dataclass
class TrainImage:
    """A training image at the model's pixel size with its nucleus centres (all of them, labelled or not)."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    xy: np.ndarray  # (n, 2) float64


def load_split(config: DetectorTrainConfig, split: str) -> list[tuple[str, np.ndarray, Nuclei]]:
    """(name, image at working mpp, nuclei at working mpp) for every image of ``split`` in every dataset."""
    items = []
    for spec in config.datasets:
        for sample in datasets.get_dataset(spec.name, spec.root).samples(split):
            image = read_image(sample.image_path)
            factor = sample.nuclei.mpp / config.model.mpp
            work = resample(image, factor)
            nuclei = sample.nuclei.scaled(work.shape[1] / image.shape[1])
            items.append((f"{spec.name}/{sample.name}", work, nuclei))
    return items


# ---------------------------------------------------------------------------------------------- augmentation

def random_crop(item: TrainImage, size: int, cfg: DetectorTrainConfig, rng: np.random.Generator,
                templates: StainTemplates | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A random ``size`` x ``size`` crop, scale-jittered, flipped, rotated and colour-jittered, with its points;
    re-stained first with probability ``cfg.randstainna`` to a template drawn from ``templates``."""
    scale = rng.uniform(1 - cfg.scale_jitter, 1 + cfg.scale_jitter)
    h, w = item.image.shape[:2]
    src = min(int(round(size / scale)), h, w)
    y0, x0 = rng.integers(0, h - src + 1), rng.integers(0, w - src + 1)
    crop = item.image[y0:y0 + src, x0:x0 + src]
    f = size / src
    crop = resample(crop, f) if src != size else crop
    xy = (item.xy - (x0, y0) + 0.5) * f - 0.5
    xy = xy[(xy[:, 0] >= -0.5) & (xy[:, 0] <= size - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] <= size - 0.5)]
    crop = crop.astype(np.float32)
    if rng.random() < 0.5:  # horizontal flip
        crop, xy = crop[:, ::-1], np.stack([size - 1 - xy[:, 0], xy[:, 1]], 1)
    for _ in range(rng.integers(0, 4)):  # 90-degree rotations (counter-clockwise)
        crop, xy = np.rot90(crop), np.stack([xy[:, 1], size - 1 - xy[:, 0]], 1)
    crop = recolour(crop, cfg, rng, templates)
    return np.ascontiguousarray(crop), xy.reshape(-1, 2)


# ---------------------------------------------------------------------------------------------- loss

def match_anchors(points: torch.Tensor, probs: torch.Tensor, gt: torch.Tensor, distance_weight: float,
                  topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each ground-truth point takes its ``topk`` cheapest predictions, cost = w x distance - probability.

    An anchor claimed by several ground-truth points goes to the one it is cheapest for.
    Returns (anchor indices, ground-truth indices) of the matched pairs.
    """
    if len(gt) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=points.device)
        return empty, empty
    cost = distance_weight * torch.cdist(gt, points) - probs.unsqueeze(0)  # (m, A)
    k = min(topk, points.shape[0])
    top_cost, top_anchor = cost.topk(k, dim=1, largest=False)
    anchors, gts, costs = top_anchor.reshape(-1), torch.arange(len(gt)).repeat_interleave(k), top_cost.reshape(-1)
    order = torch.argsort(costs, stable=True)  # cheapest claim first, so it wins the anchor
    anchors, gts = anchors[order], gts[order]
    # keep the first (cheapest) claim on every anchor
    _, inverse = torch.unique(anchors, return_inverse=True)
    first_claim = torch.full((int(inverse.max()) + 1,), len(anchors), dtype=torch.long)
    first_claim.scatter_reduce_(0, inverse, torch.arange(len(anchors)), reduce="amin")
    first = torch.arange(len(anchors)) == first_claim[inverse]
    return anchors[first], gts[first]


def detection_loss(logits: torch.Tensor, points: torch.Tensor, targets: list[torch.Tensor],
                   cfg: DetectorTrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy over all anchors (background weight ``background_weight``) + weighted L2 on matched points."""
    labels = torch.zeros(logits.shape[:2], dtype=torch.long)
    coord_terms, n_gt = [], 0
    with torch.no_grad():
        probs = logits.softmax(-1)[..., 1]
    for b, gt in enumerate(targets):
        anchors, gts = match_anchors(points[b].detach(), probs[b], gt, cfg.match_distance_weight, cfg.match_topk)
        labels[b, anchors] = 1
        coord_terms.append(((points[b, anchors] - gt[gts]) ** 2).sum())
        n_gt += len(gt)
    weight = torch.tensor([cfg.background_weight, 1.0])
    cls_loss = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), weight=weight)
    coord_loss = cfg.coord_loss_weight * torch.stack(coord_terms).sum() / max(n_gt, 1)
    return cls_loss + coord_loss, {"cls": cls_loss.item(), "coord": coord_loss.item()}


# ---------------------------------------------------------------------------------------------- loop

def validate(detector: Detector, items: list[tuple[str, np.ndarray, Nuclei]], radius_um: float = 3.0
             ) -> dict[str, float]:
    """Detection F1 per dataset on images already at the working resolution, and their unweighted mean."""
    per_dataset: dict[str, list] = {}
    for name, image, gt in items:
        xy, scores = detector.detect_resampled(image)
        keep = point_nms(xy, scores, detector.config.nms_radius_um / detector.config.mpp)
        pred = Nuclei(xy=xy[keep], scores=scores[keep], mpp=gt.mpp)
        per_dataset.setdefault(name.split("/")[0], []).append((name, pred, gt))
    scores = {ds: evaluation.evaluate(pairs, radius_um=radius_um).detection.f1 for ds, pairs in per_dataset.items()}
    scores["mean"] = float(np.mean(list(scores.values())))
    return scores


def initial_model(cfg: DetectorTrainConfig) -> PointDetector:
    """The network a run starts from: random, with an ImageNet backbone (``backbone_weights``), or a trained
    denuc detector (``init``, for fine-tuning), whose architecture must be the run's."""
    model = PointDetector(cfg.model, imagenet_weights=cfg.backbone_weights)
    if cfg.init is not None:
        start = Detector.from_pretrained(cfg.init).model
        ours, theirs = cfg.model, start.config
        if ours.architecture() != theirs.architecture():
            raise InputError(cfg.init, f"is a {theirs.architecture()} detector; the run asks for {ours.architecture()}")
        model.load_state_dict(start.state_dict())
    return model


def train_detector(cfg: DetectorTrainConfig, run_dir: str | Path, resume: bool = False,
                   progress: bool = True, epochs_this_run: int | None = None) -> Path:
    """Train (or resume) a detector in ``run_dir``; returns the path of the best model (``best.safetensors``).

    ``epochs_this_run`` stops after that many epochs (for time-boxed jobs); ``resume=True`` continues.
    """
    run_dir, rng = runs.start(run_dir, cfg)
    model = initial_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    modules: dict[str, torch.nn.Module] = {"model": model}
    if cfg.ema_decay is not None:  # validation and the saved models use the running average of the weights
        modules["ema"] = runs.weight_average(model, cfg.ema_decay)
    start_epoch, best, history = (runs.resume(run_dir, cfg, modules, optimizer, scheduler, rng)
                                  if resume else (0, -1.0, []))
    runs.write_json(run_dir / "config.json", cfg.to_dict())

    train = [TrainImage(name, image, nuclei.xy) for name, image, nuclei in load_split(cfg, "train")]
    templates = runs.stain_templates(run_dir, [item.image for item in train], cfg.randstainna)
    val = load_split(cfg, "val")
    detector = Detector(modules["ema"].module if "ema" in modules else model)
    stop = cfg.epochs if epochs_this_run is None else min(cfg.epochs, start_epoch + epochs_this_run)
    for epoch in range(start_epoch, stop):
        model.train()
        started = time.perf_counter()
        sums = {"loss": 0.0, "cls": 0.0, "coord": 0.0}
        bar = tqdm(range(cfg.iters_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress)
        for _ in bar:
            crops, targets = [], []
            for index in rng.integers(0, len(train), cfg.batch_size):
                crop, xy = random_crop(train[index], cfg.crop_size, cfg, rng, templates)
                crops.append(torch.from_numpy(crop).permute(2, 0, 1))
                targets.append(torch.from_numpy(xy).float())
            images = torch.stack(crops).contiguous(memory_format=torch.channels_last)
            logits, points = model(images)
            loss, parts = detection_loss(logits, points, targets, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if "ema" in modules:
                modules["ema"].update_parameters(model)
            sums["loss"] += loss.item()
            sums["cls"] += parts["cls"]
            sums["coord"] += parts["coord"]
            bar.set_postfix(loss=f"{loss.item():.4f}", cls=f"{parts['cls']:.4f}", coord=f"{parts['coord']:.4f}")
        detector.model.eval()
        val_f1 = validate(detector, val) if val else {"mean": float("nan")}
        row = {"epoch": epoch + 1, **{k: v / cfg.iters_per_epoch for k, v in sums.items()},
               "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - started,
               **{f"val_f1_{k}": v for k, v in val_f1.items()}}
        history.append(row)
        if val_f1["mean"] > best or not val:
            best = val_f1["mean"]
            detector.save(run_dir / "best.safetensors", {"epoch": epoch + 1, "val_f1": val_f1})
        runs.save_epoch(run_dir, cfg.to_dict(), modules, optimizer, scheduler, rng, epoch, best, history, progress)
    return run_dir / "best.safetensors"


def tune_thresholds(model_path: str | Path, cfg: DetectorTrainConfig, out_path: str | Path,
                    thresholds: tuple[float, ...] = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5),
                    nms_radii_um: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0)) -> dict:
    """Choose the score threshold and NMS radius that maximise mean validation detection F1; save the model
    with them to ``out_path``. Validation splits only: test data never informs a choice. Without validation
    images the model keeps its configured settings."""
    val = load_split(cfg, "val")
    detector = Detector.from_pretrained(model_path)
    if not val:
        detector.save(out_path, {"chosen": None})
        return {"score_threshold": detector.config.score_threshold, "nms_radius_um": detector.config.nms_radius_um}
    lowest = min(thresholds)
    detector.with_settings(score_threshold=lowest, nms_radius_um=0.0)  # the sweep applies its own NMS
    raw = [(name, *detector.detect_resampled(image), gt) for name, image, gt in val]
    results = []
    for threshold in thresholds:
        for radius in nms_radii_um:
            per_dataset: dict[str, list] = {}
            for name, xy, scores, gt in raw:
                above = scores > threshold
                keep = point_nms(xy[above], scores[above], radius / cfg.model.mpp)
                pred = Nuclei(xy=xy[above][keep], scores=scores[above][keep], mpp=gt.mpp)
                per_dataset.setdefault(name.split("/")[0], []).append((name, pred, gt))
            f1 = {ds: evaluation.evaluate(pairs).detection.f1 for ds, pairs in per_dataset.items()}
            results.append({"score_threshold": threshold, "nms_radius_um": radius, **f1,
                            "mean": float(np.mean(list(f1.values())))})
    chosen = max(results, key=lambda r: r["mean"])
    detector.with_settings(score_threshold=chosen["score_threshold"], nms_radius_um=chosen["nms_radius_um"])
    detector.save(out_path, {"validation_sweep": results, "chosen": chosen})
    return chosen
