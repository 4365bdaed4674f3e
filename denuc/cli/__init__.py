"""The `denuc` command line: one sub-command per module in this package.

Each sub-command module defines ``add_parser(subparsers)`` and ``run(args) -> int``; ``options`` holds the options
and checks they share. ``main`` turns the user's errors, faults of the machine (a full disk, a read-only folder)
and Ctrl-C into one line on stderr and an exit status: 2 for a bad input, 1 for a fault, 130 for an interrupt.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from denuc import __version__
from denuc.errors import InputError, describe_os_error

SUBCOMMANDS = ["predict", "detect", "classify", "evaluate", "models", "train-detector", "train-classifier",
               "train-outlines", "pretrain", "tune-offsets", "export-backbone"]
"""In the order the overview lists them: using the models first, then training them."""

OVERVIEW = """\
Find the nuclei in H&E-stained histology, whole slides or images, and name their cell types.

For each slide (SVS, NDPI, MRXS, tiled TIFF, DICOM, ...) or image (PNG, JPEG, TIFF) denuc writes one row per
nucleus (position in pixels and micrometres, class, scores) as CSV, Parquet and QuPath GeoJSON, an overview
picture, and a summary with counts and densities. The models ship inside the package; nothing is downloaded."""

EXAMPLES = """\
examples:
  denuc predict --sample --out results/          try it on the bundled sample image
  denuc predict slides/ --out results/           every slide in a folder (after a stop, add --resume)
  denuc evaluate --pred results/ --gt points/    score predictions against annotated points
  denuc COMMAND --help                           the options of a command

documentation: README.md and docs/ in denuc's source: slides.md (predict), formats.md (the files read and
written), evaluation.md (evaluate), classifier.md, encoders.md and pretraining.md (training your own models)."""


def main(argv: list[str] | None = None) -> int:
    prefix = "denuc"
    try:  # reading the command line imports the commands' modules: seconds, which Ctrl-C may cut short too
        parser, modules = _parser()
        args = parser.parse_args(argv)
        args.command_line = list(sys.argv) if argv is None else ["denuc", *argv]  # recorded in outputs' summaries
        prefix = f"denuc {args.command}"
        return modules[args.command].run(args)
    except InputError as error:
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the machine's fault, not the user's input: a full disk, a read-only folder, ...
        print(f"{prefix}: error: {describe_os_error(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130


def _parser() -> tuple[argparse.ArgumentParser, dict]:
    """The parser of the whole command line, and the module of each sub-command."""
    parser = argparse.ArgumentParser(prog="denuc", description=OVERVIEW, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"denuc {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    modules = {}
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"denuc.cli.{name.replace('-', '_')}")
        module.add_parser(subparsers)
        modules[name] = module
    return parser, modules

if __name__ == "__main__":
    sys.exit(main())
