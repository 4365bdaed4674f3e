"""`denuc train-classifier`: train a nucleus classifier on detector outputs and save a model bundle.

Modes: frozen (the encoder's features are computed once and cached; only the head trains, and an epoch is one
pass over the cached points), lora or full (an epoch is --iters-per-epoch batches of random crops), or joint
(the end-to-end baseline: one network detects and classifies). After each epoch the classifier is scored end
to end on the datasets' validation splits and the best epoch is kept (without one, the last epoch).
--base adds heads for new taxonomies to an existing bundle (frozen mode): its detector, encoder and other heads
are kept as they are.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from denuc.cli.options import (
    DECAY,
    add_colour_options,
    add_training_options,
    dataset_specs,
    device,
    encoder_kwargs,
    encoder_layers,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from denuc.config import CLASSIFIER_MODES, HEADS, ClassifierConfig, ClassifierTrainConfig

    model, train = ClassifierConfig(), ClassifierTrainConfig()
    p = subparsers.add_parser("train-classifier", help=__doc__.split(": ", 1)[1].splitlines()[0],
                              description=__doc__.split(": ", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_options(p, train, {
        "epochs": "epochs to train (default: %(default)s)",
        "iters_per_epoch": "lora / full / joint: batches of random crops per epoch (frozen: an epoch is one pass "
                           "over the cached points; default: %(default)s)",
        "batch_size": "lora / full / joint: crops per batch; frozen: 128 x this many points per batch "
                      "(default: %(default)s)",
        "crop_size": "lora / full / joint: side of the square training crops, in pixels at the working "
                     "resolution (default: %(default)s)",
        "lora_rank": "lora: rank of the adapters (default: %(default)s)",
        "seed": "seed of the crops, batches and the heads' initialisation (default: %(default)s)",
    }, dataset_help="a training source, e.g. brcam2c=/data/brcam2c (repeat: one head per dataset's taxonomy)",
        run_dir_help="checkpoints, logs, caches and the bundle (model.safetensors) go here")
    p.add_argument("--base", default=None, metavar="BUNDLE",
                   help="a bundle (shipped name or file) to add heads to: one per --dataset taxonomy, replacing a "
                        "head of the same name; its detector, encoder (frozen: --mode frozen) and other heads are "
                        "kept as they are (default: a new classifier)")
    # None when not given: with --base, the options below come from the bundle and giving one is refused
    p.add_argument("--encoder", default=None,
                   help=f"uni2-h, uni, virchow2, h-optimus-0, timm:<model> or torchvision:<model> "
                        f"(default: {model.encoder})")
    p.add_argument("--weights", default=None, help="the encoder's weights file (default: random initialisation)")
    p.add_argument("--encoder-kwargs", default=None, metavar="JSON",
                   help=f"architecture overrides (default {json.dumps(model.encoder_kwargs)} for timm models, "
                        "none otherwise)")
    p.add_argument("--layers", default=None, help="comma-separated feature levels (default: the encoder's)")
    p.add_argument("--head", default=None, choices=HEADS,
                   help=f"(default: {model.head}; with --base, the kind of the heads trained, default the bundle's)")
    p.add_argument("--mode", default=train.mode, choices=CLASSIFIER_MODES,
                   help="frozen encoder + head, LoRA, full fine-tuning, or the joint end-to-end baseline "
                        "(default: %(default)s)")
    p.add_argument("--detector", default=None,
                   help=f"detector for the negatives and the bundle (default: {train.detector})")
    p.add_argument("--no-negatives", action="store_true", help="no 'not a nucleus' training examples")
    p.add_argument("--class-balanced", action="store_true", help="weight the loss by inverse class frequency")
    add_colour_options(p, train, "lora / full / joint: ")
    p.add_argument("--device", type=device, default="cpu",
                   help="where the detector and the classifier run: cpu, cuda or cuda:N (frozen: the features are "
                        "cached from there; lora / full: trained in bfloat16 on a GPU; not joint; default: "
                        "%(default)s)")
    p.add_argument("--ema-decay", type=DECAY, default=train.ema_decay, metavar="D",
                   help="full: validate and keep an exponential moving average of the weights with this decay "
                        "(0.999: about the last 1,000 iterations; default: off)")
    p.add_argument("--offsets", default=train.offsets, choices=("none", "nucleus", "all"),
                   help="after training, tune the heads' offsets on validation: 'not a nucleus' only (default), "
                        "every output (fits the validation class mix), or none")


def run(args: argparse.Namespace) -> int:
    from denuc import hub
    from denuc.config import ClassifierConfig, ClassifierTrainConfig
    from denuc.errors import InputError
    from denuc.train.classifier import train_classifier
    from denuc.train.joint import train_joint

    model, train = ClassifierConfig(), ClassifierTrainConfig()
    if args.base is not None:
        if args.mode != "frozen":
            raise InputError("--base", f"trains heads on the bundle's frozen encoder: use --mode frozen, not "
                                       f"{args.mode}")
        given = [option for option, value in (("--encoder", args.encoder), ("--weights", args.weights),
                                              ("--encoder-kwargs", args.encoder_kwargs), ("--layers", args.layers),
                                              ("--detector", args.detector))
                 if value is not None]
        if given:
            raise InputError("--base", f"the encoder, its levels and the detector come from the bundle: drop "
                                       f"{', '.join(given)}")
    # a shipped name stays a name; a file is recorded by its absolute path (a resumed run finds it from anywhere)
    base = args.base if args.base is None or hub.shipped(args.base, "bundle") else str(Path(args.base).resolve())
    specs = dataset_specs(args.dataset)
    encoder = args.encoder or model.encoder
    kwargs = encoder_kwargs(args.encoder_kwargs, encoder)
    layers = encoder_layers(args.layers)
    weights = None if args.weights is None else str(Path(args.weights).resolve())
    try:
        cfg = ClassifierTrainConfig(
            datasets=specs,
            model=ClassifierConfig(encoder=encoder, encoder_weights=weights, encoder_layers=layers,
                                   encoder_kwargs=kwargs,
                                   head=args.head if args.head and args.base is None else model.head),
            mode=args.mode, detector=args.detector or train.detector, base=base,
            base_head=args.head if args.base is not None else None, negatives=not args.no_negatives,
            class_balanced=args.class_balanced, offsets=args.offsets, epochs=args.epochs,
            iters_per_epoch=args.iters_per_epoch,
            batch_size=args.batch_size, crop_size=args.crop_size, lora_rank=args.lora_rank, seed=args.seed,
            threads=args.threads, lr=args.lr, weight_decay=args.weight_decay, color_jitter=args.color_jitter,
            stain_vector_jitter=args.stain_vector_jitter,
            randstainna=args.randstainna, ema_decay=args.ema_decay,
        )
    except ValueError as error:
        raise InputError("options", str(error)) from None
    if args.mode == "joint":
        if args.device != "cpu":
            raise InputError("--device", "the joint baseline trains on the CPU only: drop --device")
        path = train_joint(cfg, args.run_dir, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
    else:
        path = train_classifier(cfg, args.run_dir, resume=args.resume, progress=not args.quiet,
                                overwrite=args.overwrite, device=args.device)
    print(f"{'joint model' if args.mode == 'joint' else 'model'}: {path}")
    return 0
