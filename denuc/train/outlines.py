"""Training of the outline head (``denuc.models.outline``) on datasets with instance outlines (CoNSeP, MoNuSeg).

The target of a nucleus is its star-convex outline measured on the dataset's own instance map, at its native pixel
size: along each ray from the patch centre, the distance at which the ray leaves the nucleus (``star_radii``).
Patches are centred on the ground-truth centroid moved by up to ``centre_jitter_um`` (detected points are not
centroids), the target measured from that moved centre; flips and transposes permute the rays. Nuclei cut by the
image border (a ray reaches the border inside the nucleus) or whose centre lies outside their own outline are not
trained on. Validation: the mean star IoU (``star_iou``) of the predicted and true outlines at the true centres,
per dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import denuc.datasets as datasets
from denuc.config import OutlineTrainConfig
from denuc.errors import InputError
from denuc.hub import OUTLINE_FORMAT, stamp
from denuc.inference.detect import Detector
from denuc.io.atomic import atomic_path
from denuc.io.images import resample
from denuc.models.outline import OutlineHead, dihedral_ray_order, ray_angles
from denuc.train.loop import fit, start

STEP = 0.5  # ray sampling step, in native pixels
CROP = 128  # training crops, working pixels
CROPS_PER_STEP = 8


@dataclass
class OutlineImage:
    """One image with instance outlines: the working-resolution image and, at native resolution, its instance
    map; ``centres`` are the usable nuclei's centroids in working pixels, ``ids`` their instance ids."""

    dataset: str
    name: str
    image: torch.Tensor  # (3, H, W) float 0-255, working resolution
    inst_map: np.ndarray  # (H0, W0) int32, native resolution
    factor: float  # working pixels per native pixel
    centres: np.ndarray  # (n, 2) working pixels
    ids: np.ndarray  # (n,) instance ids


def star_radii(inst_map: np.ndarray, ids: np.ndarray, centres: np.ndarray, rays: int, max_radius: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Distance (native pixels) from each centre (n, 2) along ``ray_angles(rays)`` to where the ray leaves instance
    ``ids`` of ``inst_map``, halfway between the last sample inside and the first outside; and whether the nucleus
    is whole: its centre inside it, and no ray reaching the image border (or ``max_radius``) while inside."""
    h, w = inst_map.shape
    angles = ray_angles(rays)
    t = np.arange(1, int(np.ceil(max_radius / STEP)) + 1) * STEP  # (T,)
    x = centres[:, None, None, 0] + t[None, None, :] * np.cos(angles)[None, :, None]  # (n, rays, T)
    y = centres[:, None, None, 1] + t[None, None, :] * np.sin(angles)[None, :, None]
    col, row = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    inside_image = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    labels = np.where(inside_image, inst_map[np.clip(row, 0, h - 1), np.clip(col, 0, w - 1)], -1)
    inside = labels == ids[:, None, None]
    leaves = ~inside
    first_out = np.where(leaves.any(axis=2), leaves.argmax(axis=2), len(t))  # index of the first sample outside
    radii = np.where(first_out > 0, t[np.minimum(first_out, len(t) - 1)] - STEP / 2, STEP / 2)
    # whole: the sample that left was inside the image (not the border), and the ray left before max_radius
    left_at = np.minimum(first_out, len(t) - 1)
    left_in_image = np.take_along_axis(inside_image, left_at[..., None], axis=2)[..., 0] & (first_out < len(t))
    c_col, c_row = np.rint(centres[:, 0]).astype(np.int64), np.rint(centres[:, 1]).astype(np.int64)
    in_bounds = (c_col >= 0) & (c_col < w) & (c_row >= 0) & (c_row < h)
    centre_label = np.where(in_bounds, inst_map[np.clip(c_row, 0, h - 1), np.clip(c_col, 0, w - 1)], -1)
    whole = (centre_label == ids) & left_in_image.all(axis=1)
    return radii, whole


def star_iou(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """IoU of two star-convex outlines about the same centre, from their radii (n, rays): each ray's sector
    contributes r^2 to the area, so the overlap is sum(min^2) / sum(max^2) (exact as the rays grow dense)."""
    lib = torch if torch.is_tensor(a) else np
    return (lib.minimum(a, b) ** 2).sum(-1) / (lib.maximum(a, b) ** 2).sum(-1)


def load_outline_images(cfg: OutlineTrainConfig, split: str) -> list[OutlineImage]:
    """Every image of ``split`` in every dataset of ``cfg`` that has instance maps."""
    items = []
    for spec in cfg.datasets:
        dataset = datasets.get_dataset(spec.name, spec.root)
        for name in dataset.sample_names(split):
            inst_map = dataset.instance_map(name)
            if inst_map is None:
                raise InputError(spec.root, f"{spec.name} has no instance outlines to train an outline head on")
            sample = dataset.sample(name)
            image = sample.read_image()
            factor = sample.nuclei.mpp / cfg.model.mpp
            work = resample(image, factor)
            factor = work.shape[1] / image.shape[1]
            ids = np.arange(1, len(sample.nuclei) + 1)
            max_radius = cfg.model.reach / factor
            _, whole = star_radii(inst_map, ids, sample.nuclei.xy, cfg.model.rays, max_radius)
            centres = (sample.nuclei.xy[whole] + 0.5) * factor - 0.5
            pixels = torch.from_numpy(np.array(work)).permute(2, 0, 1).float()
            items.append(OutlineImage(spec.name, name, pixels, inst_map, factor, centres, ids[whole]))
    return [item for item in items if len(item.ids)]


def targets(item: OutlineImage, index: np.ndarray, centres: np.ndarray, rays: int, reach: float) -> np.ndarray:
    """Radii (working pixels) of nuclei ``index`` of ``item`` measured from ``centres`` (working pixels)."""
    native = (centres + 0.5) / item.factor - 0.5
    radii, _ = star_radii(item.inst_map, item.ids[index], native, rays, reach / item.factor)
    return radii * item.factor


def train_outline_head(cfg: OutlineTrainConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
                       progress: bool = True, epochs_this_run: int | None = None, device: str = "cpu") -> list[dict]:
    """Train an outline head (on ``device``); the best epoch by validation star IoU is saved as
    ``best.safetensors``."""
    run_dir, rng = start(run_dir, cfg, resume=resume, overwrite=overwrite)
    train = load_outline_images(cfg, "train")
    if not train:
        raise InputError(", ".join(s.root for s in cfg.datasets) or "--dataset", "no nuclei to train on")
    val = load_outline_images(cfg, "val")
    detector = Detector.from_pretrained(cfg.detector).model.float().to(memory_format=torch.contiguous_format)
    try:
        model = OutlineHead(cfg.model, detector).to(device)
    except ValueError as error:  # a detector at another pixel size
        raise InputError(cfg.detector, str(error)) from None
    trained = [p for p in model.parameters() if p.requires_grad]  # the detector stays as it is
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    by_dataset: dict[str, list[int]] = {}
    for k, item in enumerate(train):
        by_dataset.setdefault(item.dataset, []).append(k)
    names = sorted(by_dataset)
    per_crop = max(1, cfg.batch_size // CROPS_PER_STEP)
    jitter = cfg.centre_jitter_um / cfg.model.mpp
    rays, reach = cfg.model.rays, cfg.model.reach

    def batches():
        for _ in range(cfg.iters_per_epoch):
            crops, centres, radii = [], [], []
            for _ in range(CROPS_PER_STEP):  # each dataset alike, then each of its images by nucleus count
                members = by_dataset[names[rng.integers(len(names))]]
                counts = np.array([len(train[k].ids) for k in members], dtype=np.float64)
                item = train[members[rng.choice(len(members), p=counts / counts.sum())]]
                crop, xy, r = training_crop(item, per_crop, jitter, rays, reach, cfg.color_jitter, rng)
                crops.append(crop)
                centres.append(xy)
                radii.append(r)
            yield torch.stack(crops), centres, radii

    def step(batch):
        crops, centres, radii = batch
        # the frozen detector records no graph
        predicted = model.read(model.features(crops.to(device)), [c.to(device) for c in centres])
        radii = torch.cat(radii).to(device)
        iou = star_iou(predicted, radii).mean()
        # the metric itself (what PQ's IoU rewards) and a small L1 term that keeps gradients where IoU saturates
        return {"loss": 1 - iou + 0.02 * (predicted - radii).abs().mean(), "star_iou": iou.detach()}

    def validate(scored) -> dict[str, float]:
        scores = {}
        with torch.inference_mode():
            for name in sorted({item.dataset for item in val}):
                ious = []
                for item in (i for i in val if i.dataset == name):
                    radii = targets(item, np.arange(len(item.ids)), item.centres, rays, reach)
                    features = scored.features(pad_to(item.image, 32)[None].to(device))
                    predicted = scored.read(features, [torch.from_numpy(item.centres).float().to(device)])
                    ious.append(star_iou(predicted.cpu().numpy(), radii))
                scores[name] = float(np.concatenate(ious).mean())
        scores["mean"] = float(np.mean(list(scores.values()))) if scores else float("nan")
        return scores

    def save_best(scored, epoch: int, scores: dict) -> None:
        save_outline_head(scored, run_dir / "best.safetensors",
                          {"epoch": epoch, "val_star_iou": scores,
                           "training_data": ", ".join(f"{s.name} train split" for s in cfg.datasets)})

    return fit(cfg, run_dir, rng, model, optimizer, batches=batches, step=step,
               validate=validate if val else None, save_best=save_best, resume=resume, progress=progress,
               epochs_this_run=epochs_this_run)


def training_crop(item: OutlineImage, count: int, jitter: float, rays: int, reach: float, color_jitter: float,
                  rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A CROP-pixel crop of ``item`` (white beyond the image) around ``count`` of its nuclei, randomly flipped or
    transposed and re-coloured, their centres moved by up to ``jitter`` pixels, and their radii (rays permuted to
    match the flips)."""
    h, w = item.image.shape[-2:]
    anchor = item.centres[rng.integers(len(item.ids))]
    x0 = int(np.clip(round(anchor[0] - CROP / 2), min(0, w - CROP), max(0, w - CROP)))
    y0 = int(np.clip(round(anchor[1] - CROP / 2), min(0, h - CROP), max(0, h - CROP)))
    margin = min(reach / 2, CROP / 4)
    inside = np.nonzero((item.centres[:, 0] >= x0 + margin) & (item.centres[:, 0] < x0 + CROP - margin)
                        & (item.centres[:, 1] >= y0 + margin) & (item.centres[:, 1] < y0 + CROP - margin))[0]
    if not len(inside):
        inside = np.array([int(np.argmin(np.abs(item.centres - anchor).sum(1)))])
    index = rng.choice(inside, size=count)
    angle, length = rng.uniform(0, 2 * np.pi, count), jitter * np.sqrt(rng.uniform(0, 1, count))
    centres = item.centres[index] + np.stack([np.cos(angle), np.sin(angle)], 1) * length[:, None]
    radii = targets(item, index, centres, rays, reach)
    crop = torch.full((3, CROP, CROP), 255.0)
    sx, sy = max(x0, 0), max(y0, 0)
    part = item.image[:, sy:min(y0 + CROP, h), sx:min(x0 + CROP, w)]
    crop[:, sy - y0:sy - y0 + part.shape[1], sx - x0:sx - x0 + part.shape[2]] = part
    xy = centres - (x0, y0)
    transpose, flip_x, flip_y = (bool(v) for v in rng.integers(0, 2, 3))
    if transpose:
        crop, xy = crop.transpose(-1, -2), xy[:, ::-1]
    if flip_x:
        crop, xy = crop.flip(-1), np.c_[CROP - 1 - xy[:, 0], xy[:, 1]]
    if flip_y:
        crop, xy = crop.flip(-2), np.c_[xy[:, 0], CROP - 1 - xy[:, 1]]
    radii = radii[:, dihedral_ray_order(rays, transpose, flip_x, flip_y)]
    return (recolour(crop, color_jitter, rng), torch.from_numpy(np.ascontiguousarray(xy)).float(),
            torch.from_numpy(radii).float())


def recolour(crop: torch.Tensor, strength: float, rng: np.random.Generator) -> torch.Tensor:
    """Brightness (per-channel gain) and contrast perturbed by up to ``strength``."""
    gain = torch.from_numpy(rng.uniform(1 - strength, 1 + strength, (3, 1, 1))).float()
    contrast = float(rng.uniform(1 - strength, 1 + strength))
    mean = crop.mean()
    return (((crop - mean) * contrast + mean) * gain).clamp(0, 255)


def pad_to(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """(3, H, W) padded with white at the right and bottom to multiples of ``multiple``."""
    h, w = image.shape[-2:]
    return F.pad(image, (0, -w % multiple, 0, -h % multiple), value=255.0)


def save_outline_head(model: OutlineHead, path: str | Path, extra_metadata: dict | None = None,
                      tag: str | None = None) -> None:
    """The head's weights, config and provenance (safetensors metadata, JSON-encoded as ``denuc.hub`` reads it),
    written atomically."""
    metadata = stamp({"format": OUTLINE_FORMAT, "config": model.config.to_json(),
                      "denuc_detector": model.detector.config.to_json(),
                      **{k: json.dumps(v) for k, v in (extra_metadata or {}).items()}}, tag)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
