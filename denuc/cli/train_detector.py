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
    p.add_argument("--backbone", help=f"shufflenet_v2_x{{0_5,1_0,1_5,2_0}} or resnet50 (default: {model.backbone})")
    p.add_argument("--head-stride", type=int, choices=(4, 8), help=f"(default: {model.head_stride})")
    p.add_argument("--head-separable", action="store_const", const=True,
                   help="depthwise-separable 3x3 convs in the head: a faster network (DETECTOR_CARD.md)")
    p.add_argument("--mpp", type=float, help=f"working resolution of the model in um/px (default: {model.mpp})")
    p.add_argument("--init", help="fine-tune: start from this detector (a shipped name such as 'default', or a "
                                  ".safetensors file); the model's architecture and pixel size are its own")
    p.add_argument("--color-jitter", type=float, default=train.color_jitter,
                   help="strength of the stain (HED), brightness and contrast jitter")
    p.add_argument("--stain-vector-jitter", type=float, default=train.stain_vector_jitter, metavar="S",
                   help="noise (standard deviation per component) on the haematoxylin and eosin colour vectors the "
                        "crops are rebuilt with: other labs' stain hues (0.1 turns them by 6-7 degrees on average; "
                        "default: 0, off)")
    p.add_argument("--randstainna", type=float, default=train.randstainna, metavar="P",
                   help="probability that a crop is re-stained to a template drawn from the training images' "
                        "CIELAB colour statistics (RandStainNA) before the jitter (default: 0, off)")
    p.add_argument("--scale-jitter", type=float, default=train.scale_jitter,
                   help="crops are rescaled by a random factor in [1 - j, 1 + j]")
    p.add_argument("--ema-decay", type=float, help="validate and save an exponential moving average of the "
                                                    "weights with this decay per iteration, e.g. 0.998 (default: off)")
    p.add_argument("--backbone-weights", help="an ImageNet checkpoint (state dict) of the torchvision backbone, "
                                              "loaded with strict key checking")


def run(args: argparse.Namespace) -> int:
    from denuc.config import DetectorConfig, DetectorTrainConfig
    from denuc.inference.detect import Detector
    from denuc.train.detector import train_detector, tune_thresholds
    from denuc.errors import InputError

    architecture = {k: v for k, v in (("backbone", args.backbone), ("head_stride", args.head_stride),
                                      ("head_separable", args.head_separable), ("mpp", args.mpp)) if v is not None}
    if args.init is not None:
        if architecture:
            raise InputError("--init", f"a fine-tuned model keeps the architecture of {args.init}: "
                                       f"drop {', '.join('--' + k.replace('_', '-') for k in architecture)}")
        model = Detector.from_pretrained(args.init).config
    else:
        model = DetectorConfig(**architecture)
    specs = dataset_specs(args.dataset)
    try:
        cfg = DetectorTrainConfig(
            datasets=specs, model=model,
            epochs=args.epochs, iters_per_epoch=args.iters_per_epoch, batch_size=args.batch_size,
            crop_size=args.crop_size, seed=args.seed, threads=args.threads, lr=args.lr,
            weight_decay=args.weight_decay, init=args.init, backbone_weights=args.backbone_weights,
            ema_decay=args.ema_decay, color_jitter=args.color_jitter,
            stain_vector_jitter=args.stain_vector_jitter, scale_jitter=args.scale_jitter,
            randstainna=args.randstainna,
        )
    except ValueError as error:
        raise InputError("options", str(error)) from None
    best = train_detector(cfg, args.run_dir, resume=args.resume, progress=not args.quiet)
    chosen = tune_thresholds(best, cfg, args.run_dir / "model.safetensors")
    print(f"model: {args.run_dir / 'model.safetensors'} (validation: {chosen})")
    return 0
