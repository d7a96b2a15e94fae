"""Hugging Face transformers models: ``wrap()`` adapters and exact weight conversion.

Importing this module imports transformers (the ``hf`` extra) and registers
:func:`hf_adapter` ahead of the other adapters in :data:`lmgen_fast.models.decoder.ADAPTERS`, and
:func:`from_hf` / :func:`to_hf` in :data:`lmgen_fast.models.llama.CONVERTERS`. ``wrap`` and
``LlamaForPretraining.from_hf`` / ``.to_hf`` import it by name when first needed, so this
module depends on them and they never import it.

* A ``LlamaForCausalLM`` that our Llama covers (SiLU MLP, plain or ``llama3`` RoPE, tied or
  untied embeddings, optional biases, any ``head_dim``) runs our cached Llama on the model's
  own weight tensors, shared and never copied.
* Any other causal LM whose forward takes a cache (``past_key_values``, or ``cache`` from
  transformers 5.2x on) runs a prefill, then one-token steps, on the model's own cache.
* Anything else is recomputed in full every step.

The transformers API moves between versions (cache classes, the cache keyword,
``cache_position``, ``logits_to_keep``), so the cached path reads the forward's signature and
never builds a cache object itself: it passes back whatever cache the model returned.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

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
from lmgen_fast.models.llama import CONVERTERS, LlamaConfig, LlamaForPretraining

__all__ = [
    "HFCacheDecoder",
    "config_from_hf",
    "config_to_hf",
    "from_hf",
    "hf_adapter",
    "load_hf_checkpoint",
    "share_hf_weights",
    "to_hf",
]

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


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
    if kind not in ("default", "llama3"):
        raise UnsupportedConfig(f"rope_type={kind!r} (only 'default' and 'llama3')")
    partial = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise UnsupportedConfig(f"partial_rotary_factor={partial!r}")
    scaling = None
    if kind == "llama3":
        scaling = dict(rope)
        # v5 fills this in when the checkpoint does not say; do the same for v4 configs.
        scaling.setdefault("original_max_position_embeddings", cfg.max_position_embeddings)
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
    )


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


def _is_hf_llama(model) -> bool:
    # Exactly the class: a subclass may change the forward we reproduce.
    return type(model) is transformers.LlamaForCausalLM


def _plain_modules(model) -> bool:
    """Whether every weight is a plain float tensor we can run: no quantized or offloaded
    (accelerate hook) layers, no meta tensors."""
    base = model.model
    modules = [model.lm_head, base.embed_tokens, base.norm]
    for layer in base.layers:
        modules += [getattr(layer.self_attn, n) for n in _ATTN]
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
    for layer in base.layers:
        parts = [(layer.self_attn, n, config.attention_bias) for n in _ATTN]
        parts += [(layer.mlp, n, config.mlp_bias) for n in _MLP]
        for owner, n, flag in parts:
            if (getattr(owner, n).bias is not None) != flag:
                raise UnsupportedConfig(f"{n} bias does not match the config")
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
    model : transformers.LlamaForCausalLM

    Returns
    -------
    LlamaForPretraining

    Raises
    ------
    ValueError
        If the model is not a ``LlamaForCausalLM`` or uses a setting our Llama lacks.
    """
    if not isinstance(model, transformers.LlamaForCausalLM):
        raise ValueError(
            f"from_hf needs a transformers LlamaForCausalLM, got {type(model).__name__}"
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
    weight = model.lm_head.weight
    hf = transformers.LlamaForCausalLM(config_to_hf(model.config))
    hf = hf.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        for name, tensor in model.named_parameters(remove_duplicate=False):
            get_path(hf, _to_hf_name(name)).copy_(tensor)
    return hf.eval()


def _forward_keywords(model) -> dict[str, str | None]:
    """Names the forward uses, read from its signature (they vary across versions)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    cache = next((n for n in ("cache", "past_key_values") if n in params), None)
    keep = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in params), None)
    return {
        "cache": cache,
        "keep": keep,
        "mask": "attention_mask" if "attention_mask" in params else None,
        "positions": "position_ids" if "position_ids" in params else None,
    }


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of token ids left padded to the longest, as transformers' ``generate`` takes
    them: int64 ``input_ids`` and ``attention_mask`` (1 = real token), ``[B, T]``, on the CPU."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(prompts), longest, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.as_tensor(p, dtype=torch.int64)
        mask[i, longest - len(p):] = 1
    return ids, mask


class HFCacheDecoder(Decoder):
    """A transformers causal LM on its own KV cache: prefill once, then one token a step.

    Rows of different lengths are left padded, with the attention mask and the position ids
    (count of real tokens before each one) that transformers' own ``generate`` passes.
    """

    cached = True

    def __init__(self, model, keywords: dict[str, str | None] | None = None):
        self.model = model
        self.kw = keywords or _forward_keywords(model)
        if self.kw["cache"] is None:
            raise ValueError(f"{type(model).__name__}.forward takes no cache argument")
        self.device = model_device(model)

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": ids, "use_cache": True, self.kw["cache"]: self.cache}
        if self.kw["mask"]:
            kwargs[self.kw["mask"]] = self.mask
        if self.kw["positions"]:
            pos = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 1)
            kwargs[self.kw["positions"]] = pos[:, -ids.shape[1]:]
        if self.kw["keep"]:
            kwargs[self.kw["keep"]] = 1
        out = self.model(**kwargs)
        if isinstance(out, tuple):
            logits, self.cache = out[0], out[1]
        else:
            logits = out.logits
            cache = getattr(out, "cache", None)
            self.cache = cache if cache is not None else getattr(out, "past_key_values", None)
        if self.cache is None:
            raise ValueError(f"{type(self.model).__name__} returned no cache with use_cache=True")
        return logits[:, -1]

    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> torch.Tensor:
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError(f"prompt {lengths.index(0)} has no tokens")
        ids, mask = left_pad(prompts)
        self.mask = mask.to(self.device)
        self.cache = None
        return self._run(ids.to(self.device))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(self.mask.shape[0], 1, dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self._run(tokens.view(-1, 1).to(self.device))


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
    if _is_hf_llama(model) and _plain_modules(model):
        try:
            config = _llama_config(model)
        except (UnsupportedConfig, ValueError):
            config = None
        if config is not None:
            return CachedLlamaDecoder(share_hf_weights(model, config))
    keywords = _forward_keywords(model)
    if keywords["cache"] is not None:
        return HFCacheDecoder(model, keywords)
    return RecomputeDecoder(model, model_device(model))


if hf_adapter not in ADAPTERS:
    # Ahead of the article-layout adapter, which would take a LlamaForCausalLM (its
    # ``base_model`` is the LlamaModel) without reading head_dim, biases or rope scaling.
    ADAPTERS.insert(0, hf_adapter)
CONVERTERS.update(from_hf=from_hf, to_hf=to_hf)


def load_hf_checkpoint(directory, device=None, dtype: torch.dtype = torch.float32):
    """A transformers checkpoint directory (``save_pretrained`` layout), read offline.

    Parameters
    ----------
    directory : str or Path
        Holds ``config.json`` with ``model_type`` and the weights; a tokenizer saved beside
        them is loaded too.
    device, dtype
        Where and in which dtype the model goes (default: the CPU, float32).

    Returns
    -------
    (model, tokenizer)
        The transformers model in eval mode, and its tokenizer (None if none was saved).
    """
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), local_files_only=True
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
