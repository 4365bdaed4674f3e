"""denuc: nuclei detection and classification in H&E histopathology."""

from __future__ import annotations

from denuc.errors import InputError
from denuc.nuclei import NOT_A_NUCLEUS, UNLABELLED, Nuclei, NucleusClass


def _version() -> str:
    """pyproject.toml's ``version``, the one version source: read from the file in a source checkout (an
    editable install's metadata keeps the version it was installed at), else from the installed metadata."""
    import re
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        project = re.search(r"^\[project\]$(.*?)(?=^\[|\Z)", pyproject.read_text(), re.M | re.S)
        if project and re.search(r'^name\s*=\s*"denuc"', project.group(1), re.M):
            found = re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), re.M)
            if found:
                return found.group(1)
    from importlib.metadata import version

    return version("denuc")


__version__ = _version()

# The models are importable from the top (``from denuc import Pipeline``) but load torch only when asked for,
# so that ``import denuc`` and ``denuc --help`` stay fast.
_MODELS = {"Pipeline": "denuc.inference.pipeline", "Detector": "denuc.inference.detect"}

__all__ = ["Detector", "InputError", "NOT_A_NUCLEUS", "Nuclei", "NucleusClass", "Pipeline", "UNLABELLED",
           "__version__"]


def __getattr__(name: str) -> object:
    if name in _MODELS:
        import importlib

        return getattr(importlib.import_module(_MODELS[name]), name)
    raise AttributeError(f"module 'denuc' has no attribute {name!r}")
