"""The calls users make: :func:`generate`, :func:`generate_batch`, tokenizer adapters,
the embedded default model, and the article's own loop (the baseline)."""
