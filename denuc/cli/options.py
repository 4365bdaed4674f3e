"""Options the sub-commands share: sources, run folder, the numbers of a training recipe, the checked number and
device types (a bad value is refused when the command line is read, naming the option), and the checks of an
output (--out) made before any work: one rule for all, an existing output is refused unless --overwrite."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from denuc.config import MPP_AUTO, DatasetSpec
from denuc.errors import InputError, OutputExistsError


def number(kind: type, low: float | None = None, high: float | None = None, *, open_low: bool = False,
           open_high: bool = False) -> Callable[[str], int | float]:
    """An argparse ``type``: a finite ``kind`` (int or float) between ``low`` and ``high`` (None: unbounded),
    each bound included unless ``open_low`` / ``open_high``; argparse names the option when it is refused."""
    if low is not None and high is not None:
        wanted = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    elif low is not None:
        wanted = f"{'>' if open_low else '>='} {low:g}"
    else:
        wanted = f"{'<' if open_high else '<='} {high:g}"
    what = "a whole number" if kind is int else "a number"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} {wanted}, got {text!r}") from None
        if (not math.isfinite(value) or (low is not None and (value <= low if open_low else value < low))
                or (high is not None and (value >= high if open_high else value > high))):
            raise argparse.ArgumentTypeError(f"must be {what} {wanted}, got {text}")
        return value

    return parse


COUNT = number(int, 1)
FRACTION = number(float, 0, 1, open_high=True)  # a jitter strength: 0 (off) up to, not including, 1
PROBABILITY = number(float, 0, 1)
DECAY = number(float, 0, 1, open_low=True, open_high=True)
POSITIVE = number(float, 0, open_low=True)
NON_NEGATIVE = number(int, 0)  # a count that may be 0: worker threads, bootstrap resamples; a seed
NON_NEGATIVE_REAL = number(float, 0)  # a weight or a decay that may be 0


def pixel_size(text: str) -> float | str:
    """An argparse ``type`` for --mpp: a pixel size in um/px (> 0), or ``auto`` (``MPP_AUTO``: estimated from
    each image)."""
    if text == MPP_AUTO:
        return text
    try:
        return POSITIVE(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error}; or {MPP_AUTO}: estimated from each image") from None


RECIPE_NUMBERS = {"epochs": COUNT, "iters_per_epoch": COUNT, "batch_size": COUNT, "crop_size": number(int, 64),
                  "lora_rank": COUNT, "seed": number(int, 0), "threads": number(int, 0), "lr": POSITIVE,
                  "weight_decay": NON_NEGATIVE_REAL, "warmup_iters": NON_NEGATIVE}
"""The checked type of each recipe number the training commands take."""


OPTIMISER_HELPS = {
    "lr": "peak learning rate of AdamW, reached after a linear warm-up, then a cosine decay (default: %(default)s)",
    "weight_decay": "AdamW weight decay (default: %(default)s)",
    "threads": "CPU threads for torch (default: %(default)s, torch's choice)",
}
"""The help texts of the options every training command has (``add_training_options`` adds them)."""


def add_training_options(p: argparse.ArgumentParser, train: object, helps: dict[str, str], *, dataset_help: str,
                         run_dir_help: str, dataset_required: bool = True,
                         overwrite_help: str = "start again in a --run-dir that holds a trained run (its model, "
                                               "checkpoint and logs are deleted); without --resume or --overwrite "
                                               "such a folder is refused") -> None:
    """--dataset (``dataset_required``, else it defaults to none), --run-dir, --resume / --overwrite, --quiet,
    --lr, --weight-decay, --threads (``OPTIMISER_HELPS``), and one option per field of ``train`` named in ``helps``
    (a key of ``RECIPE_NUMBERS``; its help text may show the default, the dataclass's value, with
    ``%(default)s``)."""
    p.add_argument("--dataset", action="append", required=dataset_required, default=[], metavar="NAME=ROOT",
                   help=dataset_help)
    p.add_argument("--run-dir", type=Path, required=True, help=run_dir_help)
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the interrupted run in --run-dir exactly (same options)")
    again.add_argument("--overwrite", action="store_true", help=overwrite_help)
    for name, text in (helps | OPTIMISER_HELPS).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=RECIPE_NUMBERS[name], default=getattr(train, name),
                       help=text)
    p.add_argument("--quiet", action="store_true", help="no progress bars nor per-epoch rows")


def device(text: str) -> str:
    """An argparse ``type``: a torch device this machine has (cpu, cuda, cuda:N, mps); argparse names the option and
    this lists the devices there are when it is refused."""
    if text == "cpu":
        return text  # the default: checked on every command line, so without importing torch
    import torch

    available = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    available += ["mps"] if torch.backends.mps.is_available() else []
    if text in available or (text == "cuda" and "cuda:0" in available):
        return text
    kind = text.split(":")[0]
    why = "not available on this machine" if kind in ("cuda", "mps") else "not a device name (cpu, cuda, cuda:N, mps)"
    raise argparse.ArgumentTypeError(f"{text!r} is {why}; the devices here: {', '.join(available)}")


def output_folder(path: Path) -> Path:
    """``path`` (``--out``) as a folder to write into: refused when it is a file or cannot be written."""
    if path.exists() and not path.is_dir():
        raise InputError(path, "is a file; --out takes a folder")
    _check_writable(path)
    return path


def output_file(path: Path, overwrite: bool) -> Path:
    """``path`` (``--out``) as one file to write: refused when it is a folder, cannot be written, or exists and
    ``overwrite`` (--overwrite) is not set."""
    if path.is_dir():
        raise InputError(path, "is a folder; --out takes a file name")
    if path.exists() and not overwrite:
        raise OutputExistsError(path, "exists: pass --overwrite to replace it, or choose another --out")
    _check_writable(path.parent)
    return path


def _check_writable(folder: Path) -> None:
    """Refuse a folder that cannot be created or written into (checked on its nearest existing parent)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(existing, f"is a file, so {folder} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "permission denied"
        raise InputError(folder, f"cannot be written ({why})")


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


def encoder_kwargs(text: str | None, encoder: str) -> dict:
    """--encoder-kwargs: JSON architecture overrides; without it ``{"num_classes": 0}`` for a timm encoder (no
    classifier layer), none for the others."""
    if text is None:
        return {"num_classes": 0} if encoder.startswith("timm:") else {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError("--encoder-kwargs", f"not JSON: {error}") from None
    if not isinstance(kwargs, dict):
        raise InputError("--encoder-kwargs", f"must be a JSON object of keyword arguments, got {text}")
    return kwargs


def encoder_layers(text: str | None) -> list[int] | list[str] | None:
    """--layers: comma-separated feature levels, indices (timm) or node names (torchvision); None: the default."""
    if not text:
        return None
    return [int(v) if v.lstrip("-").isdigit() else v for v in text.split(",")]


def add_colour_options(p: argparse.ArgumentParser, train: object, applies_to: str = "") -> None:
    """--color-jitter, --stain-vector-jitter and --randstainna: the training crops' colour augmentations, with
    ``train``'s values as defaults; ``applies_to`` starts each help text (e.g. the modes that use them)."""
    p.add_argument("--color-jitter", type=FRACTION, default=train.color_jitter, metavar="J",
                   help=f"{applies_to}strength of the crops' stain (HED), brightness and contrast jitter, in [0, 1) "
                        "(default: %(default)s)")
    p.add_argument("--stain-vector-jitter", type=FRACTION, default=train.stain_vector_jitter, metavar="S",
                   help=f"{applies_to}noise (standard deviation per component) on the haematoxylin and eosin colour "
                        "vectors the crops are rebuilt with: other labs' stain hues (0.1 turns them by 6-7 degrees on "
                        "average; default: %(default)s, off)")
    p.add_argument("--randstainna", type=PROBABILITY, default=train.randstainna, metavar="P",
                   help=f"{applies_to}probability that a crop is re-stained to a template drawn from the training "
                        "images' CIELAB colour statistics (RandStainNA) before the jitter (default: %(default)s, off)")
