"""`denuc train-outlines`: train an outline head on datasets with nucleus outlines (CoNSeP, MoNuSeg).

The head predicts each nucleus's star-convex outline at its point (docs/outlines.md). Each epoch is
--iters-per-epoch batches of nuclei from random crops (not a pass over the images); after each, the outlines
predicted at the validation splits' true centres are scored by their mean star IoU with the true ones, and the
best epoch is kept as best.safetensors (without a validation split, the last epoch). Use it with
`denuc predict --outlines RUN_DIR/best.safetensors`.
"""

from __future__ import annotations

import argparse

from denuc.cli.options import add_training_options, dataset_specs, device


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from denuc.config import OutlineTrainConfig

    train = OutlineTrainConfig()
    p = subparsers.add_parser("train-outlines", help=__doc__.split(": ", 1)[1].splitlines()[0],
                              description=__doc__.split(": ", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_options(p, train, {
        "epochs": "epochs to train; one epoch is --iters-per-epoch batches, then a validation (default: "
                  "%(default)s)",
        "iters_per_epoch": "batches (iterations) per epoch (default: %(default)s)",
        "batch_size": "nuclei per batch, drawn from 8 random crops: a multiple of 8, rounded down, at least 8 "
                      "(default: %(default)s)",
        "seed": "seed of the crops and of the weights' initialisation (default: %(default)s)",
    }, dataset_help="a dataset with nucleus outlines, consep=ROOT or monuseg=ROOT (repeat for joint training)",
        run_dir_help="checkpoints (last.pt), logs (log.json, log.csv) and the best epoch (best.safetensors) go here")
    p.add_argument("--detector", default=train.detector,
                   help="the detector whose feature maps the head reads, kept frozen inside it: a shipped name or a "
                        "detector file; outlines are cheapest behind this same detector (default: %(default)s)")
    p.add_argument("--device", type=device, default="cpu",
                   help="where the head trains: cpu, cuda or cuda:N (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from denuc.config import OutlineConfig, OutlineTrainConfig
    from denuc.errors import InputError
    from denuc.inference.detect import Detector
    from denuc.train.outlines import train_outline_head

    # the head works at its detector's pixel size (it reads the detector's maps)
    model = OutlineConfig().at_mpp(Detector.from_pretrained(args.detector).config.mpp)
    try:
        cfg = OutlineTrainConfig(datasets=dataset_specs(args.dataset), model=model, epochs=args.epochs,
                                 iters_per_epoch=args.iters_per_epoch, batch_size=args.batch_size, lr=args.lr,
                                 weight_decay=args.weight_decay, seed=args.seed, threads=args.threads,
                                 detector=args.detector)
    except ValueError as error:
        raise InputError("options", str(error)) from None
    history = train_outline_head(cfg, args.run_dir, resume=args.resume, overwrite=args.overwrite,
                                 progress=not args.quiet, device=args.device)
    # fit logs each validation score as val_f1_<dataset>; for this head the score is the mean star IoU
    scored = [row for row in history if row.get("val_f1_mean") is not None]
    best = max(scored, key=lambda row: row["val_f1_mean"]) if scored else None
    chosen = "" if best is None else (f" (epoch {best['epoch']}, validation mean star IoU "
                                      f"{best['val_f1_mean']:.4f})")
    print(f"model: {args.run_dir / 'best.safetensors'}{chosen}")
    return 0
