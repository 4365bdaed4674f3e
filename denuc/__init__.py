"""denuc: nuclei detection and classification in H&E histopathology."""

from denuc.errors import InputError
from denuc.nuclei import NOT_A_NUCLEUS, UNLABELLED, NucleusClass, Nuclei

__version__ = "0.1.0"

__all__ = ["InputError", "NOT_A_NUCLEUS", "UNLABELLED", "NucleusClass", "Nuclei", "__version__"]
