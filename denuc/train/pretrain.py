"""Self-supervised pretraining of any registry encoder on unlabelled H&E: MUSE's nucleus-level self-distillation.

MUSE (Yang et al., AAAI 2026, arXiv 2511.05170) trains an encoder without labels by self-distillation (DINO)
at two levels: the region (image level) and the nucleus (NuLo: features read at nucleus positions found by a
detector, compared across two views at different pixel sizes, which need not be aligned since each nucleus's
position is known in both). Here: a student ``Branch`` (the encoder + an image head on the deepest level's
pooled features + a nucleus head on the features of every level at each nucleus, bilinearly sampled as the
classifier reads them) and a teacher, its moving average, see the two views of ``denuc.train.views``; the
student is trained to give, for each view, the teacher's centred and sharpened scores for the other view
(``denuc.train.distill``), for the region and for each shared nucleus.

The run folder holds ``encoder.safetensors`` (the teacher's encoder after the last epoch, as the state dict of
the whole network: ``train-classifier --encoder <same> --weights`` takes it), ``last.pt`` (resumable),
``log.json`` / ``log.csv``, ``config.json`` and the nuclei found in the regions (``denuc.train.regions``).
The ``denuc.train.loop`` training loop runs it: warm-up and cosine learning rate, checkpoint every epoch.
Under ``torchrun`` (WORLD_SIZE set) each process trains on its own batches in DistributedDataParallel and
only process 0 writes; on a GPU the forward passes run in bfloat16 (``torch.autocast``).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from denuc.config import PretrainConfig
from denuc.errors import InputError
from denuc.hub import describe
from denuc.inference.detect import Detector
from denuc.io.atomic import atomic_path
from denuc.models.dino_head import DINOHead
from denuc.models.encoders import Encoder, TimmEncoder, create_encoder, create_network
from denuc.models.feature_query import sample_features
from denuc.train import loop
from denuc.train.distill import (
    distillation_loss,
    follow,
    target_entropy,
    teacher_momentum,
    teacher_temperature,
    update_center,
)
from denuc.train.regions import pretraining_regions, region_nuclei
from denuc.train.views import ViewPairBatches

ENCODER_FILE = "encoder.safetensors"


class Branch(nn.Module):
    """The encoder and its two heads: image scores from the deepest level's mean over the view, and nucleus
    scores from the features of every level at each nucleus (concatenated, as ``Classifier`` reads them)."""

    def __init__(self, encoder: Encoder, cfg: PretrainConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.image_head = DINOHead(encoder.channels[-1], cfg.prototypes, cfg.head_hidden, cfg.head_bottleneck)
        self.nucleus_head = DINOHead(sum(encoder.channels), cfg.prototypes, cfg.head_hidden, cfg.head_bottleneck)

    def forward(self, images: torch.Tensor, points: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) image scores and (sum n_b, K) nucleus scores, images' nuclei in order."""
        maps = self.encoder(images)
        nuclei = torch.cat(sample_features(maps, self.encoder.strides, points))
        return self.image_head(maps[-1].mean((2, 3))), self.nucleus_head(nuclei)


class SelfDistillation(nn.Module):
    """Student, teacher (its moving average, never trained directly), the teacher's output centres and the
    number of optimiser steps taken: everything a resumed run needs besides the optimiser."""

    def __init__(self, encoder: Encoder, cfg: PretrainConfig) -> None:
        super().__init__()
        self.student = Branch(encoder, cfg)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("image_center", torch.zeros(1, cfg.prototypes))
        self.register_buffer("nucleus_center", torch.zeros(1, cfg.prototypes))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))


def pretrain(cfg: PretrainConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
             progress: bool = True, device: str = "cpu", workers: int = 0, epochs_this_run: int | None = None
             ) -> Path:
    """Pretrain (or resume) in ``run_dir``; returns the encoder weights file. ``workers``: data-loading
    processes (0: in this one); ``epochs_this_run``: stop after that many epochs (continue with ``resume``).
    Under torchrun (WORLD_SIZE > 1) it joins the process group (NCCL on CUDA, else gloo)."""
    rank, world, where = _join_processes(device)
    try:
        return _pretrain(cfg, Path(run_dir), resume, overwrite, progress, where, workers, epochs_this_run, rank,
                         world)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _join_processes(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device); joins the process group torchrun describes, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    where = torch.device(device)
    if where.type == "cuda":
        where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(where)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
    return dist.get_rank(), world, where


def _pretrain(cfg: PretrainConfig, run_dir: Path, resume: bool, overwrite: bool, progress: bool,
              device: torch.device, workers: int, epochs_this_run: int | None, rank: int, world: int) -> Path:
    main = rank == 0
    if main:  # checks (and with overwrite, clears) the folder before the others look at it
        run_dir, rng = loop.start(run_dir, cfg, resume, overwrite)
    if world > 1:
        dist.barrier()
    if not main:
        run_dir, rng = loop.start(run_dir, cfg, resume=True)
    try:
        encoder = create_encoder(cfg.encoder, weights=cfg.encoder_weights, layers=cfg.encoder_layers,
                                 **cfg.encoder_kwargs)
    except ValueError as error:  # an unknown encoder or level: the user's choice
        raise InputError(cfg.encoder, str(error)) from None
    regions = pretraining_regions(cfg)
    detector = Detector.from_pretrained(cfg.detector, device=str(device))
    cache = run_dir / f"nuclei_{describe(cfg.detector)['sha256'][:12]}.npz"
    nuclei = region_nuclei(regions, detector, cache, progress, rank, world)
    del detector

    model = SelfDistillation(encoder, cfg).to(device)
    decayed = [p for p in model.student.parameters() if p.ndim > 1]  # DINO: no decay on biases and norms
    others = [p for p in model.student.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decayed}, {"params": others, "weight_decay": 0.0}], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    student = model.student
    if world > 1:  # levels a timm encoder stops before, and a head's unused layers, get no gradient
        student = DistributedDataParallel(model.student, device_ids=[device] if device.type == "cuda" else None,
                                          find_unused_parameters=True)
    bfloat16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    total_steps = cfg.epochs * cfg.iters_per_epoch
    warmup_steps = min(cfg.teacher_temp_warmup_epochs, cfg.epochs) * cfg.iters_per_epoch

    def batches():
        epoch = int(model.steps) // cfg.iters_per_epoch  # restored with the model on resume
        data = ViewPairBatches(regions, nuclei, cfg, epoch, cfg.iters_per_epoch, rank)
        return DataLoader(data, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda")

    def step(batch: dict) -> dict[str, torch.Tensor | float]:
        images = torch.cat([batch["images_a"], batch["images_b"]]).to(device, non_blocking=True)
        points = [p.to(device) for p in batch["points_a"] + batch["points_b"]]
        temperature = teacher_temperature(int(model.steps), warmup_steps, cfg.warmup_teacher_temp, cfg.teacher_temp)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bfloat16):
            student_image, student_nuclei = student(images, points)
            with torch.no_grad():
                teacher_image, teacher_nuclei = model.teacher(images, points)

        image_loss = cross_view_loss(student_image, teacher_image, model.image_center, cfg, temperature)
        nucleus_loss = cross_view_loss(student_nuclei, teacher_nuclei, model.nucleus_center, cfg, temperature)
        floors = {"image_target_entropy": target_entropy(teacher_image, model.image_center, temperature),
                  "nucleus_target_entropy": target_entropy(teacher_nuclei, model.nucleus_center, temperature)}
        update_center(model.image_center, teacher_image, cfg.center_momentum)
        update_center(model.nucleus_center, teacher_nuclei, cfg.center_momentum)
        return {"loss": cfg.image_loss_weight * image_loss + cfg.nucleus_loss_weight * nucleus_loss,
                "image_loss": image_loss.detach(), "nucleus_loss": nucleus_loss.detach(),
                "nuclei_per_pair": len(teacher_nuclei) / len(images), **floors}

    def after_step() -> None:
        follow(model.teacher, model.student, teacher_momentum(int(model.steps), total_steps, cfg.momentum_teacher))
        model.steps += 1

    def save_encoder(trained: SelfDistillation, epoch: int, scores: dict) -> None:
        write_encoder(run_dir / ENCODER_FILE, trained.teacher.encoder, cfg, epoch)

    # the loop's model.train() puts the teacher in training mode too: its batch norm normalises with each batch's
    # statistics, as DINO's teacher does
    loop.fit(cfg, run_dir, rng, model, optimizer, batches=batches, step=step, validate=None, save_best=save_encoder,
             key="distillation", resume=resume, progress=progress and main, epochs_this_run=epochs_this_run,
             after_step=after_step, main_process=main)
    return run_dir / ENCODER_FILE


def cross_view_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, cfg: PretrainConfig,
                    temperature: float) -> torch.Tensor:
    """The loss of scores whose rows are view a's then view b's (row i of each the same region or nucleus):
    each view's student scores are taught by the teacher's for the other view, both ways, averaged."""
    half = len(student) // 2
    if half == 0:  # no nucleus shared by any pair of the batch: nothing to learn, the graph kept
        return student.sum() * 0
    return (distillation_loss(student[half:], teacher[:half], center, cfg.student_temp, temperature)
            + distillation_loss(student[:half], teacher[half:], center, cfg.student_temp, temperature)) / 2


def network_state(encoder: Encoder, kwargs: dict) -> dict[str, torch.Tensor]:
    """The state dict of the whole network ``encoder`` was cut from, as ``create_encoder(weights=...)`` loads
    it. A torchvision encoder holds only the layers up to its last level: the others (a classifier's fc) keep
    torchvision's initialisation with seed 0 and are never run by an encoder."""
    if isinstance(encoder, TimmEncoder):
        state = encoder.model.state_dict()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            state = create_network(encoder.name, **kwargs).state_dict()
        state.update(encoder.extractor.state_dict())
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def write_encoder(path: Path, encoder: Encoder, cfg: PretrainConfig, epoch: int) -> None:
    """The encoder's network weights as safetensors; the metadata says how they were made."""
    made = {"method": "denuc pretrain (MUSE-style nucleus-level self-distillation), teacher", "epoch": epoch,
            "encoder": cfg.encoder, "encoder_kwargs": cfg.encoder_kwargs, "encoder_layers": cfg.encoder_layers,
            "images": len(cfg.images), "datasets": [d.name for d in cfg.datasets]}
    with atomic_path(path) as tmp:
        save_file(network_state(encoder, cfg.encoder_kwargs), str(tmp), metadata={"denuc_pretrain": json.dumps(made)})
