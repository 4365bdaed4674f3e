"""Training a nucleus classifier: frozen encoder + head on cached features, LoRA, or full fine-tuning.

It learns from the points of ``denuc.train.points``: labelled ground truth with its class, and the detector's
false positives as "not a nucleus". Each dataset keeps its own taxonomy and head. Every epoch is scored end to
end on the validation splits: the detector's detections on each validation image are classified and matched
to the ground truth (``denuc.metrics.evaluate``, 3 um); the epoch with the best mean over datasets of the mean
class F1 is kept (``best.safetensors``). Then ``denuc.train.offsets.tune_offsets`` chooses, on the same
validation images, an offset added to each head's "not a nucleus" logit (``cfg.offsets`` "nucleus", the
default: how readily detections are rejected, the classifier's counterpart of the detector's threshold sweep)
or to every output ("all": also each class's share of the decisions, which fits the validation split's class
mix - only worth it when that mix is the target's). The run directory holds ``last.pt`` (resumable),
``log.csv`` / ``log.json``, the detections and (frozen mode) the feature cache, ``best.safetensors`` and
``model.safetensors``: the bundle of the detector and the selected classifier, offsets folded into its heads.

With ``cfg.base`` (frozen mode), an existing bundle gets heads for new taxonomies: its detector and encoder are
used as they are, heads are trained (and their offsets tuned) for the training datasets only, and the bundle
saved holds the base's other heads and tensors bit for bit.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from denuc import hub
from denuc.config import ClassifierTrainConfig
from denuc.errors import InputError
from denuc.inference.classify import Classifier
from denuc.inference.detect import Detector
from denuc.inference.pipeline import Pipeline
from denuc.nuclei import NucleusClass
from denuc.train import loop
from denuc.train.augment import labelled_crop, stain_templates
from denuc.train.offsets import tune_offsets
from denuc.train.points import (
    PointImage,
    cached_features,
    class_f1,
    image_features,
    point_images,
    points_key,
    taxonomies,
)


def class_weights(train: list[PointImage], classes: dict[str, list[NucleusClass]], balanced: bool
                  ) -> dict[str, torch.Tensor]:
    """Per taxonomy, the loss weight of each output (classes + "not a nucleus"): inverse frequency, mean 1 over
    the points, when ``balanced``; else all 1."""
    weights = {}
    for taxonomy, names in classes.items():
        counts = np.zeros(len(names) + 1)
        for item in train:
            if item.dataset == taxonomy:
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


def add_heads(base: str, classes: dict[str, list[NucleusClass]], head: str | None = None, device: str = "cpu"
              ) -> tuple[Pipeline, bool, dict]:
    """The bundle ``base`` (a shipped name or a file) with a fresh head for each taxonomy of ``classes``, replacing
    a head of the same name, of kind ``head`` (None: the kind the bundle gives that name, ``head_kind``); its
    detector, encoder and other heads as they are. Also what keeps those unchanged in a bundle saved from it:
    whether the base stores float16 (shipped bundles do), and the offsets (metadata "class_offsets") folded into the
    heads kept. ``device``: where the bundle's networks run."""
    path = hub.resolve(base, kind="bundle")
    found = Pipeline.from_pretrained(path, device=device)
    if found.classifier is None:
        raise InputError(base, "a detector-only model has no classifier to add heads to: give a bundle")
    old = found.classifier
    config = old.config
    if head is not None:  # recorded only where it differs from the bundle's kind
        kinds = {**config.taxonomy_heads, **dict.fromkeys(classes, head)}
        config = replace(config, taxonomy_heads={name: kind for name, kind in kinds.items() if kind != config.head})
    classifier = Classifier(config, old.encoder, old.taxonomies | classes, embed_encoder=old.embed_encoder)
    kept = [name for name in old.taxonomies if name not in classes]
    for name in kept:
        classifier.heads[name] = old.heads[name]
    with safe_open(str(path), framework="pt") as f:
        half = any(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
        offsets = json.loads(f.metadata().get("class_offsets", "{}"))
    return Pipeline(found.detector, classifier), half, {name: offsets[name] for name in kept if name in offsets}


def train_classifier(cfg: ClassifierTrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
                     epochs_this_run: int | None = None, overwrite: bool = False, device: str = "cpu") -> Path:
    """Train (or resume) a classifier in ``run_dir``; returns the bundle ``model.safetensors`` (the detector
    ``cfg.detector`` + the classifier of the best validation epoch), or ``best.safetensors`` when
    ``epochs_this_run`` stopped it early. ``overwrite=True`` starts again in a folder that holds a trained run
    (refused otherwise). With ``cfg.base``, the detector and classifier are that bundle's (``add_heads``).
    ``device``: where the detector finds the negatives and the classifier trains ("cuda": LoRA and full
    fine-tuning in bfloat16 autocast; frozen: the features are cached from there, the heads train on it too)."""
    if cfg.mode == "joint":
        raise ValueError("the joint baseline trains with denuc.train.joint.train_joint")
    run_dir, rng = loop.start(run_dir, cfg, resume, overwrite)
    classes = taxonomies(cfg)
    half, base_metadata = False, {}
    if cfg.base is not None:
        base, half, offsets = add_heads(cfg.base, classes, cfg.base_head, device)
        detector, classifier = base.detector, base.classifier
        base_metadata = {"class_offsets": offsets}
        cfg = replace(cfg, model=classifier.config, detector=cfg.base)  # what the run uses, recorded and resumed
    else:
        try:
            classifier = Classifier.create(cfg.model, classes)
        except ValueError as error:  # an unknown encoder or layer: the user's choice
            raise InputError(cfg.model.encoder, str(error)) from None
        detector = Detector.from_pretrained(cfg.detector, device=device)
    if cfg.mode == "lora":
        add_lora(classifier, cfg.lora_rank, cfg.lora_alpha)
    where = torch.device(device)
    classifier.to(where)
    bfloat16 = where.type == "cuda" and torch.cuda.is_bf16_supported()
    if cfg.mode != "frozen":
        classifier.embed_encoder = True  # trained weights live in the bundle
    if abs(detector.config.mpp - cfg.model.mpp) > 1e-9:
        raise InputError(cfg.detector, f"the detector works at {detector.config.mpp} um/px, the classifier at "
                                       f"{cfg.model.mpp}")

    train = point_images(cfg, detector, "train", run_dir, progress)
    val = point_images(cfg, detector, "val", run_dir, progress)
    weights = {name: w.to(where) for name, w in class_weights(train, classes, cfg.class_balanced).items()}
    templates = stain_templates(run_dir, [item.image for item in train], cfg.randstainna)
    # frozen: the heads of the training datasets (a base bundle's other heads stay as they are)
    trainable = [p for name in classes for p in classifier.heads[name].parameters()] if cfg.mode == "frozen" else \
        [p for p in classifier.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch_points = cfg.batch_size * 128  # frozen: points per batch of cached features
    if cfg.mode == "frozen":
        key = {"encoder": cfg.model.to_json(), "detector": cfg.detector, "negatives": cfg.negatives,
               "radius": cfg.match_radius_um, "datasets": [d.name for d in cfg.datasets]}
        train_features = cached_features(classifier, train, run_dir / "features_train.safetensors",
                                         {**key, "points": points_key(train)}, progress)
        val_features = cached_features(classifier, val, run_dir / "features_val.safetensors",
                                       {**key, "points": points_key(val)}, progress)

    def batches():
        if cfg.mode == "frozen":
            yield from _frozen_epoch(train, train_features, batch_points, rng)
            return
        for _ in range(cfg.iters_per_epoch):
            picks = rng.integers(0, len(train), cfg.batch_size)
            crops = [labelled_crop(train[i], cfg.crop_size, cfg, rng, templates) for i in picks]
            yield crops, [train[i].dataset for i in picks]

    def step(batch) -> dict[str, torch.Tensor]:
        if cfg.mode == "frozen":
            features, targets, taxonomy = batch
        else:
            crops, taxonomy = batch
            images = torch.stack([torch.from_numpy(c).permute(2, 0, 1) for c, _, _ in crops])
            targets = [torch.from_numpy(t) for _, _, t in crops]
            with torch.autocast(where.type, dtype=torch.bfloat16, enabled=bfloat16):
                features = classifier.point_features(images, [torch.from_numpy(xy) for _, xy, _ in crops])
        logits = [classifier.heads[t](f.to(where).float()) for f, t in zip(features, taxonomy)]
        return {"loss": point_loss(logits, [t.to(where) for t in targets], taxonomy, weights)}

    def train_mode() -> None:  # a frozen or LoRA encoder keeps its batch-norm statistics; full fine-tuning updates them
        classifier.train()
        classifier.encoder.train(cfg.mode == "full")

    @torch.inference_mode()
    def validate(scored: Classifier) -> dict[str, float]:
        features = val_features if cfg.mode == "frozen" else image_features(scored, val, progress)
        return class_f1(val, [scored.heads[item.dataset](f.to(where)).softmax(-1).cpu().numpy()
                              for item, f in zip(val, features)], classes)

    def save_best(scored: Classifier, epoch: int, scores: dict) -> None:
        chosen = merge_lora(scored) if cfg.mode == "lora" else scored
        Pipeline(detector, copy.deepcopy(chosen)).save(
            run_dir / "best.safetensors", half=half,
            extra_metadata={"epoch": epoch, "val_f1": scores, "train_config": cfg.to_dict(), **base_metadata})

    history = loop.fit(cfg, run_dir, rng, classifier, optimizer, batches=batches, step=step,
                       validate=validate if val else None, save_best=save_best,
                       steps_per_epoch=_frozen_batches(train, batch_points) if cfg.mode == "frozen" else None,
                       key="classifier", train_mode=train_mode, resume=resume, progress=progress,
                       epochs_this_run=epochs_this_run)
    if len(history) < cfg.epochs:
        return run_dir / "best.safetensors"
    if cfg.offsets != "none":
        tune_offsets(run_dir / "best.safetensors", cfg.datasets, run_dir / "model.safetensors", cfg.offsets,
                     cache_dir=run_dir, progress=progress, device=device)
    else:
        shutil.copyfile(run_dir / "best.safetensors", run_dir / "model.safetensors")
    return run_dir / "model.safetensors"


def _frozen_batches(train: list[PointImage], batch_points: int) -> int:
    return max(1, -(-sum(len(item.xy) for item in train) // batch_points))


def _frozen_epoch(train: list[PointImage], features: list[torch.Tensor], batch_points: int,
                  rng: np.random.Generator):
    """Shuffled batches of cached point features: (features per taxonomy, targets, taxonomy names)."""
    taxonomy = np.concatenate([[item.dataset] * len(item.xy) for item in train])
    targets = torch.from_numpy(np.concatenate([item.targets for item in train]))
    every = torch.cat(features)
    order = rng.permutation(len(targets))
    for first in range(0, len(order), batch_points):
        index = order[first:first + batch_points]
        names = sorted(set(taxonomy[index]))
        groups = [index[taxonomy[index] == name] for name in names]
        yield [every[g] for g in groups], [targets[g] for g in groups], names
