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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from denuc.config import ClassifierTrainConfig, DetectorConfig, DetectorTrainConfig
from denuc.inference.detect import Detector
from denuc.inference.tiling import predict_image
from denuc.io.atomic import atomic_path
from denuc.metrics.evaluate import per_dataset_scores
from denuc.models.detector import PointDetector
from denuc.models.feature_query import sample_features
from denuc.nuclei import UNLABELLED, Nuclei, NucleusClass
from denuc.train import loop
from denuc.train.augment import labelled_crop, stain_templates
from denuc.train.data import load_split
from denuc.train.detector import detection_loss
from denuc.train.points import PointImage, taxonomies


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
    def predict_tiles(self, tiles: np.ndarray, taxonomy: str, scan_mpp: float | None = None) -> list[Nuclei]:
        """Detections of each RGB uint8 tile (as ``Detector.detect_tiles``: ``scan_mpp`` sets the score threshold)
        with their classes."""
        if self.detector.config.test_time_views != 1:
            raise ValueError("the joint baseline classifies from its last forward pass: test_time_views must be 1")
        found = self.detector.detect_tiles(tiles, scan_mpp)  # its forward pass leaves the head features in _features
        classes = self.taxonomies[taxonomy]
        logits = self.class_logits([torch.from_numpy(n.xy) for n in found], taxonomy)
        for nuclei, lg in zip(found, logits):
            nuclei.probs = lg.float().softmax(-1).cpu().numpy().astype(np.float64)
            nuclei.labels = np.array([classes[i].name for i in nuclei.probs.argmax(1)], dtype=object).reshape(-1)
            nuclei.classes = list(classes)
        return found

    def predict(self, image: np.ndarray, mpp: float, taxonomy: str) -> Nuclei:
        """Classified nuclei of a whole RGB image (array or file) of pixel size ``mpp``, in its own pixels; the score
        threshold is that of a scan of pixel size ``mpp`` (20x or 40x), as the detector's."""
        return predict_image(image, mpp, self.detector.config, lambda t: self.predict_tiles(t, taxonomy, mpp))

    def save(self, path: str | Path, extra_metadata: dict | None = None) -> None:
        taxonomies = {n: [{"name": c.name, "color": list(c.color)} for c in cs] for n, cs in self.taxonomies.items()}
        metadata = {"format": "denuc-joint-1", "denuc_detector": self.detector.config.to_json(),
                    "taxonomies": json.dumps(taxonomies),
                    **{k: json.dumps(v) for k, v in (extra_metadata or {}).items()}}
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
    for item in load_split(cfg, split, required=split == "train"):
        names = [c.name for c in classes[item.dataset]]
        targets = np.array([-1 if label == UNLABELLED else names.index(label) for label in item.nuclei.labels],
                           dtype=np.int64)
        out.append(PointImage(item.dataset, item.name, item.image, item.nuclei.xy, targets, item.nuclei))
    return out


def train_joint(cfg: ClassifierTrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
                epochs_this_run: int | None = None, overwrite: bool = False) -> Path:
    """Train the joint network from the detector ``cfg.detector``; returns ``best.safetensors`` (selected on the
    validation mean class F1, end to end; without validation images, the last epoch). Uses the crop, optimiser
    and schedule settings of ``cfg``."""
    run_dir, rng = loop.start(run_dir, cfg, resume, overwrite)
    model = JointModel(Detector.from_pretrained(cfg.detector), taxonomies(cfg))
    detection_cfg = DetectorTrainConfig(model=model.detector.config)  # the detector's loss settings
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train, val = joint_items(cfg, "train"), joint_items(cfg, "val")
    templates = stain_templates(run_dir, [item.image for item in train], cfg.randstainna)

    def batches():
        for _ in range(cfg.iters_per_epoch):
            picks = rng.integers(0, len(train), cfg.batch_size)
            yield [labelled_crop(train[i], cfg.crop_size, cfg, rng, templates) for i in picks], \
                [train[i].dataset for i in picks]

    def step(batch) -> dict[str, torch.Tensor]:
        crops, taxonomy = batch
        images = torch.stack([torch.from_numpy(c).permute(2, 0, 1) for c, _, _ in crops])
        points = [torch.from_numpy(xy).float() for _, xy, _ in crops]
        logits, predicted = model.network(images.contiguous(memory_format=torch.channels_last))
        loss, _ = detection_loss(logits, predicted, points, detection_cfg)
        labelled = [(torch.from_numpy(xy[t >= 0]), torch.from_numpy(t[t >= 0])) for _, xy, t in crops]
        class_logits = _class_logits_by_taxonomy(model, taxonomy, [xy for xy, _ in labelled])
        n_labelled = sum(len(t) for _, t in labelled)
        if n_labelled:  # mean cross-entropy over the labelled points (taxonomies differ in width)
            loss = loss + sum(F.cross_entropy(lg, t, reduction="sum")
                              for lg, (_, t) in zip(class_logits, labelled)) / n_labelled
        return {"loss": loss}

    def validate(scored: JointModel) -> dict[str, float]:
        return per_dataset_scores(((item.dataset, item.name, scored.predict(item.image, item.gt.mpp, item.dataset),
                                    item.gt) for item in val), lambda report: report.mean_f1)

    def save_best(scored: JointModel, epoch: int, scores: dict) -> None:
        scored.save(run_dir / "best.safetensors", {"epoch": epoch, "val_f1": scores})

    loop.fit(cfg, run_dir, rng, model, optimizer, batches=batches, step=step, validate=validate if val else None,
             save_best=save_best, resume=resume, progress=progress, epochs_this_run=epochs_this_run)
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
