"""Training a point detector: its loss, its validation and its run (``denuc.train.loop.fit``).

One run trains on the train splits of one or more datasets (resampled to the model's working pixel size),
checkpoints every epoch (``last.pt``, resumable exactly), keeps the epoch with the best validation detection F1
(``best.safetensors``), then ``tune_thresholds`` chooses the score threshold and NMS radius on the validation
splits. One epoch is ``iters_per_epoch`` batches of random crops (not a pass over the images), each batch drawn
with a seed of its own (``CropBatches``), so that data-loading workers draw the same batches as the training
process would; on a GPU the forward pass runs in bfloat16 (``torch.autocast``), the loss in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from denuc.config import FINE_SCAN_MPP, DetectorTrainConfig
from denuc.errors import InputError
from denuc.inference.detect import Detector
from denuc.inference.nms import point_nms
from denuc.metrics.crowding import CROWDED_RADIUS_UM, crowded_nuclei
from denuc.metrics.evaluate import per_dataset_scores
from denuc.models.detector import PointDetector
from denuc.nuclei import Nuclei
from denuc.train import loop
from denuc.train.augment import random_crop, stain_templates
from denuc.train.data import SplitImage, detections, load_split

# ---------------------------------------------------------------------------------------------- loss

def match_anchors(points: torch.Tensor, probs: torch.Tensor, gt: torch.Tensor, distance_weight: float,
                  topk: int, one_to_one: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each ground-truth point takes its ``topk`` cheapest predictions, cost = w x distance - probability.

    An anchor claimed by several ground-truth points goes to the one it is cheapest for; the others go without it.
    ``one_to_one``: instead, every ground-truth point gets ``topk`` anchors of its own, at the least total cost (the
    Hungarian assignment), so that of two nuclei closer than the anchor grid neither is left without a positive.
    Returns (anchor indices, ground-truth indices) of the matched pairs.
    """
    if len(gt) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=points.device)
        return empty, empty
    cost = distance_weight * torch.cdist(gt, points) - probs.unsqueeze(0)  # (m, A)
    if one_to_one:
        # among each point's few cheapest anchors (enough for its neighbours' claims), each anchor to one point
        near = torch.unique(cost.topk(min(topk + 8, points.shape[0]), dim=1, largest=False).indices)
        rows, cols = linear_sum_assignment(cost[:, near].repeat_interleave(topk, dim=0).cpu().numpy())
        return near[torch.as_tensor(cols, device=near.device)], torch.as_tensor(rows, device=near.device) // topk
    k = min(topk, points.shape[0])
    top_cost, top_anchor = cost.topk(k, dim=1, largest=False)
    device = points.device
    anchors = top_anchor.reshape(-1)
    gts, costs = torch.arange(len(gt), device=device).repeat_interleave(k), top_cost.reshape(-1)
    order = torch.argsort(costs, stable=True)  # cheapest claim first, so it wins the anchor
    anchors, gts = anchors[order], gts[order]
    # keep the first (cheapest) claim on every anchor
    _, inverse = torch.unique(anchors, return_inverse=True)
    claims = torch.arange(len(anchors), device=device)
    first_claim = torch.full((int(inverse.max()) + 1,), len(anchors), dtype=torch.long, device=device)
    first_claim.scatter_reduce_(0, inverse, claims, reduce="amin")
    first = claims == first_claim[inverse]
    return anchors[first], gts[first]


def detection_loss(logits: torch.Tensor, points: torch.Tensor, targets: list[torch.Tensor],
                   cfg: DetectorTrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy over all anchors (background weight ``background_weight``) + weighted L2 on matched points."""
    labels = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
    coord_terms, n_gt = [], 0
    with torch.no_grad():
        probs = logits.softmax(-1)[..., 1]
    for b, gt in enumerate(targets):
        anchors, gts = match_anchors(points[b].detach(), probs[b], gt, cfg.match_distance_weight, cfg.match_topk,
                                     cfg.match_one_to_one)
        labels[b, anchors] = 1
        coord_terms.append(((points[b, anchors] - gt[gts]) ** 2).sum())
        n_gt += len(gt)
    weight = torch.tensor([cfg.background_weight, 1.0], device=logits.device)
    cls_loss = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), weight=weight)
    coord_loss = cfg.coord_loss_weight * torch.stack(coord_terms).sum() / max(n_gt, 1)
    return cls_loss + coord_loss, {"cls": cls_loss.item(), "coord": coord_loss.item()}


# ---------------------------------------------------------------------------------------------- run

def detection_f1(pairs, radius_um: float = 3.0) -> dict[str, float]:
    """Detection F1 per dataset of ``(dataset, name, pred, gt)`` pairs, and their unweighted mean."""
    return per_dataset_scores(pairs, lambda report: report.detection.f1, radius_um)


def validate(detector: Detector, items: list[SplitImage], radius_um: float = 3.0) -> dict[str, float]:
    """Detection F1 per dataset of the detector's points (as inference gives them) on images already at the
    working resolution, and their unweighted mean."""
    return detection_f1(((item.dataset, item.name, detections(detector, item), item.nuclei) for item in items),
                        radius_um)


def initial_model(cfg: DetectorTrainConfig) -> PointDetector:
    """The network a run starts from: random, with an ImageNet backbone (``backbone_weights``), or a trained
    denuc detector (``init``, for fine-tuning), whose architecture must be the run's (the working pixel size may
    differ: the network is convolutional, fine-tuning adapts it to nuclei of another size in pixels), except that
    a stride-4 head may start from a stride-8 detector: all its weights but the two stride-4 layers it adds."""
    model = PointDetector(cfg.model, imagenet_weights=cfg.backbone_weights)
    if cfg.init is not None:
        start = Detector.from_pretrained(cfg.init).model
        ours, theirs = cfg.model, dataclasses.replace(start.config, mpp=cfg.model.mpp)
        finer = theirs.head_stride == 8 and ours.head_stride == 4
        if ours.architecture() != (dataclasses.replace(theirs, head_stride=4) if finer else theirs).architecture():
            raise InputError(cfg.init, f"is a {theirs.architecture()} detector; the run asks for {ours.architecture()}")
        missing, _ = model.load_state_dict(start.state_dict(), strict=not finer)
        assert all(key.startswith(("head.fine_lateral.", "head.fine_conv.")) for key in missing), missing
    return model


def sampling_weights(train: list[SplitImage], sampling: str) -> np.ndarray | None:
    """The probability of drawing each training image: None for "image" (every image alike, the default);
    for "dataset", every dataset alike and, within one, an image in proportion to its area, so that a dataset
    of many small crops (CoNSeP) weighs no more than one of a few large images."""
    if sampling == "image":
        return None
    names = np.array([item.dataset for item in train])
    area = np.array([item.image.shape[0] * item.image.shape[1] for item in train], dtype=np.float64)
    weights = np.zeros(len(train))
    for name in np.unique(names):
        weights[names == name] = area[names == name] / area[names == name].sum()
    return weights / weights.sum()


class CropBatches(IterableDataset):
    """Batches of random training crops and their points, batch i of an epoch drawn with ``seeds[i]`` (set before
    each epoch): the same batches in the same order whether the training process draws them or ``DataLoader``
    workers do (worker w of n draws batches w, w + n, ...; the loader takes them round-robin)."""

    def __init__(self, train: list[SplitImage], cfg: DetectorTrainConfig, templates, seeds: np.ndarray) -> None:
        self.train, self.cfg, self.templates, self.seeds = train, cfg, templates, seeds
        self.weights = sampling_weights(train, cfg.sampling)
        self.crowded = ([item.nuclei.xy[crowded_nuclei(item.nuclei.xy, CROWDED_RADIUS_UM / item.nuclei.mpp)]
                         for item in train] if cfg.crowded_crops > 0 else [])  # read only when crops use them

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        worker = get_worker_info()
        seeds = self.seeds if worker is None else self.seeds[worker.id::worker.num_workers]
        for seed in seeds:
            yield self.batch(np.random.default_rng(seed))

    def batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cfg, train = self.cfg, self.train
        picks = (rng.integers(0, len(train), cfg.batch_size) if self.weights is None
                 else rng.choice(len(train), size=cfg.batch_size, p=self.weights))
        crops, targets = [], []
        for index in picks:
            focus = None
            if cfg.crowded_crops > 0 and rng.random() < cfg.crowded_crops and len(self.crowded[index]):
                focus = self.crowded[index][rng.integers(len(self.crowded[index]))]
            crop, xy = random_crop(train[index], cfg.crop_size, cfg, rng, self.templates, focus)
            crops.append(torch.from_numpy(crop).permute(2, 0, 1))
            targets.append(torch.from_numpy(xy).float())
        return torch.stack(crops).contiguous(memory_format=torch.channels_last), targets


def train_detector(cfg: DetectorTrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
                   epochs_this_run: int | None = None, overwrite: bool = False, device: str = "cpu",
                   workers: int = 0) -> Path:
    """Train (or resume) a detector in ``run_dir``; returns the path of the best model (``best.safetensors``).

    ``epochs_this_run`` stops after that many epochs (for time-boxed jobs); ``resume=True`` continues;
    ``overwrite=True`` starts again in a folder that holds a trained run (refused otherwise). ``device``: where
    the network trains and is validated ("cuda": in bfloat16 autocast); ``workers``: processes that draw the
    crops (0: the training process), the same crops either way.
    """
    run_dir, rng = loop.start(run_dir, cfg, resume, overwrite)
    where = torch.device(device)
    bfloat16 = where.type == "cuda" and torch.cuda.is_bf16_supported()
    # channels-last weights, as the crops are fed (and as ``Detector`` runs them): faster on CPU
    model = initial_model(cfg).to(where, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train = load_split(cfg, "train", required=True)
    templates = stain_templates(run_dir, [item.image for item in train], cfg.randstainna)
    val = load_split(cfg, "val")

    data = CropBatches(train, cfg, templates, np.zeros(0, np.int64))

    def batches() -> DataLoader:
        # the seeds come from the run's generator, which the checkpoint saves: a resumed run draws the same crops
        data.seeds = rng.integers(0, 2**63, size=cfg.iters_per_epoch)
        return DataLoader(data, batch_size=None, num_workers=workers, pin_memory=where.type == "cuda")

    def step(batch: tuple[torch.Tensor, list[torch.Tensor]]) -> dict[str, torch.Tensor | float]:
        images, targets = batch
        with torch.autocast(where.type, dtype=torch.bfloat16, enabled=bfloat16):
            logits, points = model(images.to(where, non_blocking=True))
        loss, parts = detection_loss(logits.float(), points.float(), [t.to(where) for t in targets], cfg)
        return {"loss": loss, **parts}

    def save_best(network: PointDetector, epoch: int, scores: dict) -> None:
        Detector(network, where).save(run_dir / "best.safetensors", {"epoch": epoch, "val_f1": scores})

    loop.fit(cfg, run_dir, rng, model, optimizer, batches=batches, step=step,
             validate=(lambda network: validate(Detector(network, where), val)) if val else None,
             save_best=save_best, resume=resume, progress=progress, epochs_this_run=epochs_this_run)
    return run_dir / "best.safetensors"


def holds_for_every_dataset(row: dict, rows: list[dict], tolerance: float) -> bool:
    """Whether ``row`` of a sweep (per-dataset F1 and "mean") is within ``tolerance`` of every dataset's best."""
    datasets = [k for k in row if k not in ("score_threshold", "score_threshold_40x", "nms_radius_um", "mean")
                and isinstance(row[k], float)]
    return all(row[d] >= max(r[d] for r in rows) - tolerance for d in datasets)


def rule_threshold(f1: dict[str, dict[float, float]], best: dict[str, float], tolerance: float) -> float:
    """The threshold the shipping rule picks for a group of datasets, from ``f1[dataset][threshold]``: among the
    thresholds that keep every dataset within ``tolerance`` of its own ``best`` F1, the one with the best mean F1
    of the group; if none does, the best mean."""
    thresholds = list(next(iter(f1.values())))
    return max(thresholds, key=lambda t: (all(f1[d][t] >= best[d] - tolerance for d in f1),
                                          float(np.mean([f1[d][t] for d in f1]))))


def scan_group(scan_mpps: list[float]) -> str:
    """"40x" for a dataset most of whose images were scanned finer than ``FINE_SCAN_MPP``, else "20x"."""
    return "40x" if np.mean([mpp < FINE_SCAN_MPP for mpp in scan_mpps]) > 0.5 else "20x"


def scan_groups(items: list[SplitImage]) -> dict[str, list[str]]:
    """The datasets of ``items`` by ``scan_group``: "20x" and "40x"; a group without datasets is left out."""
    groups: dict[str, list[str]] = {}
    for name in dict.fromkeys(item.dataset for item in items):
        groups.setdefault(scan_group([item.scan_mpp for item in items if item.dataset == name]), []).append(name)
    return groups


def tune_thresholds(model_path: str | Path, cfg: DetectorTrainConfig, out_path: str | Path,
                    thresholds: tuple[float, ...] = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5),
                    nms_radii_um: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0), tolerance: float = 0.01,
                    device: str = "cpu") -> dict | None:
    """Choose the score thresholds and NMS radius on the validation splits; save the model with them to
    ``out_path`` and return the chosen row of the sweep.

    The rule: among the settings that keep every dataset's validation F1 within ``tolerance`` (1 point) of that
    dataset's own best, the one with the best mean; if none does, the best mean. A threshold that suits one
    dataset's scanner and stain can cost another several points; this keeps thresholds that hold for all. The
    datasets scanned at 20x and those at 40x each get their threshold by this rule (``score_threshold`` and
    ``score_threshold_40x``: 40x scans, shrunk to the working grid, score their nuclei lower), at one NMS radius.
    Validation splits only: test data never informs a choice. Without validation images the model keeps its
    configured settings (returns None). ``device``: where the network runs for the sweep."""
    val = load_split(cfg, "val")
    detector = Detector.from_pretrained(model_path, device=device)
    if not val:
        detector.save(out_path, {"chosen": None})
        return None
    lowest = min(thresholds)
    detector.with_settings(score_threshold=lowest, score_threshold_40x=None, nms_radius_um=0.0)  # NMS: the sweep's
    raw = [(item, *detector.detect_resampled(item.image)) for item in val]

    def kept(threshold: float, radius_um: float):
        for item, xy, scores in raw:
            above = scores > threshold
            keep = point_nms(xy[above], scores[above], radius_um / cfg.model.mpp)
            yield item.dataset, item.name, Nuclei(xy=xy[above][keep], scores=scores[above][keep],
                                                  mpp=item.nuclei.mpp), item.nuclei

    results = [{"score_threshold": threshold, "nms_radius_um": radius, **detection_f1(kept(threshold, radius))}
               for threshold in thresholds for radius in nms_radii_um]
    groups = scan_groups(val)
    names = [name for group in groups.values() for name in group]
    best = {name: max(row[name] for row in results) for name in names}
    candidates = []
    for radius in nms_radii_um:
        rows = {row["score_threshold"]: row for row in results if row["nms_radius_um"] == radius}
        picks = {g: rule_threshold({d: {t: rows[t][d] for t in rows} for d in group}, best, tolerance)
                 for g, group in groups.items()}
        row = {"score_threshold": picks.get("20x", picks.get("40x")),
               "score_threshold_40x": picks["40x"] if len(picks) == 2 else None, "nms_radius_um": radius}
        row |= {d: rows[picks[g]][d] for g, group in groups.items() for d in group}
        candidates.append(row | {"mean": float(np.mean([row[d] for d in names]))})
    chosen = max(candidates, key=lambda r: (holds_for_every_dataset(r, results, tolerance), r["mean"]))
    chosen["within_tolerance_of_each_best"] = holds_for_every_dataset(chosen, results, tolerance)
    detector.with_settings(score_threshold=chosen["score_threshold"],
                           score_threshold_40x=chosen["score_threshold_40x"], nms_radius_um=chosen["nms_radius_um"])
    detector.save(out_path, {"validation_sweep": results, "chosen": chosen})
    return chosen
