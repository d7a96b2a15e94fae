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
from lmgen_fast.models.rope import check_rope_scaling, rotary_tables

_POSITIVE_INTS = (
    "vocab_size", "max_position_embeddings", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
)


@dataclass
class LlamaConfig:
    """The article's configuration; the defaults are the article's.

    The fields after ``rope_theta`` extend it to the Llama family of Hugging Face
    (``LlamaForCausalLM``, Qwen2, Qwen3, Mistral); their defaults keep the article's model:
    one model with options, not a class per family.

    * ``head_dim=None`` means ``hidden_size // num_attention_heads`` and is resolved on
      construction, so ``config.head_dim`` is always an int.
    * ``attention_bias``: biases on q, k, v and o (Llama, Qwen3); ``qkv_bias``: on q, k and v
      only (Qwen2). ``mlp_bias``: on the MLP's three projections.
    * ``qk_norm``: an RMSNorm over ``head_dim`` of every query and key head before the
      rotary (Qwen3), with weights ``self_attn.q_norm`` / ``self_attn.k_norm``.
    * ``rope_scaling``: ``None`` or a dict of one of the types of
      :data:`lmgen_fast.models.rope.ROPE_TYPES` (see :func:`~lmgen_fast.models.rope.
      check_rope_scaling`).
    * ``sliding_window``: a query at position ``p`` attends to positions ``> p - window``
      only (Mistral, Qwen2 with ``use_sliding_window``), in the layers ``sliding_layers``
      (``None``: every layer).
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
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    sliding_layers: list[int] | None = None

    def __post_init__(self) -> None:
        _check_numbers(self)
        self.rope_scaling = check_rope_scaling(self.rope_scaling)
        _check_window(self)

    def window_of(self, layer: int) -> int | None:
        """The sliding window of layer ``layer``, or None where it attends to every
        earlier position."""
        if self.sliding_window is None:
            return None
        if self.sliding_layers is not None and layer not in self.sliding_layers:
            return None
        return self.sliding_window

    def windowed(self) -> bool:
        """Whether a sliding window can limit attention below ``max_position_embeddings``."""
        limit = self.max_position_embeddings
        return any((self.window_of(i) or limit) < limit for i in range(self.num_hidden_layers))

    def to_dict(self) -> dict:
        """The fields as a dict; extensions at their defaults are left out, so the article's
        configuration gives the article's keys only."""
        data = asdict(self)
        if self.head_dim * self.num_attention_heads == self.hidden_size:
            data.pop("head_dim")
        for name in ("attention_bias", "mlp_bias", "tie_word_embeddings", "rope_scaling",
                     "qkv_bias", "qk_norm", "sliding_window", "sliding_layers"):
            if data[name] is None or data[name] is False:
                data.pop(name)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> LlamaConfig:
        """Build from a dict, ignoring keys this config does not have (e.g. HF extras)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _check_numbers(c: LlamaConfig) -> None:
    for name in _POSITIVE_INTS:
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
    for name in ("rms_norm_eps", "rope_theta"):
        value = getattr(c, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"LlamaConfig.{name} must be a positive number, got {value!r}")
    for name in ("attention_bias", "mlp_bias", "tie_word_embeddings", "qkv_bias", "qk_norm"):
        if not isinstance(getattr(c, name), bool):
            raise ValueError(f"LlamaConfig.{name} must be a bool, got {getattr(c, name)!r}")
    if c.head_dim is None:
        if c.hidden_size % c.num_attention_heads:
            raise ValueError(f"hidden_size {c.hidden_size} is not a multiple of "
                             f"num_attention_heads {c.num_attention_heads}")
        c.head_dim = c.hidden_size // c.num_attention_heads
    elif (
        not isinstance(c.head_dim, int) or isinstance(c.head_dim, bool)
        or c.head_dim <= 0 or c.head_dim % 2
    ):
        raise ValueError(f"LlamaConfig.head_dim must be a positive even int, got {c.head_dim!r}")
    if c.num_attention_heads % c.num_key_value_heads:
        raise ValueError(f"num_attention_heads {c.num_attention_heads} is not a multiple of "
                         f"num_key_value_heads {c.num_key_value_heads}")


def _check_window(c: LlamaConfig) -> None:
    window, layers = c.sliding_window, c.sliding_layers
    if window is not None and (not isinstance(window, int) or isinstance(window, bool)
                               or window <= 0):
        raise ValueError(f"LlamaConfig.sliding_window must be a positive int or None, "
                         f"got {window!r}")
    if layers is not None:
        layers = sorted(set(layers))
        if any(not isinstance(i, int) or not 0 <= i < c.num_hidden_layers for i in layers):
            raise ValueError(f"LlamaConfig.sliding_layers must be layer indices, got "
                             f"{c.sliding_layers!r}")
        c.sliding_layers = layers


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
        bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden,
                                bias=config.attention_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, positions=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):  # per head, before the rotary (Qwen3)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
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
        self.windows = [config.window_of(i) for i in range(config.num_hidden_layers)]
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, input_ids, positions, mask, cache=None):
        """``mask``: boolean (True = attend) or additive ``[B or 1, 1, T, S]``, key slot
        ``s`` holding position ``s``; the sliding-window layers also drop the slots
        ``<= position - window``."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, x.dtype)
        sin = signed_sin(sin)
        masks = {None: mask}
        for window in set(self.windows) - {None}:
            slots = torch.arange(mask.shape[-1], device=mask.device)
            inside = slots.view(1, 1, 1, -1) > (positions - window).view(
                positions.shape[0], 1, -1, 1)
            masks[window] = (mask & inside if mask.dtype == torch.bool
                             else torch.where(inside, mask, float("-inf")))
        for key, m in masks.items():
            if m.dtype == torch.bool:
                # Additive once here, rather than converted by attention in every layer.
                masks[key] = torch.zeros(m.shape, dtype=x.dtype, device=x.device).masked_fill_(
                    ~m, float("-inf"))
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, masks[self.windows[i]], cache, i, positions)
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
    ImportError or KeyError
        The providing module (e.g. transformers) is not installed, or none provides ``name``.
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
