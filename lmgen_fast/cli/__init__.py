"""The ``lmgen-fast`` command: ``generate``, ``bench``, ``run``; and the ahead-of-time
kernel compile check (``python -m lmgen_fast.cli.kernel_compile``)."""

from lmgen_fast.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
