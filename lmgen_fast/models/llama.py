"""The article's Llama (SPEC section 5), state-dict compatible, with an optional static KV cache.

Without a cache, ``forward(input_ids, attn_mask=None)`` recomputes the whole sequence like
the article's class. With a :class:`~lmgen_fast.models.cache.KVCache`, the same layers
write keys and values at per-row positions and attend over the cache: a prefill, then
one-token steps.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from lmgen_fast.models.cache import KVCache

_POSITIVE_INTS = (
    "vocab_size", "max_position_embeddings", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
)


@dataclass
class LlamaConfig:
    """The article's configuration; the defaults are the article's.

    The fields after ``rope_theta`` extend it to the Llama variants of Hugging Face
    ``LlamaForCausalLM``; their defaults keep the article's model. ``head_dim=None`` means
    ``hidden_size // num_attention_heads`` and is resolved on construction, so
    ``config.head_dim`` is always an int. ``rope_scaling`` is ``None`` or a ``"llama3"`` dict
    (``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``).
    """

    vocab_size: int = 50000
    max_position_embeddings: int = 2048
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int = 3
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    head_dim: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    rope_scaling: dict | None = None

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive number, got {value!r}")
        for name in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LlamaConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not a multiple of "
                    f"num_attention_heads {self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        elif (
            not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool)
            or self.head_dim <= 0 or self.head_dim % 2
        ):
            raise ValueError(
                f"LlamaConfig.head_dim must be a positive even int, got {self.head_dim!r}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.rope_scaling is not None:
            self.rope_scaling = _check_rope_scaling(self.rope_scaling)

    def to_dict(self) -> dict:
        """The fields as a dict; extensions at their defaults are left out, so the article's
        configuration gives the article's keys only."""
        data = asdict(self)
        if self.head_dim * self.num_attention_heads == self.hidden_size:
            data.pop("head_dim")
        for name in ("attention_bias", "mlp_bias", "tie_word_embeddings", "rope_scaling"):
            if not data[name]:
                data.pop(name)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> LlamaConfig:
        """Build from a dict, ignoring keys this config does not have (e.g. HF extras)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _check_rope_scaling(scaling: dict) -> dict | None:
    """Normalise a rope scaling dict to ``None`` (plain RoPE) or the llama3 keys only."""
    if not isinstance(scaling, dict):
        raise ValueError(f"LlamaConfig.rope_scaling must be a dict or None, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(
            f"LlamaConfig.rope_scaling: rope_type {kind!r} is not supported (only 'llama3')"
        )
    missing = [k for k in _LLAMA3_KEYS if k not in scaling]
    if missing:
        raise ValueError(f"LlamaConfig.rope_scaling: llama3 needs {missing}")
    out = {"rope_type": "llama3", **{k: scaling[k] for k in _LLAMA3_KEYS}}
    if out["high_freq_factor"] == out["low_freq_factor"]:
        raise ValueError("LlamaConfig.rope_scaling: high_freq_factor equals low_freq_factor")
    return out


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency rescaling: long wavelengths slowed by ``factor``, short ones kept,
    a linear blend (in ``context / wavelength``) in between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    blend = (context / wavelen - low) / (high - low)
    blended = (1 - blend) * scaled / factor + blend * scaled
    middle = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(middle, blended, scaled)


def rotary_tables(
    head_dim: int, max_positions: int, theta: float = 10000.0, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, float32 ``[max_positions, head_dim]``, in the "rotate half" layout.

    ``scaling``: ``None`` or a llama3 rope scaling dict (see :class:`LlamaConfig`).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated, the form :func:`apply_rotary` takes."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, T, D]`` by the angles in ``cos``/``sin`` ``[B, 1, T, D]``.

    "Rotate half": ``x * cos + cat(-x2, x1) * sin``, computed as
    ``x * cos + cat(x2, x1) * signed_sin(sin)``: the same bits (negating a factor is exact),
    and the sign is applied once per forward instead of once per layer and tensor.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the model's dtype, as Llama implementations do:
        # x * rsqrt(mean(x**2) + eps). F.rms_norm is that formula on the CPU (bit for bit)
        # and one fused kernel on recent CUDA builds instead of six.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class LlamaRotaryEmbedding(nn.Module):
    """Holds the rotary tables. They are recomputed, never loaded: a checkpoint's
    ``rotary_emb.cos``/``sin`` (the article saves them) are accepted and dropped."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        cos, sin = rotary_tables(
            config.head_dim, config.max_position_embeddings, config.rope_theta,
            config.rope_scaling,
        )
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._register_load_state_dict_pre_hook(self._drop_saved_tables)

    @staticmethod
    def _drop_saved_tables(state_dict, prefix, *args) -> None:
        for name in ("cos", "sin"):
            state_dict.pop(prefix + name, None)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin ``[B, 1, T, D]`` for int64 ``positions`` ``[B, T]``.

        Positions must be below ``max_position_embeddings``; callers check that on the host
        (reading ``positions`` here would synchronise with the GPU at every step).
        """
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        return cos.to(dtype), sin.to(dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, kv_dim = config.hidden_size, self.num_kv_heads * self.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, positions=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, positions, kv_len=mask.shape[-1])
        groups = self.num_heads // self.num_kv_heads
        if t == 1 and groups > 1:
            # One query per row (a decode step): the query heads sharing a key/value head
            # become that head's queries, so attention reads each cached key once instead
            # of a copy per query head.
            qg = q.reshape(b, self.num_kv_heads, groups, self.head_dim)
            out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
            out = out.reshape(b, self.num_heads, 1, self.head_dim)
        else:
            if groups > 1:
                # Each key/value head repeated for its query heads: with a mask, SDPA's
                # fused CUDA kernels take equal head counts only (enable_gqa=True would fall
                # back to the unfused math path for a prefill).
                k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, positions=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, input_ids, positions, mask, cache=None):
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, x.dtype)
        sin = signed_sin(sin)
        if mask.dtype == torch.bool:
            # Additive once here, rather than converted by attention in every layer.
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(
                ~mask, float("-inf"))
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, positions)
        return self.norm(x)


def full_attention_mask(attn_mask: torch.Tensor | None, t: int, device) -> torch.Tensor:
    """Causal boolean mask ``[B or 1, 1, T, T]`` (True = attend), combined with ``attn_mask``.

    ``attn_mask`` may be a ``[B, T]`` padding mask (nonzero = real token) or a boolean or
    additive float mask broadcastable to ``[B, 1, T, T]``. A query always sees itself, so a
    fully padded row yields finite (ignored) values instead of NaN.
    """
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    if attn_mask is None:
        return causal.view(1, 1, t, t)
    if attn_mask.dim() == 2:
        keep = attn_mask.to(torch.bool).view(-1, 1, 1, t)
    elif attn_mask.dtype == torch.bool:
        keep = attn_mask.view(-1, 1, t, t) if attn_mask.dim() == 3 else attn_mask
    else:
        keep = (attn_mask.view(-1, 1, t, t) if attn_mask.dim() == 3 else attn_mask) > -math.inf
    eye = torch.eye(t, dtype=torch.bool, device=device)
    return (causal & keep) | eye


# Conversions to and from other libraries' models, registered by the modules that implement
# them (lmgen_fast.models.hf registers "from_hf" and "to_hf" when imported). The model does not
# import its converters: they depend on it, and on an optional library.
CONVERTERS: dict[str, Callable] = {}
CONVERTER_MODULES: dict[str, str] = {"from_hf": "lmgen_fast.models.hf",
                                     "to_hf": "lmgen_fast.models.hf"}


def converter(name: str) -> Callable:
    """The registered conversion ``name``, importing the module that provides it if needed.

    Parameters
    ----------
    name : str
        ``"from_hf"`` or ``"to_hf"`` (or a name another module registered in
        :data:`CONVERTERS`).

    Returns
    -------
    callable

    Raises
    ------
    ImportError
        The providing module (e.g. transformers for ``lmgen_fast.models.hf``) is not installed.
    KeyError
        No module provides ``name``.
    """
    if name not in CONVERTERS and name in CONVERTER_MODULES:
        importlib.import_module(CONVERTER_MODULES[name])
    return CONVERTERS[name]


class LlamaForPretraining(nn.Module):
    """The article's Llama decoder with an untied ``lm_head`` (tied if the config says so).

    Parameters
    ----------
    config : LlamaConfig

    Examples
    --------
    >>> model = LlamaForPretraining(LlamaConfig(vocab_size=100, hidden_size=32,
    ...     intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    ...     num_key_value_heads=2))
    >>> model(torch.zeros(1, 5, dtype=torch.long)).shape
    torch.Size([1, 5, 100])
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.base_model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.base_model.embed_tokens.weight

    @classmethod
    def from_hf(cls, model) -> LlamaForPretraining:
        """An exact copy of a transformers ``LlamaForCausalLM`` (``model.`` -> ``base_model.``).

        See :func:`lmgen_fast.models.hf.from_hf`.
        """
        return converter("from_hf")(model)

    def to_hf(self):
        """An exact copy as a transformers ``LlamaForCausalLM`` (``base_model.`` -> ``model.``).

        See :func:`lmgen_fast.models.hf.to_hf`.
        """
        return converter("to_hf")(self)

    def forward(self, input_ids: torch.Tensor, attn_mask: torch.Tensor | None = None):
        """Full recompute: int64 ``input_ids`` ``[B, T]`` -> logits ``[B, T, V]``.

        Positions are ``0..T-1`` as in the article; ``attn_mask`` as in
        :func:`full_attention_mask`.
        """
        b, t = input_ids.shape
        limit = self.config.max_position_embeddings
        if t > limit:
            raise ValueError(
                f"position {t - 1} is beyond max_position_embeddings {limit}"
            )
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        mask = full_attention_mask(attn_mask, t, input_ids.device)
        return self.lm_head(self.base_model(input_ids, positions, mask))

    def forward_cached(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, kv_len: int
    ) -> torch.Tensor:
        """Run ``input_ids`` ``[B, T]`` at int64 ``positions`` ``[B, T]`` through the cache.

        Keys and values are written at ``positions``; each query attends to the cache slots
        ``<=`` its own position, up to slot ``kv_len - 1``. Positions must be below
        ``max_position_embeddings`` (not checked here: that would synchronise). Returns the
        final hidden states ``[B, T, hidden]`` (apply ``lm_head`` to the rows you need).
        """
        slots = torch.arange(kv_len, device=input_ids.device)
        mask = (slots.view(1, 1, 1, -1) <= positions.unsqueeze(1).unsqueeze(-1))
        return self.base_model(input_ids, positions, mask, cache)

    def kv_bytes_per_position(self) -> int:
        """Bytes the KV cache holds per row and position (keys and values, every layer)."""
        c = self.config
        return (2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim
                * self.lm_head.weight.element_size())

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A static cache for ``batch`` rows of up to ``max_len`` positions."""
        weight = self.lm_head.weight
        return KVCache(
            self.config.num_hidden_layers, batch, self.config.num_key_value_heads, max_len,
            self.config.head_dim, dtype=weight.dtype, device=weight.device,
        )
