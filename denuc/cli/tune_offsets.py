"""`denuc tune-offsets`: tune a bundle's class decisions on validation splits and save the tuned bundle.

Offsets added to each head's logits are chosen to maximise the validation mean class F1 end to end: by default
only the "not a nucleus" one (how readily detections are rejected); with --outputs all, every class's too,
which fits the validation split's class mix (use it when that mix is the one of your data).
``train-classifier`` tunes after training; use this on a bundle trained elsewhere or for a new validation set
with the same classes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from denuc.cli.options import dataset_specs, device, output_file


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tune-offsets", help=__doc__.split(": ", 1)[1].splitlines()[0],
                              description=__doc__.split(": ", 1)[1])
    p.add_argument("model", help="the bundle to tune (a file, or a shipped name such as default-bundle)")
    p.add_argument("--dataset", action="append", required=True, metavar="NAME=ROOT",
                   help="a dataset whose validation split tunes the head of the same name (repeatable)")
    p.add_argument("--outputs", choices=("nucleus", "all"), default="nucleus",
                   help="which offsets move: 'not a nucleus' only (default) or every output")
    p.add_argument("--out", type=Path, required=True, help="where to write the tuned bundle")
    p.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists (else refused)")
    p.add_argument("--device", type=device, default="cpu",
                   help="where the bundle's networks run: cpu, cuda or cuda:N (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from denuc.errors import InputError
    from denuc.hub import resolve
    from denuc.train.offsets import tune_offsets

    if args.out.is_file() and args.out.samefile(resolve(args.model, kind="bundle")):
        raise InputError(args.out, "is the input bundle; write the tuned bundle to another file")
    output_file(args.out, args.overwrite)
    chosen = tune_offsets(args.model, dataset_specs(args.dataset), args.out, args.outputs, device=args.device)
    for name, c in chosen.items():
        print(f"{name}: offsets {c['offsets']} (classes, then not a nucleus); validation mean class F1 "
              f"{c['val_f1_before']:.4f} -> {c['val_f1_after']:.4f}")
    print(f"model: {args.out}")
    return 0
