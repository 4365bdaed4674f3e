"""What every benchmark result records besides its figures: how it was made.

``write_result`` adds a ``"provenance"`` block to a result and writes it atomically: the command line, the git
commit of this checkout (and whether its tree had changes), the date, the Python / torch / denuc versions, and
for each model the benchmark used its tag and its weights file's SHA-256 (``denuc.hub.describe``). Results go
under ``RESULTS/<study>/``; ``RESULTS/INDEX.md`` says which file backs which published figure.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

import denuc
from denuc.errors import InputError
from denuc.hub import describe, resolve
from denuc.io.atomic import write_json

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results"
SHARED_DATASETS = REPOSITORY.parent / "shared" / "datasets"


def dataset_roots(names: Iterable[str], overrides: Iterable[str] = ()) -> dict[str, Path]:
    """Each dataset's folder: ``../shared/datasets/NAME``, or ROOT where an override ``NAME=ROOT`` (a benchmark's
    ``--root``) names another copy, e.g. CoNSeP's images rebuilt from its crops (``consep_reassemble.py``)."""
    roots = {name: SHARED_DATASETS / name for name in names}
    for override in overrides:
        name, _, root = override.partition("=")
        if name not in roots or not root:
            raise SystemExit(f"--root {override!r}: expected NAME=ROOT for one of {sorted(roots)}")
        roots[name] = Path(root)
    return roots


def git_state(checkout: Path = REPOSITORY) -> dict:
    """The checkout's HEAD commit and whether tracked or untracked (not ignored) files differ from it, results
    (``benchmarks/results``) aside: a benchmark's own earlier output is not a change to what ran. Both None where
    there is no git or no repository (an unpacked release)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=checkout, capture_output=True, text=True, check=True).stdout

    try:
        changed = git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results").strip()
        return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(changed)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def command_line() -> str:
    """The command as typed from the repository root: ``python benchmarks/bench_x.py --flag ...``."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPOSITORY) if script.is_relative_to(REPOSITORY) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def describe_model(model: str | os.PathLike, kind: str | None = None) -> dict:
    """``denuc.hub.describe`` of a shipped name or weights file (``kind``: what "default" meant, as in
    ``denuc.hub.resolve``). A file that is neither a detector nor a bundle (a joint baseline's checkpoint) is
    recorded by its path, SHA-256 and the reason, rather than losing the benchmark's figures."""
    path = resolve(model, kind)
    try:
        return {"name": str(model), **describe(path)}
    except InputError as error:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return {"name": str(model), "file": str(path), "sha256": digest.hexdigest(), "error": error.problem}


def provenance(models: Iterable[str | os.PathLike] = (), kind: str | None = None) -> dict:
    """How this run was made: command, commit, dirty flag, UTC date, versions, and each model (once)."""
    return {"command": command_line(), **git_state(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "denuc": denuc.__version__,
            "models": [describe_model(m, kind) for m in dict.fromkeys(map(str, models))]}


def write_result(path: str | os.PathLike, data: dict, models: Iterable[str | os.PathLike] = (),
                 kind: str | None = None) -> None:
    """``data`` plus its ``"provenance"``, as indented JSON at ``path``, written atomically. ``models``: the
    shipped names or weights files the figures came from; ``kind="bundle"`` where the benchmark ran them as
    ``Pipeline``s, for which "default" is the default bundle."""
    write_json(path, {**data, "provenance": provenance(models, kind)})
