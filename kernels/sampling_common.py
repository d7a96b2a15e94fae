"""Shared ``@triton.jit`` helpers of the fused sampler's kernels (:mod:`lmgen_fast.kernels.
chunk` and :mod:`lmgen_fast.kernels.merge`): the noise, the order-preserving keys, the race
and the processed logits ``z`` of a block of tokens, which both kernels form with this very
code so that they agree bit for bit.

Noise: Triton's Philox keyed on (row seed, step, token id), exactly as
:mod:`lmgen_fast.core.philox` defines it, so the CPU reference replays the GPU's picks.

Rounding: on CUDA (``ACC``) every ``exp`` whose value decides a token (top-p masses and
their normaliser, the log-softmax sums) is the device library's ``expf``, the function
torch's CUDA kernels call, rather than ``tl.exp`` (``ex2.approx``), and every division is
correctly rounded (``div_rn``; a plain ``/`` compiles to an approximate division). Min-p
uses no ``exp`` at all, so it agrees with the reference bit for bit on every device. Top-p
compares its float32 masses with the user's ``top_p`` loaded as float64 (never rounded).

The status bits below are those of :mod:`lmgen_fast.core.errors` (``tests/core/
test_errors.py`` holds them equal); the kernels write them as literals, since JIT code reads
no global of another module.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # triton >= 3.0: dispatches to the CUDA (or HIP) device library
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older layouts
    from triton.language.extra.cuda import libdevice

# Bits of the per-row status word the kernels leave for the launcher.
STATUS_EMPTY = 1  # nothing to sample: all NaN or -inf
STATUS_OVERFLOW = 2  # top-k larger than the candidate capacity the launch was sized for
STATUS_INTERNAL = 4  # an id outside [0, V) was about to be returned (a bug)
STATUS_SLOW = 8  # informational: a top-p/min-p row took the multi-pass path


@triton.jit
def gumbel(seed, step, idx):
    """Gumbel noise ``-log(-log(u))`` of tokens ``idx`` (int32) for one row's seed and step."""
    zero = (idx * 0).to(tl.uint32)
    c0, _c1, _c2, _c3 = tl.philox(seed, idx.to(tl.uint32), zero + step.to(tl.uint32), zero, zero)
    u = tl.random.uint_to_uniform_float(c0)
    # Same floor as lmgen_fast.philox.UNIFORM_FLOOR: keeps every key finite.
    u = tl.maximum(u, 2.3283064365386963e-10)
    return -tl.log(-tl.log(u))


@triton.jit
def to_key(z):
    """Order-preserving map of float32 (no NaN, zeros canonical) to uint32."""
    b = z.to(tl.uint32, bitcast=True)
    return tl.where((b >> 31) == 1, ~b, b | 0x80000000)


@triton.jit
def from_key(k):
    """The float32 of a key of :func:`to_key` (its inverse)."""
    b = tl.where((k >> 31) == 1, k ^ 0x80000000, ~k)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def race_best(key, idx, valid):
    """Largest key among ``valid`` lanes and the lowest index holding it (BIG if none)."""
    key = tl.where(valid, key, float("-inf"))
    best = tl.max(key, axis=0)
    at = tl.min(tl.where(valid & (key == best), idx, 2147483647), axis=0)
    return best, at


@triton.jit
def race_combine(best, at, best2, at2):
    """Merge two (key, index) race results; an exact tie goes to the lower index."""
    new = tl.maximum(best, best2)
    a = tl.where(best == new, at, 2147483647)
    b = tl.where(best2 == new, at2, 2147483647)
    return new, tl.minimum(a, b)


@triton.jit
def window_counts(win_ptr, row64, W, w_lo, w_hi, base, BLOCK: tl.constexpr, WT: tl.constexpr):
    """How often each token ``base + i`` (``i < BLOCK``) occurs in ``win_ptr[row, w_lo:w_hi]``
    (int32 ``[BLOCK]``); entries outside the block (empty slots ``-1`` too) count nowhere.

    The entries are read ``WT`` at a time and counted together by ``tl.histogram``, one
    entry per thread: ``WT`` is the program's thread count (``32 * num_warps``), since the
    histogram's lowering sums every thread's ballots and a smaller tile, held twice, could
    be counted twice.
    """
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for t in range(w_lo, w_hi, WT):
        j = t + tl.arange(0, WT)
        tok = tl.load(win_ptr + row64 * W + j, mask=j < w_hi, other=-1)
        local = tok - base
        ok = (j < w_hi) & (local >= 0) & (local < BLOCK)
        # Masked entries read as bin 0 (the interpreter counts a masked value that lies
        # outside the bins anyway; the GPU drops it).
        count += tl.histogram(tl.where(ok, local, 0).to(tl.int32), BLOCK, mask=ok)
    return count


@triton.jit
def _bits(words_ptr, offs, inb):
    """Whether a token bitmask (one row's int32 words at ``words_ptr``) allows tokens
    ``offs``: bit ``offs % 32`` of word ``offs // 32`` (lanes of a word share one load)."""
    w = tl.load(words_ptr + offs // 32, mask=inb, other=-1)
    return ((w >> (offs % 32)) & 1) != 0


@triton.jit
def _bias(x, offs, ids_ptr, vals_ptr, K, base, BLOCK: tl.constexpr):
    """``x[t] + b`` for the entries ``(t, b)`` of one row's bias list (``K`` ids ascending,
    ``-1`` padded at the end) that fall in ``base .. base + BLOCK``: a binary search for
    the first, then one select per entry."""
    lo = tl.zeros([], dtype=tl.int32)
    hi = tl.zeros([], dtype=tl.int32) + K
    while lo < hi:
        mid = (lo + hi) // 2
        v = tl.load(ids_ptr + mid)
        below = (v >= 0) & (v < base)
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    j = lo
    v = tl.load(ids_ptr + j, mask=j < K, other=-1)
    while (v >= 0) & (v < base + BLOCK):
        x = tl.where(offs == v, x + tl.load(vals_ptr + j), x)
        j += 1
        v = tl.load(ids_ptr + j, mask=j < K, other=-1)
    return x


@triton.jit
def row_masks(flags_ptr, mint_ptr, row, step, MASKS: tl.constexpr):
    """``(flags, under)`` of one row for :func:`constrain`: its PackedParams.constraints
    bits and whether its ``step`` is below its ``min_tokens``; ``(0, False)`` in a launch
    without masks, which reads neither."""
    flags = tl.zeros([], dtype=tl.int32)
    under = tl.zeros([], dtype=tl.int1)
    if MASKS:
        flags = tl.load(flags_ptr + row)
        under = step < tl.load(mint_ptr + row)
    return flags, under


@triton.jit
def constrain(x, offs, inb, row64, flags, under, bias_ids_ptr, bias_vals_ptr, K,
              allowed_ptr, A, bm_ptr, BM, stop_ptr, S, base,
              BLOCK: tl.constexpr, MASKS: tl.constexpr):
    """SPEC section 7 on the raw float32 logits ``x`` of tokens ``offs`` of one row: the
    row's biases added (``flags`` bit 1), then ``-inf`` for tokens outside its allowed
    bitmask (bit 2), tokens the step's bitmask forbids (``BM`` words per row; 0: none)
    and, while ``under`` (step < min_tokens), its ``S`` stop ids. ``MASKS`` compiles this
    in; a launch without any of them has no code for them (:func:`row_masks`)."""
    if MASKS:
        if (flags & 1) != 0:
            x = _bias(x, offs, bias_ids_ptr + row64 * K, bias_vals_ptr + row64 * K, K, base,
                      BLOCK)
        if (flags & 2) != 0:
            x = tl.where(_bits(allowed_ptr + row64 * A, offs, inb), x, float("-inf"))
        if BM > 0:
            x = tl.where(_bits(bm_ptr + row64 * BM, offs, inb), x, float("-inf"))
        if under:
            for j in range(S):
                x = tl.where(offs == tl.load(stop_ptr + row64 * S + j), float("-inf"), x)
    return x


@triton.jit
def row_z(logits_ptr, row64, stride_row, V, base, temp, once, fpen, ppen,
          win_ptr, W, w_lo, w_hi, pow_ptr,
          flags, under, bias_ids_ptr, bias_vals_ptr, K, allowed_ptr, A, bm_ptr, BM, stop_ptr,
          S, BLOCK: tl.constexpr, WT: tl.constexpr, MASKS: tl.constexpr):
    """Raw float32 logits ``x`` and processed ``z`` of tokens ``base .. base + BLOCK`` of one
    row (``[BLOCK]`` each).

    ``win_ptr[w_lo:w_hi]`` must hold every window entry that can fall in the block (others
    are ignored), ``WT`` is the program's thread count (:func:`window_counts`); the
    arguments from ``flags`` on are :func:`constrain`'s. The chunk kernel and the merge's
    slow path share this code so that they agree bit for bit on ``z``; ``x`` is the
    model's, before any bias or mask (raw log-probabilities describe it).
    """
    offs = base + tl.arange(0, BLOCK)
    inb = offs < V
    x = tl.load(logits_ptr + row64 * stride_row + offs, mask=inb, other=float("-inf"))
    x = x.to(tl.float32)
    xc = constrain(x, offs, inb, row64, flags, under, bias_ids_ptr, bias_vals_ptr, K,
                   allowed_ptr, A, bm_ptr, BM, stop_ptr, S, base, BLOCK, MASKS)
    t_eff = tl.where(temp == 0.0, 1.0, temp)
    # IEEE division: the reference divides in float32 with correct rounding.
    z = tl.math.div_rn(xc, t_eff)
    z = tl.where(z != z, float("-inf"), z)
    if w_hi > w_lo:
        count = window_counts(win_ptr, row64, W, w_lo, w_hi, base, BLOCK, WT)
        hit = count > 0
        c_rep = tl.where(once, tl.minimum(count, 1), count)
        factor = tl.load(pow_ptr + row64 * (W + 1) + c_rep, mask=hit, other=1.0)
        pen = tl.where(z > 0.0, tl.math.div_rn(z, factor), z * factor)
        z = tl.where(hit, pen, z)
        # OpenAI-style penalties on the raw count, whatever penalty_mode says; two
        # products then one add, as the reference rounds them (no FMA in these launches).
        adj = fpen * count.to(tl.float32) + ppen * hit.to(tl.float32)
        z = tl.where(hit, z - tl.math.div_rn(adj, t_eff), z)
    # -0.0 and +0.0 are one value for top-k and argmax: give them one key.
    z = tl.where(z == 0.0, 0.0, z)
    return x, z


@triton.jit
def device_exp(x, ACCURATE: tl.constexpr):
    """``exp`` as torch computes it on the same device, where that matters (min-p's test).

    On CUDA, ``tl.exp`` is ``ex2.approx`` (a few ulps off ``expf``); the device library's
    ``expf`` is the one torch's CUDA kernels call. The interpreter has only NumPy's exp.
    """
    if ACCURATE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)
