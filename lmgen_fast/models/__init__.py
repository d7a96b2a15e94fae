"""Model definitions: the article's Llama."""

from .llama import LlamaConfig, LlamaForPretraining

__all__ = ["LlamaConfig", "LlamaForPretraining"]
