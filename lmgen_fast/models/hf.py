"""Hugging Face transformers models: ``wrap()`` adapters and exact weight conversion.

Importing this module imports transformers (the ``hf`` extra) and registers
:func:`hf_adapter` ahead of the other adapters in :data:`lmgen_fast.models.decoder.ADAPTERS`, and
:func:`from_hf` / :func:`to_hf` in :data:`lmgen_fast.models.llama.CONVERTERS`. ``wrap`` and
``LlamaForPretraining.from_hf`` / ``.to_hf`` import it by name when first needed, so this
module depends on them and they never import it.

* A model of the Llama family (:data:`FAMILIES`: Llama, Mistral, Qwen2, Qwen3) that our
  Llama covers (SiLU MLP, RoPE of :data:`~lmgen_fast.models.rope.ROPE_TYPES`, tied or untied
  embeddings, q/k/v or all attention biases, per-head q/k norm, any ``head_dim``, sliding
  windows) runs our cached Llama on the model's own weight tensors, shared and never copied.
* Any other causal LM whose forward takes a cache (``past_key_values``, or ``cache`` from
  transformers 5.2x on) runs a prefill, then one-token steps, on the model's own cache
  (:mod:`lmgen_fast.models.hf_cache`); a family model lands there with a warning naming the
  setting our Llama lacks.
* Anything else is recomputed in full every step.
"""

from __future__ import annotations

import inspect
import warnings

import torch
import transformers
from torch import nn

from lmgen_fast.models.decoder import (
    ADAPTERS,
    CachedLlamaDecoder,
    Decoder,
    RecomputeDecoder,
    get_path,
    model_device,
    set_path,
    share_weights,
)
from lmgen_fast.models.hf_cache import HFCacheDecoder, forward_keywords, left_pad
from lmgen_fast.models.llama import CONVERTERS, LlamaConfig, LlamaForPretraining
from lmgen_fast.models.rope import ROPE_TYPES

__all__ = [
    "FAMILIES",
    "HFCacheDecoder",
    "config_from_hf",
    "config_to_hf",
    "from_hf",
    "hf_adapter",
    "left_pad",
    "load_hf_checkpoint",
    "share_hf_weights",
    "to_hf",
]

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_QK_NORM = ("q_norm", "k_norm")


class UnsupportedConfig(ValueError):
    """A transformers configuration that our Llama does not reproduce exactly."""


def _rope_parameters(cfg) -> tuple[float, dict]:
    """``(rope_theta, rope dict)`` from a v4 (``rope_theta`` + ``rope_scaling``) or a v5
    (``rope_parameters``) config."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        raise UnsupportedConfig(f"rope parameters {params!r} are not a dict")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    return float(10000.0 if theta is None else theta), params


def config_from_hf(cfg) -> LlamaConfig:
    """Our :class:`LlamaConfig` for a transformers ``LlamaConfig``.

    Parameters
    ----------
    cfg : transformers.LlamaConfig

    Returns
    -------
    LlamaConfig

    Raises
    ------
    ValueError
        Naming the setting our Llama does not reproduce (e.g. another activation or another
        rope scaling than ``llama3``).
    """
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedConfig(f"hidden_act={act!r} (only 'silu')")
    theta, rope = _rope_parameters(cfg)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UnsupportedConfig(f"rope_type={kind!r} (only {', '.join(ROPE_TYPES)})")
    partial = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise UnsupportedConfig(f"partial_rotary_factor={partial!r}")
    scaling = None
    if kind != "default":
        scaling = dict(rope)
        # v5 fills this in when the checkpoint does not say; do the same for v4 configs.
        scaling.setdefault("original_max_position_embeddings", cfg.max_position_embeddings)
        if kind == "yarn" and scaling.get("factor") is None:
            scaling["factor"] = (cfg.max_position_embeddings
                                 / scaling["original_max_position_embeddings"])
    family = getattr(cfg, "model_type", "llama")
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        rms_norm_eps=float(cfg.rms_norm_eps),
        rope_theta=theta,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        attention_bias=bool(getattr(cfg, "attention_bias", False)),
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        rope_scaling=scaling,
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        **_window(cfg),
    )


def _window(cfg) -> dict:
    """``sliding_window`` and ``sliding_layers`` of a transformers config: per layer from
    ``layer_types`` where the config has them (Qwen2, Qwen3), else every layer (Mistral)."""
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None  # transformers 4.x Qwen configs keep the size but turn it off
    types = getattr(cfg, "layer_types", None)
    if types is None:  # 4.x: Qwen windows the layers from max_window_layers on
        first = getattr(cfg, "max_window_layers", None)
        layers = None if first is None else list(range(first, cfg.num_hidden_layers))
        return dict(sliding_window=window, sliding_layers=layers)
    other = set(types) - {"full_attention", "sliding_attention"}
    if other:
        raise UnsupportedConfig(f"layer_types={sorted(other)!r}")
    layers = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    if layers and window is None:
        raise UnsupportedConfig("layer_types name sliding layers, sliding_window=None")
    return dict(sliding_window=window if layers else None, sliding_layers=layers)


def config_to_hf(config: LlamaConfig) -> transformers.LlamaConfig:
    """A transformers ``LlamaConfig`` describing the same model as ``config``.

    Parameters
    ----------
    config : LlamaConfig

    Returns
    -------
    transformers.LlamaConfig
    """
    kwargs = dict(
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        rms_norm_eps=config.rms_norm_eps,
        head_dim=config.head_dim,
        attention_bias=config.attention_bias,
        mlp_bias=config.mlp_bias,
        tie_word_embeddings=config.tie_word_embeddings,
        hidden_act="silu",
    )
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope.update(config.rope_scaling)
    params = inspect.signature(transformers.LlamaConfig.__init__).parameters
    if "rope_parameters" in params:
        kwargs["rope_parameters"] = rope
    else:  # transformers 4.x
        kwargs["rope_theta"] = config.rope_theta
        kwargs["rope_scaling"] = dict(rope) if config.rope_scaling is not None else None
    return transformers.LlamaConfig(**kwargs)


def _is_transformers(obj) -> bool:
    return type(obj).__module__.startswith("transformers")


# The transformers classes our Llama reproduces, with their options (LlamaConfig).
FAMILIES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def _is_hf_llama(model) -> bool:
    # Exactly the class: a subclass may change the forward we reproduce.
    return any(type(model) is getattr(transformers, name, None) for name in FAMILIES)


def _plain_modules(model) -> bool:
    """Whether every weight is a plain float tensor we can run: no quantized or offloaded
    (accelerate hook) layers, no meta tensors."""
    base = model.model
    modules = [model.lm_head, base.embed_tokens, base.norm]
    for layer in base.layers:
        modules += [getattr(layer.self_attn, n) for n in _ATTN + _QK_NORM
                    if hasattr(layer.self_attn, n)]
        modules += [getattr(layer.mlp, n) for n in _MLP]
        modules += [layer.input_layernorm, layer.post_attention_layernorm]
    for m in modules:
        is_norm = hasattr(m, "variance_epsilon")
        if hasattr(m, "_hf_hook") or (type(m) not in (nn.Linear, nn.Embedding) and not is_norm):
            return False
        w = m.weight
        if not isinstance(w, torch.Tensor) or w.is_meta or not w.dtype.is_floating_point:
            return False
    return not hasattr(model, "_hf_hook") and not hasattr(base, "_hf_hook")


def _llama_config(model) -> LlamaConfig:
    """Our config for a transformers LlamaForCausalLM, checked against its tensors."""
    config = config_from_hf(model.config)
    base = model.model
    attn = base.layers[0].self_attn
    for proj, heads in ((attn.q_proj, config.num_attention_heads),
                        (attn.k_proj, config.num_key_value_heads)):
        if proj.out_features != heads * config.head_dim:
            raise UnsupportedConfig(f"{proj.out_features} projection outputs, not heads * head_dim")
    if model.lm_head.bias is not None:
        raise UnsupportedConfig("lm_head has a bias")
    tied = model.lm_head.weight is base.embed_tokens.weight
    if tied != config.tie_word_embeddings:
        # The tensors decide: a config may say tied while the checkpoint loaded two.
        config.tie_word_embeddings = tied
    if len(base.layers) != config.num_hidden_layers:
        raise UnsupportedConfig("layer count does not match the config")
    qkv = config.attention_bias or config.qkv_bias
    for layer in base.layers:
        parts = [(layer.self_attn, n, qkv) for n in _ATTN[:3]]
        parts += [(layer.self_attn, "o_proj", config.attention_bias)]
        parts += [(layer.mlp, n, config.mlp_bias) for n in _MLP]
        for owner, n, flag in parts:
            if (getattr(owner, n).bias is not None) != flag:
                raise UnsupportedConfig(f"{n} bias does not match the config")
        norms = [hasattr(layer.self_attn, n) for n in _QK_NORM]
        if norms != [config.qk_norm] * 2:
            raise UnsupportedConfig("q_norm/k_norm do not match the config")
    return config


def _to_hf_name(name: str) -> str:
    return "model." + name.removeprefix("base_model.") if name.startswith("base_model.") else name


def share_hf_weights(model, config: LlamaConfig | None = None) -> LlamaForPretraining:
    """Our Llama running on a transformers ``LlamaForCausalLM``'s own parameters (no copy).

    Parameters
    ----------
    model : transformers.LlamaForCausalLM
    config : LlamaConfig, optional
        Derived from the model when not given.

    Returns
    -------
    LlamaForPretraining
        In eval mode; its parameters are the HF model's tensors, so both see later updates.
    """
    return share_weights(model, config or _llama_config(model), _to_hf_name)


def from_hf(model) -> LlamaForPretraining:
    """An exact, independent copy of a transformers ``LlamaForCausalLM`` as our Llama.

    Parameter names map ``model.`` -> ``base_model.``; dtype and device are kept.

    Parameters
    ----------
    model : transformers model of :data:`FAMILIES`

    Returns
    -------
    LlamaForPretraining

    Raises
    ------
    ValueError
        If the model is not of the Llama family or uses a setting our Llama lacks.
    """
    if not any(isinstance(model, getattr(transformers, n, ())) for n in FAMILIES):
        raise ValueError(
            f"from_hf needs a transformers model of {FAMILIES}, got {type(model).__name__}"
        )
    shared = share_hf_weights(model, _llama_config(model))
    copies: dict[int, nn.Parameter] = {}
    for name, tensor in list(shared.named_parameters(remove_duplicate=False)):
        # One copy per tensor, so tied embeddings stay tied.
        if id(tensor) not in copies:
            copies[id(tensor)] = nn.Parameter(tensor.detach().clone())
        set_path(shared, name, copies[id(tensor)])
    return shared


def to_hf(model: LlamaForPretraining) -> transformers.LlamaForCausalLM:
    """An exact, independent copy of our Llama as a transformers ``LlamaForCausalLM``.

    Parameter names map ``base_model.`` -> ``model.``; the article's model becomes a
    ``LlamaForCausalLM`` with ``rope_theta=10000``, ``rms_norm_eps=1e-5`` and untied embeddings.

    Parameters
    ----------
    model : LlamaForPretraining

    Returns
    -------
    transformers.LlamaForCausalLM
        In eval mode, with ``model``'s dtype and device.
    """
    c = model.config
    extra = [n for n in ("qkv_bias", "qk_norm", "sliding_window") if getattr(c, n)]
    if extra:
        raise ValueError(f"to_hf makes a LlamaForCausalLM, which has no {extra[0]}")
    weight = model.lm_head.weight
    hf = transformers.LlamaForCausalLM(config_to_hf(model.config))
    hf = hf.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        for name, tensor in model.named_parameters(remove_duplicate=False):
            get_path(hf, _to_hf_name(name)).copy_(tensor)
    return hf.eval()


def hf_adapter(model) -> Decoder | None:
    """The decoder for a transformers model, or None for anything else.

    Parameters
    ----------
    model : object

    Returns
    -------
    Decoder or None
        Our cached Llama on shared weights for a covered ``LlamaForCausalLM``; the model's
        own cache (:class:`HFCacheDecoder`) for other decoder-only models with a cache
        argument; full recompute otherwise. None for non-transformers models and
        encoder-decoder models.
    """
    if not isinstance(model, nn.Module) or not _is_transformers(model):
        return None
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    if _is_hf_llama(model):
        try:
            if not _plain_modules(model):
                raise UnsupportedConfig("weights (quantized, offloaded or not float tensors)")
            return CachedLlamaDecoder(share_hf_weights(model, _llama_config(model)))
        except ValueError as err:  # UnsupportedConfig, or LlamaConfig naming its field
            warnings.warn(f"{type(model).__name__} runs on transformers' own cache: lmgen-fast's "
                          f"Llama does not cover {err}", RuntimeWarning, stacklevel=3)
    keywords = forward_keywords(model)
    if keywords["cache"] is not None:
        return HFCacheDecoder(model, keywords)
    return RecomputeDecoder(model, model_device(model))


if hf_adapter not in ADAPTERS:
    # Ahead of the article-layout adapter, which would take a LlamaForCausalLM (its
    # ``base_model`` is the LlamaModel) without reading head_dim, biases or rope scaling.
    ADAPTERS.insert(0, hf_adapter)
CONVERTERS.update(from_hf=from_hf, to_hf=to_hf)


def load_hf_checkpoint(directory, device=None, dtype: torch.dtype | None = None):
    """A transformers checkpoint directory (``save_pretrained`` layout), read offline.

    Parameters
    ----------
    directory : str or Path
        Holds ``config.json`` with ``model_type`` and the weights (safetensors or a state
        dict); a tokenizer saved beside them is loaded too, and ``generation_config.json``
        becomes the model's ``generation_config``.
    device, dtype
        Where and in which dtype the model goes (default: the CPU, the checkpoint's own
        dtype: bfloat16 weights stay bfloat16, and run on the CPU too).

    Returns
    -------
    (model, tokenizer)
        The transformers model in eval mode, and its tokenizer (None if none was saved).
    """
    # "auto": the dtype the checkpoint was saved in (the keyword was renamed in 5.0).
    auto = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": "auto"}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), local_files_only=True, **auto
        )
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the transformers checkpoint in {directory}: {err}") from None
    model = model.to(device=device or "cpu", dtype=dtype).eval()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True
        )
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer
