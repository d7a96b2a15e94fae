"""lmgen-fast: the article's generate() loop, exact and fast.

Public names: :func:`generate`, :func:`generate_batch`, :func:`sample`, :class:`SamplingParams`,
:func:`wrap`, :func:`score` (:class:`Score`), :func:`score_rolling`,
``lmgen_fast.reference.sample`` and ``lmgen_fast.models``.
"""

from lmgen_fast import reference
from lmgen_fast.api.default_model import load_default
from lmgen_fast.api.generate import (
    DecodeOutOfMemory,
    Generation,
    GenerationError,
    generate,
    generate_batch,
)
from lmgen_fast.api.score import Score, score, score_rolling
from lmgen_fast.core.params import SamplingParams
from lmgen_fast.core.version import __version__  # noqa: F401  (lmgen_fast.__version__)
from lmgen_fast.models.decoder import release, wrap
from lmgen_fast.sampling.dispatch import sample
from lmgen_fast.sampling.reference import EmptyRowError

__all__ = [
    "DecodeOutOfMemory",
    "EmptyRowError",
    "Generation",
    "GenerationError",
    "SamplingParams",
    "Score",
    "generate",
    "generate_batch",
    "load_default",
    "reference",
    "release",
    "sample",
    "score",
    "score_rolling",
    "wrap",
]
