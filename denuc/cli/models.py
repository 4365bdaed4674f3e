"""`denuc models`: the shipped models: tags, aliases, what each is, and a bundle's heads and classes."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help=__doc__.split(": ", 1)[1],
                              description="The shipped models (any of their names works as --model), or what a "
                                          "model file says about itself.")
    p.add_argument("model", nargs="?", help="describe this name or file instead (JSON: tag, sha256, kind, ...)")


def run(args: argparse.Namespace) -> int:
    from denuc import hub

    print(json.dumps(hub.describe(args.model), indent=2) if args.model else hub.format_table())
    return 0
