"""Rotary position tables: plain RoPE and the scalings Llama-family checkpoints use.

The frequencies follow transformers' ``modeling_rope_utils`` exactly (``default``,
``llama3``, ``linear``, ``yarn``), so a converted model rotates its queries and keys by the
same float32 angles. ``dynamic`` (NTK) is refused: its frequencies change with the sequence
length during generation, which a static table cannot reproduce.
"""

from __future__ import annotations

import math

import torch

ROPE_TYPES = ("default", "llama3", "linear", "yarn")
_REQUIRED = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
    "linear": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
}
_OPTIONAL = {"yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                      "truncate")}


def check_rope_scaling(scaling: dict | None) -> dict | None:
    """Normalise a rope scaling dict to ``None`` (plain RoPE) or ``{"rope_type", keys...}``.

    Parameters
    ----------
    scaling : dict or None
        ``rope_type`` (or ``type``) one of :data:`ROPE_TYPES` and that type's keys.

    Returns
    -------
    dict or None

    Raises
    ------
    ValueError
        Naming an unsupported type or a missing key.
    """
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"LlamaConfig.rope_scaling must be a dict or None, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ROPE_TYPES:
        raise ValueError(f"LlamaConfig.rope_scaling: rope_type {kind!r} is not supported "
                         f"(only {', '.join(map(repr, ROPE_TYPES))})")
    missing = [k for k in _REQUIRED[kind] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"LlamaConfig.rope_scaling: {kind} needs {missing}")
    keys = _REQUIRED[kind] + _OPTIONAL.get(kind, ())
    out = {"rope_type": kind, **{k: scaling[k] for k in keys if scaling.get(k) is not None}}
    if kind == "llama3" and out["high_freq_factor"] == out["low_freq_factor"]:
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


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(head_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN: float32 inverse frequencies ``[head_dim / 2]`` blending interpolated and
    extrapolated ones over a ramp of dimensions, and the factor applied to cos and sin."""
    factor = scaling["factor"]
    context = scaling["original_max_position_embeddings"]
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
                     if mscale and mscale_all else _yarn_mscale(factor))
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(context / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(fast), correction_dim(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers does: no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(torch.float32) / head_dim)
    extrapolation = 1 - ramp
    inv_freq = ((1.0 / (factor * pos_freqs)) * (1 - extrapolation)
                + (1.0 / pos_freqs) * extrapolation)
    return inv_freq, float(attention)


def rotary_tables(
    head_dim: int, max_positions: int, theta: float = 10000.0, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, float32 ``[max_positions, head_dim]``, in the "rotate half" layout.

    ``scaling``: ``None`` or a dict :func:`check_rope_scaling` accepts (YaRN's attention
    factor multiplies both tables, as transformers does).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    attention = 1.0
    kind = None if scaling is None else scaling["rope_type"]
    if kind == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "yarn":
        inv_freq, attention = yarn_inv_freq(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    emb = torch.cat([angles, angles], dim=-1)
    if attention != 1.0:
        return emb.cos() * attention, emb.sin() * attention
    return emb.cos(), emb.sin()
