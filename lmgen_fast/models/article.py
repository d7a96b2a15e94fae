"""Modules laid out like the article's: recognise one, read its config, share its weights.

:func:`infer_article_config` reads a :class:`LlamaConfig` off any ``nn.Module`` with the
article's attribute layout; :func:`share_weights` builds our Llama on that module's own
parameter tensors (no copy). The transformers adapter reuses both with its own names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmgen_fast.models.llama import LlamaConfig, LlamaForPretraining, LlamaRotaryEmbedding

_LAYER_PARTS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


def get_path(module: nn.Module, path: str):
    """The attribute at dotted ``path`` below ``module`` (None where a part is missing)."""
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _find_attr(objs, names):
    for obj in objs:
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return value
    return None


def infer_article_config(model: nn.Module) -> LlamaConfig | None:
    """The LlamaConfig of a module laid out like the article's, or None if it is not one."""
    base = getattr(model, "base_model", None)
    layers = getattr(base, "layers", None)
    if (
        not isinstance(model, nn.Module)
        or not isinstance(get_path(model, "lm_head"), nn.Linear)
        or not isinstance(get_path(model, "base_model.embed_tokens"), nn.Embedding)
        or get_path(model, "base_model.norm.weight") is None
        or not isinstance(layers, nn.ModuleList)
        or len(layers) == 0
    ):
        return None
    for layer in layers:
        for part in _LAYER_PARTS:
            linear = get_path(layer, part)
            if not isinstance(linear, nn.Linear) or linear.bias is not None:
                return None
        for norm in ("input_layernorm", "post_attention_layernorm"):
            if get_path(layer, norm + ".weight") is None:
                return None
    if model.lm_head.bias is not None:
        return None
    attn = layers[0].self_attn
    cfg = getattr(model, "config", None)
    hidden = base.embed_tokens.weight.shape[1]
    heads = _find_attr([cfg, attn], ("num_attention_heads", "num_heads", "n_heads"))
    if heads is None:
        head_dim = _find_attr([cfg, attn], ("head_dim",))
        if head_dim is None:
            return None
        heads = hidden // head_dim
    head_dim = hidden // heads
    rotary_cos = get_path(model, "base_model.rotary_emb.cos")
    max_pos = _find_attr([cfg], ("max_position_embeddings",))
    if max_pos is None:
        max_pos = rotary_cos.shape[0] if isinstance(rotary_cos, torch.Tensor) else 2048
    eps = _find_attr([base.norm, cfg], ("eps", "variance_epsilon", "rms_norm_eps")) or 1e-5
    return LlamaConfig(
        vocab_size=base.embed_tokens.weight.shape[0],
        max_position_embeddings=int(max_pos),
        hidden_size=hidden,
        intermediate_size=layers[0].mlp.gate_proj.out_features,
        num_hidden_layers=len(layers),
        num_attention_heads=int(heads),
        num_key_value_heads=layers[0].self_attn.k_proj.out_features // head_dim,
        rms_norm_eps=float(eps),
        rope_theta=float(_find_attr([cfg], ("rope_theta",)) or 10000.0),
    )


def set_path(module: nn.Module, path: str, value) -> None:
    """Set the attribute at dotted ``path`` below ``module``."""
    owner, _, leaf = path.rpartition(".")
    setattr(get_path(module, owner), leaf, value)


def share_weights(
    model: nn.Module, config: LlamaConfig, source_name: Callable[[str], str] = lambda n: n
) -> LlamaForPretraining:
    """A LlamaForPretraining whose parameters are ``model``'s own tensors (no copy).

    ``source_name`` maps each of our parameter names to ``model``'s. Tied parameters are
    listed under every name, so each of our names points at its own source tensor.
    """
    with torch.device("meta"):
        ours = LlamaForPretraining(config)
    for name, _ in list(ours.named_parameters(remove_duplicate=False)):
        set_path(ours, name, get_path(model, source_name(name)))
    device = model.lm_head.weight.device
    ours.base_model.rotary_emb = LlamaRotaryEmbedding(config).to(device)
    return ours.eval()
