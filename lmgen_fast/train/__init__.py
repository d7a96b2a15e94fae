"""Training the embedded default model: the data (Python's own documentation), the loop,
and the loss plot. Builds on :mod:`lmgen_fast.core` and :mod:`lmgen_fast.models` only."""
