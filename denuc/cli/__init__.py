"""The `denuc` command line: one sub-command per module in this package.

Each sub-command module defines ``add_parser(subparsers)`` and ``run(args) -> int``; ``options`` holds the
options the training commands share.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from denuc import __version__
from denuc.errors import InputError

SUBCOMMANDS = ["evaluate", "detect", "predict", "train-detector", "train-classifier", "tune-offsets", "export-backbone",
               "models"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="denuc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"denuc {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"denuc.cli.{name.replace('-', '_')}")
        module.add_parser(subparsers)
        modules[name] = module
    args = parser.parse_args(argv)
    args.command_line = list(sys.argv) if argv is None else ["denuc", *argv]  # recorded in outputs' summaries
    try:
        return modules[args.command].run(args)
    except InputError as error:
        print(f"denuc {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
