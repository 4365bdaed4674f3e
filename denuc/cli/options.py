"""Options the training sub-commands share: sources, run folder, and the numbers of a training recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from denuc.config import DatasetSpec
from denuc.errors import InputError


def add_training_options(p: argparse.ArgumentParser, train: object, int_names: tuple[str, ...], *,
                         dataset_help: str, run_dir_help: str) -> None:
    """--dataset, --run-dir, --resume, --quiet, and one option per named integer field of ``train`` plus
    --lr and --weight-decay, with the dataclass's values as defaults."""
    p.add_argument("--dataset", action="append", required=True, metavar="NAME=ROOT", help=dataset_help)
    p.add_argument("--run-dir", type=Path, required=True, help=run_dir_help)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --run-dir exactly")
    for name in int_names:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(train, name))
    for name in ("lr", "weight_decay"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(train, name))
    p.add_argument("--quiet", action="store_true")


def dataset_specs(values: list[str]) -> list[DatasetSpec]:
    """The --dataset values as specs; a malformed one is the user's input error."""
    try:
        specs = [DatasetSpec.parse(item) for item in values]
    except ValueError as error:
        raise InputError("--dataset", str(error)) from None
    names = [spec.name.lower() for spec in specs]
    if len(set(names)) != len(names):  # runs key validation scores and heads by dataset name
        raise InputError("--dataset", f"each dataset name may appear once, got {names}; put your images in one "
                                      "points folder")
    return specs
