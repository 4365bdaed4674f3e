"""`denuc pretrain`: pretrain an encoder on unlabelled H&E by nucleus-level self-distillation (MUSE's NuLo).

A teacher (a moving average of the student) and the student see two views of one tissue region at different
pixel sizes; the student learns to give, for the region and for each nucleus both views show (found by the
detector), the teacher's scores for the other view. Slides are cut into tissue regions; images are taken whole.
The result, --run-dir/encoder.safetensors, is the encoder's weights: train a classifier on it with
`denuc train-classifier --encoder <the same> --weights <run-dir>/encoder.safetensors` (and the same
--encoder-kwargs and --layers). On several GPUs: torchrun --nproc-per-node N -m denuc.cli pretrain ...
--device cuda. See docs/pretraining.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from denuc.cli.options import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    NON_NEGATIVE_REAL,
    POSITIVE,
    add_training_options,
    dataset_specs,
    device,
    encoder_kwargs,
    encoder_layers,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from denuc.config import PretrainConfig

    cfg = PretrainConfig()
    p = subparsers.add_parser("pretrain", help=__doc__.split(": ", 1)[1].splitlines()[0],
                              description=__doc__.split(": ", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", nargs="+", action="extend", type=Path, default=[], metavar="PATH",
                   help="slides (SVS, NDPI, MRXS, tiled TIFF, DICOM, ...), images, or folders of them (searched "
                        "recursively); never your validation or test images")
    add_training_options(p, cfg, {
        "epochs": "epochs to train (default: %(default)s)",
        "iters_per_epoch": "optimiser steps per epoch (default: %(default)s)",
        "batch_size": "view pairs per step, per process (default: %(default)s)",
        "crop_size": "side of each view in pixels (default: %(default)s)",
        "warmup_iters": "steps of learning-rate warm-up (default: %(default)s)",
        "seed": "seed of the initialisation and of the views (default: %(default)s)",
    }, dataset_required=False,
        dataset_help="also the train split's images of an annotated dataset, labels unused, e.g. "
                     "brcam2c=/data/brcam2c (repeatable)",
        run_dir_help="the encoder weights (encoder.safetensors), checkpoint, logs and found nuclei go here",
        overwrite_help="start again in a --run-dir that holds a run (its weights, checkpoint and logs are deleted; "
                       "the nuclei found are kept); without --resume or --overwrite it is refused")
    p.add_argument("--mpp", type=POSITIVE, help="pixel size (um/px) of the --images whose files state none")
    p.add_argument("--encoder", default=cfg.encoder,
                   help="uni2-h, uni, virchow2, h-optimus-0, timm:<model> or torchvision:<model> "
                        "(default: %(default)s)")
    p.add_argument("--weights", help="start from this weights file of the encoder (default: random initialisation)")
    p.add_argument("--encoder-kwargs", metavar="JSON",
                   help='architecture overrides (default {"num_classes": 0} for timm models, none otherwise)')
    p.add_argument("--layers", help="comma-separated feature levels read at the nuclei (default: the encoder's)")
    p.add_argument("--detector", default=cfg.detector,
                   help="the detector that finds the nuclei: a shipped name or a file (default: %(default)s)")
    p.add_argument("--device", type=device, default="cpu",
                   help="cpu, cuda or cuda:N (under torchrun each process takes its LOCAL_RANK's GPU; "
                        "default: %(default)s)")
    p.add_argument("--workers", type=NON_NEGATIVE, default=0,
                   help="processes that read and augment the views (default: %(default)s, in the training one)")
    p.add_argument("--view-mpp", type=POSITIVE, default=cfg.mpp,
                   help="pixel size of the first view: the classifier's working resolution (default: %(default)s)")
    p.add_argument("--other-mpp", type=POSITIVE, nargs=2, default=list(cfg.other_mpp), metavar=("LOW", "HIGH"),
                   help="range of the second view's pixel size, drawn log-uniformly (default: %(default)s)")
    p.add_argument("--region-um", type=POSITIVE, default=cfg.region_um,
                   help="side of the regions slides are cut into, um (default: %(default)s)")
    p.add_argument("--regions-per-source", type=COUNT, default=cfg.regions_per_source,
                   help="at most this many regions of one slide, drawn at random (default: %(default)s)")
    p.add_argument("--max-nuclei", type=COUNT, default=cfg.max_nuclei,
                   help="nuclei per view pair in the nucleus-level loss (default: %(default)s)")
    p.add_argument("--prototypes", type=COUNT, default=cfg.prototypes,
                   help="outputs of each DINO head (default: %(default)s)")
    p.add_argument("--momentum-teacher", type=POSITIVE, default=cfg.momentum_teacher,
                   help="the teacher's starting EMA momentum, raised to 1 along a cosine (default: %(default)s)")
    p.add_argument("--teacher-temp", type=POSITIVE, default=cfg.teacher_temp,
                   help="the teacher's temperature after its warm-up; lower sharpens its targets, the cure for "
                        "targets near uniform (docs/pretraining.md; default: %(default)s)")
    p.add_argument("--warmup-teacher-temp", type=POSITIVE, default=cfg.warmup_teacher_temp,
                   help="the teacher's temperature at the start, rising linearly (default: %(default)s)")
    p.add_argument("--teacher-temp-warmup-epochs", type=NON_NEGATIVE, default=cfg.teacher_temp_warmup_epochs,
                   help="epochs of that rise (default: %(default)s)")
    p.add_argument("--center-momentum", type=FRACTION, default=cfg.center_momentum,
                   help="momentum of the running mean subtracted from the teacher's scores; lower follows the "
                        "batches faster (default: %(default)s)")
    p.add_argument("--image-loss-weight", type=NON_NEGATIVE_REAL, default=cfg.image_loss_weight,
                   help="weight of the image-level loss (default: %(default)s)")
    p.add_argument("--nucleus-loss-weight", type=NON_NEGATIVE_REAL, default=cfg.nucleus_loss_weight,
                   help="weight of the nucleus-level loss (default: %(default)s)")
    p.add_argument("--color-jitter", type=FRACTION, default=cfg.color_jitter, metavar="J",
                   help="strength of each view's stain (HED), brightness and contrast jitter (default: %(default)s)")
    p.add_argument("--stain-vector-jitter", type=FRACTION, default=cfg.stain_vector_jitter, metavar="S",
                   help="noise on the H and E colour vectors each view is rebuilt with (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from denuc.cli.predict import collect_inputs
    from denuc.config import PretrainConfig
    from denuc.errors import InputError
    from denuc.train.pretrain import pretrain

    if not args.images and not args.dataset:
        raise InputError("", "nothing to learn from: give --images (slides, images, folders) or --dataset")
    images = [str(path.resolve()) for path in collect_inputs(args.images)]
    specs = dataset_specs(args.dataset)
    try:
        cfg = PretrainConfig(
            images=images, images_mpp=args.mpp, datasets=specs, encoder=args.encoder,
            encoder_weights=None if args.weights is None else str(Path(args.weights).resolve()),
            encoder_layers=encoder_layers(args.layers), encoder_kwargs=encoder_kwargs(args.encoder_kwargs,
                                                                                       args.encoder),
            detector=args.detector, mpp=args.view_mpp, other_mpp=tuple(args.other_mpp), crop_size=args.crop_size,
            region_um=args.region_um, regions_per_source=args.regions_per_source, max_nuclei=args.max_nuclei,
            epochs=args.epochs, iters_per_epoch=args.iters_per_epoch, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, warmup_iters=args.warmup_iters, momentum_teacher=args.momentum_teacher,
            teacher_temp=args.teacher_temp, warmup_teacher_temp=args.warmup_teacher_temp,
            teacher_temp_warmup_epochs=args.teacher_temp_warmup_epochs, center_momentum=args.center_momentum,
            prototypes=args.prototypes, image_loss_weight=args.image_loss_weight,
            nucleus_loss_weight=args.nucleus_loss_weight, color_jitter=args.color_jitter,
            stain_vector_jitter=args.stain_vector_jitter, seed=args.seed, threads=args.threads)
    except ValueError as error:
        raise InputError("options", str(error)) from None
    path = pretrain(cfg, args.run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                    device=args.device, workers=args.workers)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the main process says where the weights are
        return 0
    layers = f" --layers {args.layers}" if args.layers else ""
    kwargs = f" --encoder-kwargs '{args.encoder_kwargs}'" if args.encoder_kwargs else ""
    print(f"encoder weights: {path}\n  use: denuc train-classifier --encoder {args.encoder} --weights {path}"
          f"{kwargs}{layers} ...")
    return 0
