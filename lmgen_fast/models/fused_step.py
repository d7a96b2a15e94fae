"""One decode step of a :class:`~lmgen_fast.models.LlamaForPretraining` through the fused
Triton decode kernels (:mod:`lmgen_fast.models.fused_ops`) and cuBLAS matmuls.

Per layer of the one-token step: the q/k/v product (one matmul on the concatenated
weights), rotary + cache write + attention (one launch at any context), ``o_proj``, residual
add + RMSNorm, the gate/up product and SwiGLU (one Triton launch up to
:func:`~lmgen_fast.models.fused_mlp.use_fused_mlp` rows, else a matmul and a SwiGLU
launch), ``down_proj``, residual add + the next norm: seven kernels instead of eager's
dozens. Before the layers one launch gathers the embeddings and norms them; after them
``lm_head``; the last norm also advances the positions. At the article's configuration and
B=1: 7 x 12 + 2 = 86 model launches per step (``benchmarks/bench_launches.py`` counts
them). Nothing reads a tensor's values on the host, so a step can be captured in a CUDA
graph (``kv_len`` is a host int: one graph per value).

The multi-position forward (:meth:`FusedLlamaStep.forward`, ``T`` tokens per cache row)
writes all the tokens' keys and values first (``rope_cache``), then each token attends to
the slots up to its own position: causal by construction.

Models laid out like the article's and transformers ``LlamaForCausalLM`` reach
:class:`~lmgen_fast.models.decoder.CachedLlamaDecoder` as a LlamaForPretraining sharing their
tensors (``decoder.share_weights``), so they take this path too.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from lmgen_fast.models import fused_mlp as fm
from lmgen_fast.models import fused_ops as fo
from lmgen_fast.models.cache import KVCache
from lmgen_fast.models.llama import LlamaForPretraining, RMSNorm


def _triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``'s tensors in this process."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    # The interpreter takes CPU tensors only; compiled kernels take CUDA tensors only.
    return (device.type == "cuda") != interpret and device.type in ("cuda", "cpu")


def supported(model: object) -> bool:
    """Whether :class:`FusedLlamaStep` can run ``model`` (else the eager step is used).

    Needs a :class:`LlamaForPretraining` with our RMSNorm modules, head size a power of two
    ``>= 16`` (the kernels' tiles), every weight of one float dtype (float32, bfloat16 or
    float16) on one device where Triton runs (CUDA, or the CPU under ``TRITON_INTERPRET=1``),
    rotary tables in float32 or that dtype. Biases are allowed (added by the matmuls), and
    the per-head q/k norm (one launch before the attention's); a sliding window shorter
    than ``max_position_embeddings`` is not (such a model takes the eager cached step).
    """
    if not isinstance(model, LlamaForPretraining):
        return False
    c = model.config
    d = c.head_dim
    if d < 16 or d & (d - 1):
        return False
    weight = model.lm_head.weight
    if weight.dtype not in fo.FLOAT_DTYPES or not _triton_runs_on(weight.device):
        return False
    base = model.base_model
    norms = [base.norm] + [n for layer in base.layers
                           for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    if not all(isinstance(n, RMSNorm) for n in norms):
        return False
    if any(p.dtype != weight.dtype or p.device != weight.device for p in model.parameters()):
        return False
    if c.windowed():  # the kernels attend to every slot up to the row's position
        return False
    cos, sin = base.rotary_emb.cos, base.rotary_emb.sin
    return (cos.dtype in (torch.float32, weight.dtype) and sin.dtype == cos.dtype
            and cos.device == weight.device and cos.shape[-1] == d)


def _cat_or_none(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if parts[0] is None else torch.cat(parts)


class FusedWeights:
    """Per layer a copy of ``cat([q_proj, k_proj, v_proj])`` (``w_qkv``, ``(H + 2 KV) * D x
    hidden``) and of ``cat([gate_proj, up_proj])`` (``w_gu``, ``2 I x hidden``) in the model
    dtype, with their biases (``b_qkv``, ``b_gu``; None without): the weights of one matmul
    each in :class:`FusedLlamaStep`.

    That is the attention-input and MLP-input weights a second time: about 2/3 of the
    layers' weights (for the article's configuration, 12 x (1152 + 6144) x 768 values: 67 M,
    134 MB in bfloat16). :meth:`release` frees them; :meth:`refresh` rewrites them in place
    after the model's weights were written in place (same storage: captured CUDA graphs
    stay valid).
    """

    def __init__(self, model: LlamaForPretraining):
        self.model = model
        self.w_qkv: list[torch.Tensor] = []
        self.b_qkv: list[torch.Tensor | None] = []
        self.w_gu: list[torch.Tensor] = []
        self.b_gu: list[torch.Tensor | None] = []
        with torch.no_grad():
            for parts in self._sources():
                self.w_qkv.append(torch.cat(parts[0]))
                self.b_qkv.append(_cat_or_none(parts[1]))
                self.w_gu.append(torch.cat(parts[2]))
                self.b_gu.append(_cat_or_none(parts[3]))
        self.versions = self._versions()

    def _sources(self) -> list[tuple[list, list, list, list]]:
        """Per layer the q/k/v weights, their biases, the gate/up weights, their biases."""
        out = []
        for layer in self.model.base_model.layers:
            att, mlp = layer.self_attn, layer.mlp
            qkv = [att.q_proj, att.k_proj, att.v_proj]
            gu = [mlp.gate_proj, mlp.up_proj]
            out.append(([m.weight for m in qkv], [m.bias for m in qkv],
                        [m.weight for m in gu], [m.bias for m in gu]))
        return out

    def _versions(self) -> tuple[int, ...]:
        # Tensor version counters move with every in-place write (load_state_dict copies
        # into the parameters, optimiser steps), which fingerprint() does not see.
        return tuple(t._version for parts in self._sources() for group in parts
                     for t in group if t is not None)

    def refresh(self) -> None:
        """Rewrite the concatenated copies if a source weight was written in place."""
        versions = self._versions()
        if versions == self.versions:
            return
        with torch.no_grad():
            for i, parts in enumerate(self._sources()):
                torch.cat(parts[0], out=self.w_qkv[i])
                torch.cat(parts[2], out=self.w_gu[i])
                if self.b_qkv[i] is not None:
                    torch.cat(parts[1], out=self.b_qkv[i])
                if self.b_gu[i] is not None:
                    torch.cat(parts[3], out=self.b_gu[i])
        self.versions = versions

    def release(self) -> None:
        """Free the concatenated weights; the object is unusable afterwards."""
        self.w_qkv, self.b_qkv, self.w_gu, self.b_gu = [], [], [], []

    def extra_bytes(self) -> int:
        """Bytes held by the concatenated copies."""
        ts = [*self.w_qkv, *self.w_gu, *self.b_qkv, *self.b_gu]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


class StepGuard:
    """The fallback of :class:`FusedLlamaStep`: its first call through :meth:`guarded`
    turns a kernel failure into None and a warning (``broken`` says why)."""

    broken: str | None = None  # why the kernels failed here (the caller falls back)
    ok = False  # whether a step has run (failures after that are not fallbacks)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                kv_len: int, per_row: int = 1, advance: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def guarded(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                kv_len: int, per_row: int = 1, advance: bool = True) -> torch.Tensor | None:
        """:meth:`forward` (by default as :meth:`__call__`: one token per row, positions
        advanced), or None (with one warning) if the kernels fail on the first step: the
        caller then runs the eager step, which rewrites the same cache slots (the positions
        are advanced by the last Triton launch, so a failing one leaves them as they were)."""
        if self.ok:
            return self.forward(tokens, positions, cache, kv_len, per_row, advance)
        try:
            out = self.forward(tokens, positions, cache, kv_len, per_row, advance)
        except Exception as exc:  # compile or launch failure of the Triton kernels
            self.broken = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            warnings.warn(f"the fused decode kernels failed ({self.broken}); this decoder "
                          "runs the eager decode step instead", RuntimeWarning, stacklevel=3)
            return None
        self.ok = True
        return out


class FusedLlamaStep(StepGuard, FusedWeights):
    """The fused decode step of one model, built once from its weights.

    Memory: the concatenated weight copies of :class:`FusedWeights` (about 2/3 of the
    layers' weights a second time; :meth:`release` frees them, :meth:`refresh` rewrites them
    in place after the model's weights were written in place), and the attention's int32
    split counters (a few bytes per row and kv head, one buffer per row count).

    Parameters
    ----------
    model : LlamaForPretraining
        A model :func:`supported` accepts.

    Raises
    ------
    ValueError
        If :func:`supported` rejects the model.

    Length: half of it is the docstrings of :meth:`forward` and :meth:`__call__` (shapes and
    the in-place positions contract); the code is the layer loop and its buffers.
    """

    def __init__(self, model: LlamaForPretraining):
        if not supported(model):
            raise ValueError("this model cannot run the fused decode step (see "
                             "lmgen_fast.models.fused_step.supported)")
        c = model.config
        self.n_heads = c.num_attention_heads
        self.n_kv_heads = c.num_key_value_heads
        self.n_layers = c.num_hidden_layers
        self.broken = None
        self.ok = False
        # Rows -> the attention's split counters: zeroed once, left zeroed by every launch
        # (allocated on first use of a row count, so before a graph captures that shape).
        self.counters: dict[int, torch.Tensor] = {}
        super().__init__(model)

    def release(self) -> None:
        """Free the concatenated weights and the counters; the object is unusable after."""
        super().release()
        self.counters = {}

    def prepare(self, rows: int) -> None:
        """Allocate the attention's counters for steps of ``rows`` rows now (a zeroing
        launch), so that the steps themselves launch nothing but their kernels."""
        self._counters(rows, self.model.lm_head.weight.device)

    def _counters(self, rows: int, device: torch.device) -> torch.Tensor:
        buf = self.counters.get(rows)
        if buf is None:
            buf = self.counters[rows] = fo.new_counters(rows, self.n_kv_heads, device)
        return buf

    def _layer(self, i: int, h: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor,
               cache: KVCache, kv_len: int, per_row: int, last_norm: tuple) -> torch.Tensor:
        """Layer ``i`` on the normed input ``h`` ``[R, hidden]``; ``residual`` ``[R, hidden]``
        is updated in place; returns the next norm of the layer's output (``last_norm``:
        ``(norm, positions to advance or None)`` after the last layer)."""
        layer = self.model.base_model.layers[i]
        att, mlp = layer.self_attn, layer.mlp
        rot = self.model.base_model.rotary_emb
        counters = self._counters(h.shape[0], h.device)
        qkv = F.linear(h, self.w_qkv[i], self.b_qkv[i])
        if self.model.config.qk_norm:
            fo.qk_rmsnorm(qkv, att.q_norm.weight, att.k_norm.weight, att.q_norm.eps,
                          self.n_heads, self.n_kv_heads)
        if per_row == 1:  # rotary and cache write inside the attention launch
            a = fo.rope_attention(qkv, positions, rot.cos, rot.sin, cache.k[i], cache.v[i],
                                  self.n_heads, kv_len, counters=counters)
        else:  # every token's k/v written before any token attends
            q = fo.rope_cache(qkv, positions, rot.cos, rot.sin, cache.k[i], cache.v[i],
                              self.n_heads, per_row)
            a = fo.decode_attention(q, cache.k[i], cache.v[i], positions, kv_len,
                                    counters=counters, per_row=per_row)
        norm = layer.post_attention_layernorm
        h = fo.add_rmsnorm(F.linear(a, att.o_proj.weight, att.o_proj.bias), norm.weight,
                           norm.eps, residual)
        # Few rows: one Triton launch reads the gate/up weights and applies SwiGLU (a launch
        # and a cuBLAS floor fewer per layer); many rows: cuBLAS's tiles, then SwiGLU.
        if fm.use_fused_mlp(h.shape[0]):
            act = fm.gate_up_swiglu(h, self.w_gu[i], self.b_gu[i])
        else:
            act = fo.swiglu(F.linear(h, self.w_gu[i], self.b_gu[i]))
        nxt, advance = (self.model.base_model.layers[i + 1].input_layernorm, None) \
            if i + 1 < self.n_layers else last_norm
        return fo.add_rmsnorm(F.linear(act, mlp.down_proj.weight, mlp.down_proj.bias),
                              nxt.weight, nxt.eps, residual, positions=advance)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                kv_len: int, per_row: int = 1, advance: bool = False) -> torch.Tensor:
        """``per_row`` tokens per cache row through the model, writing the cache; no host
        synchronisation.

        Parameters
        ----------
        tokens : LongTensor
            ``[R]`` int64 token ids, ``R = B * per_row``: flattened row ``r`` is token
            ``r % per_row`` of cache row ``r // per_row``.
        positions : LongTensor
            ``[R]`` contiguous int64, each token's position (its slot in the cache),
            ``< kv_len``; a row's tokens attend to the slots up to their own position.
        cache : KVCache
            The model's static cache with ``B`` rows (``model.new_cache``).
        kv_len : int
            Static bound on the slots read, as in ``forward_cached``.
        per_row : int
            Tokens per cache row (``T``).
        advance : bool
            Add one to every position in place, in the step's last norm launch (after the
            last read of them); ``per_row`` must be 1.

        Returns
        -------
        Tensor
            ``[R, V]`` logits in the model dtype, as ``lm_head(forward_cached(...))``.
        """
        if advance and per_row != 1:
            raise ValueError("advance needs one token per row")
        base = self.model.base_model
        with torch.no_grad():
            first = base.layers[0].input_layernorm
            # The residual is a fresh tensor, updated in place by each add_rmsnorm.
            h, residual = fo.embed_rmsnorm(tokens, base.embed_tokens.weight, first.weight,
                                           first.eps)
            last = (base.norm, positions if advance else None)
            for i in range(self.n_layers):
                h = self._layer(i, h, residual, positions, cache, kv_len, per_row, last)
            return F.linear(h, self.model.lm_head.weight, self.model.lm_head.bias)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                 kv_len: int) -> torch.Tensor:
        """One token per row through the model, writing the cache and ADVANCING
        ``positions`` by one in place (inside the step's last norm launch: no separate
        ``add_``); no host synchronisation.

        Parameters
        ----------
        tokens : LongTensor
            ``[B]`` int64 token ids.
        positions : LongTensor
            ``[B]`` contiguous int64, each row's position (its slot in the cache),
            ``< kv_len``; each is one more on return.
        cache : KVCache
            The model's static cache with ``B`` rows (``model.new_cache``).
        kv_len : int
            Static bound on the slots read, as in ``forward_cached``.

        Returns
        -------
        Tensor
            ``[B, V]`` logits in the model dtype, as ``lm_head(forward_cached(...)[:, 0])``.
        """
        return self.forward(tokens, positions, cache, kv_len, advance=True)
