"""Device memory and the engine: the KV cache's bytes per position, the default number of
slots that fit, the message for a single row that does not fit, and freeing what a
decoder holds after an out-of-memory error."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmgen_fast.core.rows import positions_needed

# Prompts that generate_batch runs in one batch by default; beyond, through this many slots.
DEFAULT_SLOTS = 64


def free(decoder) -> None:
    """Drop everything the decoder holds on the device after an out-of-memory error."""
    decoder.engine_state = None
    if hasattr(decoder, "release"):
        decoder.release()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def kv_bytes_per_position(model) -> int | None:
    """KV-cache bytes per row and position of ``model``, from its config where it has no
    ``kv_bytes_per_position`` (a transformers model); None where the config does not say."""
    if hasattr(model, "kv_bytes_per_position"):
        return model.kv_bytes_per_position()
    c = model.config
    layers = getattr(c, "num_hidden_layers", None)
    heads = getattr(c, "num_attention_heads", None)
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None)
    if head_dim is None and heads and getattr(c, "hidden_size", None):
        head_dim = c.hidden_size // heads
    param = next(iter(model.parameters()), None)
    if not (layers and kv_heads and head_dim) or param is None:
        return None
    return 2 * layers * kv_heads * head_dim * param.element_size()


def one_row_message(decoder, prompt: Sequence[int], max_tokens: int, exc: Exception) -> str:
    """Why a single row of ``prompt`` capped at ``max_tokens`` does not fit: its positions,
    and on CUDA the free memory and how many positions it holds."""
    need = positions_needed(len(prompt), max_tokens)
    msg = (f"out of device memory for a single row of {len(prompt)} prompt tokens and "
           f"max_tokens={max_tokens} ({need} positions)")
    model = getattr(decoder, "model", None)
    config = getattr(model, "config", None)
    device = getattr(decoder, "device", None)
    per_position = kv_bytes_per_position(model) if config is not None else None
    if per_position and device is not None and torch.device(device).type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        msg += (f"; {free_bytes / 2**20:.0f} MiB are free, and the KV cache alone takes "
                f"{per_position / 2**10:.1f} KiB per position: at most about "
                f"{free_bytes // per_position} positions fit for one row")
    return f"{msg} ({str(exc).splitlines()[0]})"


def default_slots(decoder, prompts: Sequence[Sequence[int]], max_tokens: Sequence[int]) -> int:
    """The default ``max_batch_size`` of :func:`lmgen_fast.generate_batch`.

    All prompts in one batch when there are at most :data:`DEFAULT_SLOTS` of them (the
    behaviour before continuous batching); more go through ``DEFAULT_SLOTS`` slots, fewer
    on a GPU where their KV cache (sized by the longest row) would take more than half of
    the free memory.
    """
    if len(prompts) <= DEFAULT_SLOTS:
        return max(len(prompts), 1)
    slots = DEFAULT_SLOTS
    model = getattr(decoder, "model", None)
    device = torch.device(getattr(decoder, "device", "cpu"))
    if device.type == "cuda" and isinstance(model, torch.nn.Module):
        per_position = kv_bytes_per_position(model)
        positions = max(positions_needed(len(p), m)
                        for p, m in zip(prompts, max_tokens, strict=True))
        if per_position:
            free_bytes, _ = torch.cuda.mem_get_info(device)
            slots = max(1, min(slots, free_bytes // 2 // (per_position * positions)))
    return slots
