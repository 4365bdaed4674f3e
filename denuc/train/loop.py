"""The training loop the detector, classifier and joint trainers share, and their run folder.

``fit`` is torchvision's detection reference (``train_one_epoch`` then ``evaluate``, each epoch) with the run
folder around it: the trainer supplies its batches, its step (batch -> losses), its validation (-> score per
dataset and their "mean") and how to save the best model; ``fit`` owns the epochs, the learning-rate schedule
(linear warm-up, then a cosine), the optional weight average, the progress bar, choosing the best epoch and
the checkpoint. ``last.pt`` holds everything needed to continue exactly (weights, optimiser, schedule, random
states, history); ``log.json`` / ``log.csv`` hold one row per epoch.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from denuc.config import ClassifierTrainConfig, DetectorTrainConfig, OutlineTrainConfig, PretrainConfig
from denuc.errors import InputError, OutputExistsError
from denuc.io.atomic import atomic_path, write_json

TrainConfig = DetectorTrainConfig | ClassifierTrainConfig | OutlineTrainConfig | PretrainConfig

RUN_OUTPUTS = ("last.pt", "best.safetensors", "model.safetensors", "encoder.safetensors", "log.json", "log.csv")
"""What a training run leaves in its folder (besides its config and caches): a folder holding any of them
holds a run, which a new run would overwrite."""


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier at ``step``: a linear warm-up over ``warmup_steps``, then a cosine to 0 at
    ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def start(run_dir: str | Path, cfg: TrainConfig, resume: bool = False, overwrite: bool = False
          ) -> tuple[Path, np.random.Generator]:
    """Check that ``run_dir`` may take this run and apply ``cfg``'s thread count and seed; returns the folder and
    the run's numpy generator (torch's is seeded globally). The folder is made by the run's first write, so a
    run refused before it (a bad option, a missing file) leaves none behind.

    A folder that holds a trained run (``RUN_OUTPUTS``) is refused unless ``resume`` (continue it) or
    ``overwrite`` (its outputs are deleted: start again)."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise InputError(run_dir, "resume continues the run in the folder, overwrite starts it again: choose one")
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if found and not resume:
        if not overwrite:
            raise OutputExistsError(run_dir, f"holds a trained run ({', '.join(found)}): continue it with --resume, "
                                             "or start again with --overwrite, or choose another --run-dir")
        for name in found:
            (run_dir / name).unlink()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    return run_dir, np.random.default_rng(cfg.seed)


AFTER_TRAINING = {"offsets"}
"""Config keys that only act once training has ended (they do not bind a resumed run)."""


def restore(run_dir: Path, cfg: TrainConfig, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
           scheduler, rng: np.random.Generator) -> tuple[int, float, list[dict]]:
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
        raise InputError(path, f"was trained with another config (differs in {differing}); resume needs the same "
                               "one")
    for name, module in modules.items():
        module.load_state_dict(checkpoint[name])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    rng.bit_generator.state = checkpoint["rng"]["numpy"]
    torch.set_rng_state(checkpoint["rng"]["torch"])
    return checkpoint["epoch"] + 1, checkpoint["best"], checkpoint["history"]


def save_epoch(run_dir: Path, config: dict, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
               scheduler, rng: np.random.Generator, epoch: int, best: float, history: list[dict], progress: bool
               ) -> None:
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


def weight_average(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s weights and batch-norm buffers (``update_parameters(model)``
    after each step), for validating and saving in place of the last step's weights."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def fit(cfg: TrainConfig, run_dir: Path, rng: np.random.Generator, model: nn.Module,
        optimizer: torch.optim.Optimizer, *, batches: Callable[[], Iterable[Any]],
        step: Callable[[Any], dict[str, torch.Tensor | float]],
        validate: Callable[[nn.Module], dict[str, float]] | None,
        save_best: Callable[[nn.Module, int, dict[str, float | None]], None],
        steps_per_epoch: int | None = None, key: str = "model", train_mode: Callable[[], None] | None = None,
        resume: bool = False, progress: bool = True, epochs_this_run: int | None = None,
        after_step: Callable[[], None] | None = None, main_process: bool = True) -> list[dict]:
    """Train ``model`` for ``cfg.epochs`` epochs in ``run_dir``, or continue them from its ``last.pt``
    (``resume``); returns the history, one row per epoch so far.

    Args:
        rng: the run's numpy generator (``start``), saved and restored with the checkpoint.
        batches: one epoch's ``steps_per_epoch`` batches (default ``cfg.iters_per_epoch``), drawn lazily.
        step: a batch's losses: "loss" is minimised; every entry is averaged over the epoch into the log.
        validate: the validated model's score per dataset and "mean" (higher is better); None when there is no
            validation image: every epoch is then kept, so the last one is what remains.
        save_best: writes the model of an epoch that is kept: (validated model, epoch from 1, scores).
        key: the model's key in ``last.pt``; with ``cfg.ema_decay``, an exponential moving average of the
            weights, kept under "ema", is what is validated and saved (the epoch-to-epoch swings of a small
            validation split then pick less of a lucky epoch).
        train_mode: puts the model in training mode at each epoch's start (default ``model.train()``).
        epochs_this_run: stop after this many epochs (a time-boxed job; continue it with ``resume``).
        after_step: called after each optimiser step (a teacher's moving average follows the student).
        main_process: False in the other processes of a distributed run: they train, the main one writes.
    """
    steps = steps_per_epoch or cfg.iters_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, cfg.epochs * steps, cfg.warmup_iters))
    modules = {key: model}
    ema = None
    if getattr(cfg, "ema_decay", None) is not None:
        ema = modules["ema"] = weight_average(model, cfg.ema_decay)
    scored = ema.module if ema is not None else model
    first, best, history = restore(run_dir, cfg, modules, optimizer, scheduler, rng) if resume else (0, -1.0, [])
    if main_process:
        write_json(run_dir / "config.json", cfg.to_dict())
    stop = cfg.epochs if epochs_this_run is None else min(cfg.epochs, first + epochs_this_run)
    for epoch in range(first, stop):
        started = time.perf_counter()
        (train_mode or model.train)()
        sums: dict[str, float] = {}
        bar = tqdm(batches(), total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress)
        for batch in bar:
            losses = step(batch)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            if after_step is not None:
                after_step()
            values = {name: value.item() if torch.is_tensor(value) else float(value) for name, value in losses.items()}
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value
            bar.set_postfix({name: f"{value:.4f}" for name, value in values.items()})
        scored.eval()
        validating = time.perf_counter()
        scores = validate(scored) if validate is not None else {"mean": None}
        history.append(_finite({"epoch": epoch + 1, **{name: total / steps for name, total in sums.items()},
                                "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - started,
                                "val_seconds": time.perf_counter() - validating,
                                **{f"val_f1_{name}": value for name, value in scores.items()}}))
        if validate is None or scores["mean"] > best:  # without validation every epoch is kept: the last remains
            if validate is not None:
                best = scores["mean"]
            if main_process:
                save_best(scored, epoch + 1, scores)
        if main_process:
            save_epoch(run_dir, cfg.to_dict(), modules, optimizer, scheduler, rng, epoch, best, history, progress)
    return history


def _finite(row: dict) -> dict:
    """``row`` with None for a value that is not a finite number (a diverged loss): the log stays JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
