"""Predicted time of each kernel of a decode step on a GPU, from the bytes it must move.

Used by ``bench_launches.py --predict h200``. The model, per kernel launch::

    predicted time = max(bytes / bandwidth, floor)

``bandwidth`` 3.6e12 B/s (the H200's HBM as a copy moves it, about three quarters of the
datasheet's 4.8 TB/s); ``floor`` 2.5 us for a Triton kernel or a small aten kernel inside a
CUDA graph, 4.5 us for a cuBLAS call. ``bytes`` is what the kernel must move (each input
read once, each output written once), from the real shapes, in the GPU's dtype (bfloat16):

- matmul (cuBLAS: ``aten::mm``, ``addmm``, ``bmm``, ...): the weight ``K x N`` plus the
  ``B x K`` input and ``B x N`` output (the weight dominates at small batches);
- ``attn_decode_kernel``: the query (with the rotary inside: the fused ``qkv`` row and
  the rotary tables' row, and K and V written to one slot), the K and V slots of the
  context (``B x KV x ctx x D`` each, not the whole cache), the output; with several splits
  also the float32 partial records (``B x H x splits x (D + 2)``) written by every split
  and read back by the last one; with how many splits is the real shapes' plan
  (``fused_attention.plan_attention``), not the small model's.
- ``rope_cache_kernel`` (the multi-token path): the fused ``qkv`` row in, the rotated
  query out, K and V written to one slot; ``add_rmsnorm_kernel``: input and residual in,
  both out; ``embed_rmsnorm_kernel``: ``B`` embedding rows in, the residual and its norm
  out; ``swiglu_kernel``: ``B x 2I`` in, ``B x I`` out; ``gate_up_swiglu_kernel``: the
  gate/up weight ``2I x hidden``, ``B x hidden`` in, ``B x I`` out; ``chunk_kernel`` (the
  sampler): the logits rows ``B x V``; ``aten::embedding`` and ``index_select``: ``B``
  rows of the table in and out;
- any other kernel (the sampler's set-up and merge, the bookkeeping, small aten ops):
  the bytes of its tensors as counted on the small model (they are small: the floor).

Which kernels run comes from counting a small model of the same structure (the same
kernels per layer) under the interpreter, see :func:`bench_launches.structure`; this module
takes that launch list and the real shapes. Pure Python: no GPU, no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

BANDWIDTH = {"h200": 3.6e12}
FLOOR_US = {"cublas": 4.5, "triton": 2.5, "aten": 2.5}
BF16 = 2
F32 = 4


@dataclass(frozen=True)
class Shapes:
    """A model's decode-step shapes: the real model's, or the small counted one's."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config: dict) -> Shapes:
        """From a :class:`LlamaConfig` dict (``to_dict()``)."""
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return cls(config["hidden_size"], config["num_hidden_layers"], heads,
                   config["num_key_value_heads"], head_dim, config["intermediate_size"],
                   config["vocab_size"])

    def widths(self) -> dict[str, int]:
        """The named matrix widths, by which a small model's matmul dimension is mapped to
        the real model's."""
        return {"hidden": self.hidden, "q": self.heads * self.head_dim,
                "qkv": (self.heads + 2 * self.kv_heads) * self.head_dim,
                "kv": self.kv_heads * self.head_dim, "inter": self.intermediate,
                "gate_up": 2 * self.intermediate, "vocab": self.vocab}


ARTICLE = Shapes(768, 12, 12, 3, 64, 3072, 50000)
LLAMA_1B = Shapes(2048, 16, 32, 8, 64, 8192, 128256)
MODELS = {"article": ARTICLE, "llama-3.2-1b": LLAMA_1B}


def real_dim(small_value: int, small: Shapes, real: Shapes) -> tuple[str, int]:
    """The name and the real model's size of a dimension that measures ``small_value`` in
    the small model (the first named width that matches); an unmatched size stays as it is,
    named by its value."""
    real_widths = real.widths()
    for name, value in small.widths().items():
        if value == small_value:
            return name, real_widths[name]
    return str(small_value), small_value


def kernel_bytes(event: dict, batch: int, context: int, small: Shapes, real: Shapes,
                 splits: int) -> tuple[int, str]:
    """Bytes one launch must move at the real shapes, and which rule gave them.

    ``event``: a launch as ``bench_launches`` records it (``kind``, ``name``, ``bytes``
    seen on the small model, ``mm`` = the small matmul's ``[K, N]`` when it is one).
    ``splits``: the attention splits of the real shapes' plan.
    """
    r, e = real, BF16
    name, b = event["name"], batch
    hd, kvd = r.heads * r.head_dim, r.kv_heads * r.head_dim
    if event.get("mm"):
        (kname, k), (nname, n) = (real_dim(v, small, real) for v in event["mm"])
        return e * (k * n + b * (k + n)), f"matmul {kname}->{nname}"
    records = 0 if splits == 1 else 2 * b * r.heads * splits * (r.head_dim + 2) * F32
    rotary = e * b * 2 * (kvd + r.kv_heads * r.head_dim) + 2 * b * r.head_dim * F32
    rules = {
        "attn_decode_kernel": e * (2 * b * hd + 2 * b * context * kvd) + records + rotary,
        "embed_rmsnorm_kernel": e * (3 * b * r.hidden + r.hidden),
        "gate_up_swiglu_kernel": e * (2 * r.intermediate * r.hidden + b * r.hidden
                                      + b * r.intermediate),
        "rope_cache_kernel": e * b * ((r.heads + 2 * r.kv_heads) * r.head_dim + hd + 2 * kvd)
        + 2 * b * r.head_dim * F32,
        "add_rmsnorm_kernel": e * (4 * b * r.hidden + r.hidden),
        "swiglu_kernel": e * 3 * b * r.intermediate,
        "chunk_kernel": e * b * r.vocab,
        "aten::embedding": e * 2 * b * r.hidden,
        "aten::index_select": e * 2 * b * r.hidden,
    }
    if name in rules:
        return rules[name], "shapes"
    return int(event.get("bytes", 0)), "counted"


def predict_step(events: list[dict], small: Shapes, real: Shapes, batch: int, context: int,
                 splits: int, gpu: str = "h200") -> dict:
    """Predicted per-kernel times of one decode step of ``real`` at ``batch`` rows and
    ``context`` slots.

    ``events``: the launches of one step of the small model, in order, each with
    ``component`` (``model.layers`` ones are the small model's ``small.layers`` layers).
    The real step is the events outside the layers plus ``real.layers`` times one layer's
    (the attention is one launch at any split count; ``splits`` sizes its bytes).

    Returns
    -------
    dict
        ``kernels``: one row per kernel name (``name``, ``kind``, ``launches``, ``bytes``,
        ``predicted_us``, ``rule``), in first-launch order; ``launches``, ``bytes``,
        ``predicted_us`` (the step), ``roofline_us`` (bytes / bandwidth) and
        ``roofline_share`` (roofline over predicted).
    """
    per_layer = [e for e in events if e["component"] == "model.layers"]
    if len(per_layer) % small.layers:
        raise ValueError(f"{len(per_layer)} layer launches are not {small.layers} alike layers")
    one_layer = per_layer[: len(per_layer) // small.layers]
    others = [e for e in events if e["component"] != "model.layers"]
    step = [(e, 1) for e in others] + [(e, real.layers) for e in one_layer]
    rows: dict[str, dict] = {}
    bandwidth = BANDWIDTH[gpu]
    for e, times in step:
        nbytes, rule = kernel_bytes(e, batch, context, small, real, splits)
        key = rule if e.get("mm") else e["name"]  # one row per matmul of a layer
        us = max(nbytes / bandwidth * 1e6, FLOOR_US[e["kind"]])
        row = rows.setdefault(key, dict(name=key, kind=e["kind"], launches=0, bytes=0,
                                         predicted_us=0.0, rule=rule.split()[0]))
        row["launches"] += times
        row["bytes"] += nbytes * times
        row["predicted_us"] += us * times
    total_bytes = sum(r["bytes"] for r in rows.values())
    total_us = sum(r["predicted_us"] for r in rows.values())
    roofline = total_bytes / bandwidth * 1e6
    return {"kernels": list(rows.values()), "launches": sum(r["launches"] for r in rows.values()),
            "bytes": total_bytes, "predicted_us": total_us, "roofline_us": roofline,
            "roofline_share": roofline / total_us if total_us else 0.0,
            "by_kind": {k: sum(r["predicted_us"] for r in rows.values() if r["kind"] == k)
                        for k in FLOOR_US}}


def measured_kind(kernel_name: str, triton_names: set[str]) -> str:
    """The kind of a device kernel the profiler names: one of ours (Triton), cuBLAS's
    matmuls, or another aten kernel."""
    if kernel_name in triton_names:
        return "triton"
    low = kernel_name.lower()
    if any(s in low for s in ("gemm", "nvjet", "xmma", "cublas", "gemv", "splitk", "cutlass")):
        return "cublas"
    return "aten"
