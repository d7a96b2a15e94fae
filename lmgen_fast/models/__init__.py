"""Model definitions: the article's Llama."""

from lmgen_fast.models.llama import LlamaConfig, LlamaForPretraining

__all__ = ["LlamaConfig", "LlamaForPretraining"]
