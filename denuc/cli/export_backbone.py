"""`denuc export-backbone`: write a detector's backbone as a torchvision weights file, to start an encoder from.

The detector learnt nuclei from every training point, classified or not; a classifier whose encoder starts from
its backbone instead of random weights learns the classes faster (CLASSIFIER_CARD.md). The file is the state dict
of the torchvision network the backbone was cut from (``torchvision:<backbone>``, e.g. shufflenet_v2_x1_0);
layers the detector lacks keep torchvision's initialisation (seed 0) and are never run by an encoder cut at the
stages:

    denuc export-backbone default --out backbone.safetensors
    denuc train-classifier ... --encoder torchvision:shufflenet_v2_x1_0 --weights backbone.safetensors \\
        --layers maxpool,stage2,stage3,stage4 --mode full
"""

from __future__ import annotations

import argparse
from pathlib import Path

from denuc.cli.options import output_file


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export-backbone", help=__doc__.split(": ", 1)[1].splitlines()[0],
                              description=__doc__.split(": ", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the detector: a shipped name (default, fast, stain-robust, or a tag: denuc models) "
                                 "or a .safetensors file (a bundle gives its detector's)")
    p.add_argument("--out", type=Path, required=True, help="the weights file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists (else refused)")


def run(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from denuc.errors import InputError
    from denuc.hub import describe
    from denuc.inference.detect import Detector
    from denuc.io.atomic import atomic_path

    if args.out.suffix != ".safetensors":
        raise InputError(args.out, "the output must be a .safetensors file")
    output_file(args.out, args.overwrite)
    backbone = Detector.from_pretrained(args.model).model.backbone
    state = {k: v.contiguous() for k, v in backbone.torchvision_state_dict().items()}
    with atomic_path(args.out) as tmp:
        save_file(state, str(tmp), metadata={"torchvision_model": backbone.name, "source": str(args.model),
                                             "source_sha256": describe(args.model)["sha256"]})
    print(f"torchvision:{backbone.name} weights ({len(state)} tensors): {args.out}")
    return 0
