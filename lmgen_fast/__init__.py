"""lmgen-fast: the article's generate() loop, exact and fast.

Public names: :func:`generate`, :func:`generate_batch`, :func:`sample`, :class:`SamplingParams`,
:func:`wrap`, ``lmgen_fast.reference.sample`` and ``lmgen_fast.models``.
"""

from . import reference
from .decoder import release, wrap
from .default_model import load_default
from .generate import DecodeOutOfMemory, Generation, GenerationError, generate, generate_batch
from .params import SamplingParams
from .reference import EmptyRowError
from .sampling import sample

__all__ = [
    "DecodeOutOfMemory",
    "EmptyRowError",
    "Generation",
    "GenerationError",
    "SamplingParams",
    "generate",
    "generate_batch",
    "load_default",
    "reference",
    "release",
    "sample",
    "wrap",
]
__version__ = "0.1.0"
