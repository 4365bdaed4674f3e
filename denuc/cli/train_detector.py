"""`denuc train-detector`: train a point detector on one or more datasets, then tune its thresholds.

Each epoch is --iters-per-epoch batches of random crops (not a pass over the images); after each, the model is
scored on the datasets' validation splits and the best epoch is kept. The score thresholds (one for 20x scans, and
one for 40x scans when both kinds of datasets are given) and the NMS radius are then chosen on the validation splits
(without one, the last epoch is kept with its settings).
"""

from __future__ import annotations

import argparse
import dataclasses

from denuc.cli.options import (
    DECAY,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    add_colour_options,
    add_training_options,
    dataset_specs,
    device,
)

DEFAULT_BACKBONE = "shufflenet_v2_x1_0"
"""The width of the shipped default detector: what a run trains unless told otherwise."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from denuc.config import DetectorConfig, DetectorTrainConfig

    model, train = DetectorConfig(), DetectorTrainConfig()
    p = subparsers.add_parser("train-detector", help=__doc__.split(": ", 1)[1].splitlines()[0],
                              description=__doc__.split(": ", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_options(p, train, {
        "epochs": "epochs to train; one epoch is --iters-per-epoch batches of random crops, then a validation "
                  "(default: %(default)s)",
        "iters_per_epoch": "batches (iterations) per epoch (default: %(default)s)",
        "batch_size": "crops per batch (default: %(default)s)",
        "crop_size": "side of the square training crops, in pixels at the working resolution (default: %(default)s)",
        "seed": "seed of the crops and of the weights' initialisation (default: %(default)s)",
        "warmup_iters": "iterations of the learning rate's linear warm-up (default: %(default)s)",
    }, dataset_help="a training source, e.g. brcam2c=/data/brcam2c (repeat for joint training)",
        run_dir_help="checkpoints (last.pt), logs (log.json, log.csv), the best epoch (best.safetensors) and the "
                     "tuned model (model.safetensors) go here")
    p.add_argument("--backbone", help="shufflenet_v2_x{0_5,1_0,1_5,2_0} or resnet50 (default: "
                                      f"{DEFAULT_BACKBONE}, the shipped default detector's width; "
                                      "shufflenet_v2_x0_5 is the faster 'fast' one's)")
    p.add_argument("--head-stride", type=int, choices=(4, 8), help=f"(default: {model.head_stride})")
    p.add_argument("--head-separable", action="store_const", const=True,
                   help="depthwise-separable 3x3 convs in the head: a faster network (DETECTOR_CARD.md)")
    p.add_argument("--mpp", type=POSITIVE, help=f"working resolution of the model in um/px (default: {model.mpp}; "
                                                    "with --init, that model's)")
    p.add_argument("--init", help="fine-tune: start from this detector (a shipped name such as 'default', or a "
                                  ".safetensors file); the model's architecture is its own (a stride-8 head may "
                                  "become a stride-4 one with --head-stride 4), and its pixel size unless --mpp is "
                                  "given")
    add_colour_options(p, train)
    p.add_argument("--sampling", choices=("image", "dataset"), default=train.sampling,
                   help="where crops come from: 'image' (every training image alike) or 'dataset' (every dataset "
                        "alike, then images by area: for several datasets of very different sizes; default: "
                        "%(default)s)")
    p.add_argument("--crowded-crops", type=PROBABILITY, default=train.crowded_crops, metavar="P",
                   help="probability that a crop is drawn around a crowded ground-truth nucleus (>= 3 others within "
                        "8 um) of the image picked, so that dense clusters are seen more often (default: "
                        "%(default)s, off)")
    p.add_argument("--one-to-one-matching", action="store_true",
                   help="in the loss, give every ground-truth nucleus anchors of its own (Hungarian assignment) "
                        "instead of letting the nearer claim win an anchor two nuclei want (default: off)")
    p.add_argument("--cut-nucleus-radius", type=float, default=train.cut_nucleus_radius_um, metavar="UM",
                   help="label a nucleus cut by a crop's edge at the centre of its part inside the crop, as a disc of "
                        "this radius in um (less than a fifth inside: no nucleus), as annotators label nuclei cut by "
                        "an image's border (default: %(default)s, off: its whole centre, none if outside)")
    p.add_argument("--scale-jitter", type=FRACTION, default=train.scale_jitter, metavar="J",
                   help="crops are rescaled by a random factor in [1 - J, 1 + J] (default: %(default)s)")
    p.add_argument("--ema-decay", type=DECAY, metavar="D",
                   help="validate and save an exponential moving average of the weights with this decay per "
                        "iteration, e.g. 0.998 (default: off)")
    p.add_argument("--device", type=device, default="cpu",
                   help="where the network trains: cpu, cuda or cuda:N (on a GPU in bfloat16; default: %(default)s)")
    p.add_argument("--workers", type=NON_NEGATIVE, default=0,
                   help="processes that draw and augment the crops, the same crops as without them (default: "
                        "%(default)s, in the training one); a GPU wants several")
    p.add_argument("--backbone-weights", help="an ImageNet checkpoint (state dict) of the torchvision backbone, "
                                              "loaded with strict key checking (default: random initialisation)")


def run(args: argparse.Namespace) -> int:
    from denuc.config import DetectorConfig, DetectorTrainConfig
    from denuc.errors import InputError
    from denuc.inference.detect import Detector
    from denuc.models.detector import BACKBONES
    from denuc.train.detector import train_detector, tune_thresholds

    if args.backbone is not None and args.backbone not in BACKBONES:
        raise InputError("--backbone", f"unknown backbone {args.backbone!r}; choose from {sorted(BACKBONES)}")
    architecture = {k: v for k, v in (("backbone", args.backbone), ("head_stride", args.head_stride),
                                      ("head_separable", args.head_separable), ("mpp", args.mpp)) if v is not None}
    if args.init is not None:
        # the weights' shapes are the initial model's; only its working resolution may change (--mpp: fine-tune
        # at another pixel size, e.g. a finer one for crowded nuclei), and a stride-8 head may become a stride-4 one
        # (--head-stride 4: anchors twice as dense; its two new layers start at random, train.detector.initial_model)
        fixed = [k for k in architecture if k not in ("mpp", "head_stride")]
        if fixed:
            raise InputError("--init", f"a fine-tuned model keeps the architecture of {args.init}: "
                                       f"drop {', '.join('--' + k.replace('_', '-') for k in fixed)}")
        model = dataclasses.replace(Detector.from_pretrained(args.init).config, **architecture)
    else:
        model = DetectorConfig(**{"backbone": DEFAULT_BACKBONE, **architecture})
    specs = dataset_specs(args.dataset)
    try:
        cfg = DetectorTrainConfig(
            datasets=specs, model=model,
            epochs=args.epochs, iters_per_epoch=args.iters_per_epoch, batch_size=args.batch_size,
            crop_size=args.crop_size, seed=args.seed, threads=args.threads, lr=args.lr,
            warmup_iters=args.warmup_iters,
            weight_decay=args.weight_decay, init=args.init, backbone_weights=args.backbone_weights,
            ema_decay=args.ema_decay, color_jitter=args.color_jitter,
            stain_vector_jitter=args.stain_vector_jitter, scale_jitter=args.scale_jitter,
            randstainna=args.randstainna, sampling=args.sampling, crowded_crops=args.crowded_crops,
            cut_nucleus_radius_um=args.cut_nucleus_radius, match_one_to_one=args.one_to_one_matching,
        )
    except ValueError as error:
        raise InputError("options", str(error)) from None
    best = train_detector(cfg, args.run_dir, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite,
                          device=args.device, workers=args.workers)
    chosen = tune_thresholds(best, cfg, args.run_dir / "model.safetensors", device=args.device)
    if chosen is None:
        settings = ""
    else:
        fine = chosen["score_threshold_40x"]
        thresholds = (f"score threshold {chosen['score_threshold']}" if fine is None else
                      f"score thresholds {chosen['score_threshold']} (20x scans) and {fine} (40x scans)")
        settings = (f" (chosen on validation: {thresholds}, NMS radius {chosen['nms_radius_um']} um, "
                    f"mean F1 {chosen['mean']:.4f})")
    print(f"model: {args.run_dir / 'model.safetensors'}{settings}")
    return 0
