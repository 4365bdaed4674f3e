"""denuc: nuclei detection and classification in H&E histopathology."""

from __future__ import annotations

from denuc.errors import InputError
from denuc.nuclei import NOT_A_NUCLEUS, UNLABELLED, NucleusClass, Nuclei

__version__ = "0.1.0"

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
