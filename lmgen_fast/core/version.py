"""The package's version and the command's name: recorded in job manifests, printed by
``--version``. They sit at the bottom layer so that every layer can name them."""

__version__ = "0.1.0"
PROG = "lmgen-fast"
