"""A training run's folder, shared by the detector, classifier and joint trainers.

``last.pt`` holds everything needed to continue exactly (weights, optimiser, schedule, random states, history);
``log.json`` / ``log.csv`` hold one row per epoch. The learning rate warms up linearly, then follows a cosine.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from denuc.config import ClassifierTrainConfig, DetectorTrainConfig
from denuc.train.stain import StainTemplates
from denuc.errors import InputError
from denuc.io.atomic import atomic_path, write_json


def lr_factor(step: int, cfg) -> float:
    """Learning-rate multiplier at ``step`` for a config with ``epochs``, ``iters_per_epoch``, ``warmup_iters``."""
    total = cfg.epochs * cfg.iters_per_epoch
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    progress = (step - cfg.warmup_iters) / max(1, total - cfg.warmup_iters)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def stain_templates(run_dir: Path, images: list[np.ndarray], probability: float) -> StainTemplates | None:
    """RandStainNA's templates, fitted to the run's train images (every dataset; the same again on resume) and
    written to ``stain_templates.json``; None when the run does not re-stain (``probability`` 0)."""
    if probability <= 0:
        return None
    try:
        templates = StainTemplates.fit(images)
    except ValueError as error:
        raise InputError("--randstainna", str(error)) from None
    write_json(run_dir / "stain_templates.json", templates.to_dict())
    return templates


def start(run_dir: str | Path, cfg) -> tuple[Path, np.random.Generator]:
    """Create the run folder and apply ``cfg``'s thread count and seed; returns the folder and the run's numpy
    generator (torch's is seeded globally)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    return run_dir, np.random.default_rng(cfg.seed)


AFTER_TRAINING = {"offsets"}
"""Config keys that only act once training has ended (they do not bind a resumed run)."""


def resume(run_dir: Path, cfg: DetectorTrainConfig | ClassifierTrainConfig, modules: dict[str, torch.nn.Module],
           optimizer: torch.optim.Optimizer, scheduler, rng: np.random.Generator) -> tuple[int, float, list[dict]]:
    """Restore the state saved by ``save_epoch`` in ``run_dir`` (each module's weights under its key) if it was
    saved with the training config ``cfg`` (a dataclass); returns (first epoch to run, best validation score so
    far, history). With no checkpoint: (0, -1.0, [])."""
    path = run_dir / "last.pt"
    if not path.exists():
        return 0, -1.0, []
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    saved, config = checkpoint["config"], asdict(cfg)
    # a run saved before a setting existed ran as that setting's default does (settings are added with the old
    # behaviour as their default), so it resumes if the setting still has it; settings applied after the last
    # epoch may change between runs
    defaults = {f.name: f.default for f in fields(cfg) if f.default is not MISSING}
    differing = sorted(k for k in (set(saved) | set(config)) - AFTER_TRAINING
                       if saved.get(k, defaults.get(k)) != config.get(k))
    if differing:
        raise ValueError(f"{path}: was trained with another config (differs in {differing}); resume needs the same one")
    for name, module in modules.items():
        module.load_state_dict(checkpoint[name])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    rng.bit_generator.state = checkpoint["rng"]["numpy"]
    torch.set_rng_state(checkpoint["rng"]["torch"])
    return checkpoint["epoch"] + 1, checkpoint["best"], checkpoint["history"]


def save_epoch(run_dir: Path, config: dict, modules: dict[str, torch.nn.Module],
               optimizer: torch.optim.Optimizer, scheduler, rng: np.random.Generator, epoch: int, best: float,
               history: list[dict], progress: bool) -> None:
    """Write ``last.pt`` (the resumable state, each module's weights under its key) and the history as
    ``log.json`` and ``log.csv``; print the epoch's row when ``progress``."""
    state = {**{name: module.state_dict() for name, module in modules.items()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}, "epoch": epoch,
             "best": best, "history": history, "config": config}
    with atomic_path(run_dir / "last.pt") as tmp:
        torch.save(state, tmp)
    write_json(run_dir / "log.json", history)
    with atomic_path(run_dir / "log.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[-1]))
        writer.writeheader()
        writer.writerows(history)
    if progress:
        print(json.dumps(history[-1]), flush=True)


def weight_average(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s weights and batch-norm buffers (``update_parameters(model)``
    after each step), for validating and saving in place of the last step's weights."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
