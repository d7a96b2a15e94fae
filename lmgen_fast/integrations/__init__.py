"""Integrations with other tools, on top of the public API: :mod:`lmgen_fast.integrations.lm_eval`
(an lm-evaluation-harness backend, the ``eval`` extra). Nothing here is imported by
``import lmgen_fast``."""
