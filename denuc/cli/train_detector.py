"""`denuc train-detector`: train a point detector on one or more datasets, then tune its thresholds."""

from __future__ import annotations

import argparse

from denuc.cli.options import add_training_options, dataset_specs


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from denuc.config import DetectorConfig, DetectorTrainConfig

    model, train = DetectorConfig(), DetectorTrainConfig()
    p = subparsers.add_parser("train-detector", help=__doc__.split(": ", 1)[1])
    add_training_options(p, train, ("epochs", "iters_per_epoch", "batch_size", "crop_size", "seed", "threads"),
                         dataset_help="a training source, e.g. brcam2c=/data/brcam2c (repeat for joint training)",
                         run_dir_help="checkpoints, logs and the trained model go here")
    p.add_argument("--backbone", default=model.backbone)
    p.add_argument("--head-stride", type=int, default=model.head_stride, choices=(4, 8))
    p.add_argument("--mpp", type=float, default=model.mpp, help="working resolution of the model (um/px)")


def run(args: argparse.Namespace) -> int:
    from denuc.config import DetectorConfig, DetectorTrainConfig
    from denuc.engine.train_detector import train_detector, tune_thresholds

    cfg = DetectorTrainConfig(
        datasets=dataset_specs(args.dataset),
        model=DetectorConfig(backbone=args.backbone, head_stride=args.head_stride, mpp=args.mpp),
        epochs=args.epochs, iters_per_epoch=args.iters_per_epoch, batch_size=args.batch_size,
        crop_size=args.crop_size, seed=args.seed, threads=args.threads, lr=args.lr, weight_decay=args.weight_decay,
    )
    best = train_detector(cfg, args.run_dir, resume=args.resume, progress=not args.quiet)
    chosen = tune_thresholds(best, cfg, args.run_dir / "model.safetensors")
    print(f"model: {args.run_dir / 'model.safetensors'} (validation: {chosen})")
    return 0
