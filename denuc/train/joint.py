"""The end-to-end joint baseline of the paper's Table 3: one network that detects and classifies.

The detector network gets, per taxonomy, a 1x1 convolution on the features its point head ends with (the
input of its logit layer, at the anchor-grid stride); a point's class logits are that map read bilinearly at
the point (``denuc.models.feature_query``: a point on an anchor gets exactly its anchor's logits). Training
adds the cross-entropy of those logits at the labelled ground-truth points to the detector's own loss and
updates every weight of the one network. It starts from a trained detector's weights: training the detector
from scratch again would cost an hour of CPU here, and both decoupled variants start from the same detector.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

import denuc.metrics.evaluate as evaluation
from denuc.config import ClassifierTrainConfig, DetectorConfig, DetectorTrainConfig
from denuc.inference.detect import Detector
from denuc.inference.tiling import predict_image
from denuc.train import loop as runs
from denuc.train.loop import lr_factor
from denuc.train.classifier import PointImage, labelled_crop, taxonomies
from denuc.train.detector import detection_loss, load_split
from denuc.io.atomic import atomic_path
from denuc.models.detector import PointDetector
from denuc.models.feature_query import sample_features
from denuc.nuclei import UNLABELLED, Nuclei, NucleusClass


class JointModel(nn.Module):
    """A detector whose head features also give class logits, one 1x1 convolution per taxonomy."""

    def __init__(self, detector: Detector, classes: dict[str, list[NucleusClass]]) -> None:
        super().__init__()
        self.detector = detector
        self.network = detector.model
        self.taxonomies = {name: list(c) for name, c in classes.items()}
        channels = detector.config.neck_channels
        self.class_heads = nn.ModuleDict({name: nn.Conv2d(channels, len(c), 1) for name, c in classes.items()})
        self._features: torch.Tensor | None = None
        # the logit layer's input is the head's last feature map: keep it instead of re-running the head
        self.network.head.logits.register_forward_hook(self._keep_features)

    def _keep_features(self, module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        self._features = inputs[0]

    def class_logits(self, points: list[torch.Tensor], taxonomy: str) -> list[torch.Tensor]:
        """Per image of the last forward pass, the (n, classes) logits at its points (image pixels)."""
        maps = self.class_heads[taxonomy](self._features)
        return sample_features([maps], [self.network.stride], points)

    @torch.inference_mode()
    def predict_tiles(self, tiles: np.ndarray, taxonomy: str) -> list[Nuclei]:
        """Detections of each RGB uint8 tile (as ``Detector.detect_tiles``) with their classes."""
        if self.detector.config.test_time_views != 1:
            raise ValueError("the joint baseline classifies from its last forward pass: test_time_views must be 1")
        found = self.detector.detect_tiles(tiles)  # its forward pass leaves the head features in _features
        classes = self.taxonomies[taxonomy]
        logits = self.class_logits([torch.from_numpy(n.xy) for n in found], taxonomy)
        for nuclei, lg in zip(found, logits):
            nuclei.probs = lg.float().softmax(-1).cpu().numpy().astype(np.float64)
            nuclei.labels = np.array([classes[i].name for i in nuclei.probs.argmax(1)], dtype=object).reshape(-1)
            nuclei.classes = list(classes)
        return found

    def predict(self, image: np.ndarray, mpp: float, taxonomy: str) -> Nuclei:
        """Classified nuclei of a whole RGB image (array or file) of pixel size ``mpp``, in its own pixels."""
        return predict_image(image, mpp, self.detector.config, lambda t: self.predict_tiles(t, taxonomy))

    def save(self, path: str | Path, extra_metadata: dict | None = None) -> None:
        taxonomies = {n: [{"name": c.name, "color": list(c.color)} for c in cs] for n, cs in self.taxonomies.items()}
        metadata = {"format": "denuc-joint-1", "denuc_detector": self.detector.config.to_json(),
                    "taxonomies": json.dumps(taxonomies), **{k: json.dumps(v) for k, v in (extra_metadata or {}).items()}}
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> "JointModel":
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        classes = {n: [NucleusClass(c["name"], tuple(c["color"])) for c in cs]
                   for n, cs in json.loads(metadata["taxonomies"]).items()}
        model = cls(Detector(PointDetector(DetectorConfig.from_json(metadata["denuc_detector"]))), classes)
        model.load_state_dict(load_file(str(path)))
        return model.eval()


def joint_items(cfg: ClassifierTrainConfig, split: str) -> list[PointImage]:
    """Images with every ground-truth point; targets: class index, or -1 for unlabelled (detection only)."""
    classes = taxonomies(cfg)
    out = []
    for name, image, gt in load_split(cfg, split):
        taxonomy = name.split("/")[0]
        names = [c.name for c in classes[taxonomy]]
        targets = np.array([-1 if label == UNLABELLED else names.index(label) for label in gt.labels], dtype=np.int64)
        out.append(PointImage(name, taxonomy, image, gt.xy, targets, gt))
    return out


def train_joint(cfg: ClassifierTrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True
                ) -> Path:
    """Train the joint network from the detector ``cfg.detector``; returns ``best.safetensors`` (selected on the
    validation mean class F1, end to end). Uses the crop, optimiser and schedule settings of ``cfg``."""
    run_dir, rng = runs.start(run_dir, cfg)
    classes = taxonomies(cfg)
    model = JointModel(Detector.from_pretrained(cfg.detector), classes)
    detection_cfg = DetectorTrainConfig(model=model.detector.config)  # the detector's loss settings
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    start_epoch, best, history = (runs.resume(run_dir, cfg, {"model": model}, optimizer, scheduler, rng)
                                  if resume else (0, -1.0, []))
    runs.write_json(run_dir / "config.json", cfg.to_dict())
    train, val = joint_items(cfg, "train"), joint_items(cfg, "val")
    templates = runs.stain_templates(run_dir, [item.image for item in train], cfg.randstainna)

    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        model.train()
        total = 0.0
        bar = tqdm(range(cfg.iters_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress)
        for _ in bar:
            picks = rng.integers(0, len(train), cfg.batch_size)
            crops = [labelled_crop(train[i], cfg.crop_size, cfg, rng, templates) for i in picks]
            images = torch.stack([torch.from_numpy(c).permute(2, 0, 1) for c, _, _ in crops])
            points = [torch.from_numpy(xy).float() for _, xy, _ in crops]
            logits, predicted = model.network(images.contiguous(memory_format=torch.channels_last))
            loss, _ = detection_loss(logits, predicted, points, detection_cfg)
            labelled = [(torch.from_numpy(xy[t >= 0]), torch.from_numpy(t[t >= 0])) for _, xy, t in crops]
            class_logits = _class_logits_by_taxonomy(model, [train[i].taxonomy for i in picks],
                                                     [xy for xy, _ in labelled])
            n_labelled = sum(len(t) for _, t in labelled)
            if n_labelled:  # mean cross-entropy over the labelled points (taxonomies differ in width)
                loss = loss + sum(F.cross_entropy(lg, t, reduction="sum")
                                  for lg, (_, t) in zip(class_logits, labelled)) / n_labelled
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        model.eval()
        per_dataset: dict[str, list] = {}
        for item in val:
            pred = model.predict(item.image, item.gt.mpp, item.taxonomy)
            per_dataset.setdefault(item.taxonomy, []).append((item.name, pred, item.gt))
        val_f1 = {ds: evaluation.evaluate(pairs).mean_f1 for ds, pairs in per_dataset.items()}
        val_f1["mean"] = float(np.mean(list(val_f1.values())))
        history.append({"epoch": epoch + 1, "loss": total / cfg.iters_per_epoch, "lr": scheduler.get_last_lr()[0],
                        "seconds": time.perf_counter() - started, **{f"val_f1_{k}": v for k, v in val_f1.items()}})
        if val_f1["mean"] > best:
            best = val_f1["mean"]
            model.save(run_dir / "best.safetensors", {"epoch": epoch + 1, "val_f1": val_f1})
        runs.save_epoch(run_dir, cfg.to_dict(), {"model": model}, optimizer, scheduler, rng, epoch, best, history,
                        progress)
    return run_dir / "best.safetensors"


def _class_logits_by_taxonomy(model: JointModel, taxonomy: list[str], points: list[torch.Tensor]
                              ) -> list[torch.Tensor]:
    """Class logits at each image's points under its own taxonomy (images of one taxonomy in one query)."""
    out: list[torch.Tensor | None] = [None] * len(points)
    for name in sorted(set(taxonomy)):
        index = [i for i, t in enumerate(taxonomy) if t == name]
        maps = model.class_heads[name](model._features[index])
        for i, lg in zip(index, sample_features([maps], [model.network.stride], [points[i] for i in index])):
            out[i] = lg
    return out
