"""Triton kernels of the fused sampler (temperature, repetition penalty, top-k, Gumbel race).

Two launches, no host synchronisation, every size on the device:

``chunk_kernel`` (grid ``[B, C]``) reads one chunk of ``CHUNK`` logits of one row, once,
and keeps it in registers. It forms ``z`` exactly as :mod:`lmgen_fast.reference` does and
writes a few per-chunk aggregates: the maximum and its first index (greedy, ``+inf`` and
empty rows); for rows without top-k (or chunks holding ``+inf``) the best race key; for
top-k rows a bounded set of candidates, namely every finite value at or above a threshold
``t`` at most the chunk's own k-th largest value. The global k-th largest is at least every
chunk's k-th largest, so the union of the candidates holds every survivor of top-k and has
the same k-th largest value as the whole row: the merge step is exact. ``t`` is found by a
bitwise search on order-preserving integer keys that stops as soon as at most ``CAP`` values
remain, usually after a few steps. Should the exact k-th largest still leave more than
``CAP`` values (many equal values), the values equal to it are summarised as one tie group
(its value, size, best race key and index) instead of being stored.

``merge_kernel`` (grid ``[B]``) combines a row's chunks: greedy argmax, the ``+inf`` race,
the race without top-k, or, for top-k rows, the exact k-th largest key over the candidates
(a 32-step bitwise search) and the race over the survivors, whose noise is computed there.

Noise: Triton's Philox keyed on (row seed, step, token id), exactly as
:mod:`lmgen_fast.philox` defines it, so the CPU reference replays the GPU's picks.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Sentinel index larger than any token id; ties of race keys go to the lowest id.
BIG_INDEX = 2**31 - 1
# Bits of the per-row status word the kernels leave for the launcher.
STATUS_EMPTY = 1  # nothing to sample: all NaN or -inf
STATUS_OVERFLOW = 2  # top-k larger than the candidate capacity the launch was sized for
STATUS_INTERNAL = 4  # an id outside [0, V) was about to be returned (a bug)


@triton.jit
def _gumbel(seed, step, idx):
    """Gumbel noise ``-log(-log(u))`` of tokens ``idx`` (int32) for one row's seed and step."""
    zero = (idx * 0).to(tl.uint32)
    c0, _c1, _c2, _c3 = tl.philox(seed, idx.to(tl.uint32), zero + step.to(tl.uint32), zero, zero)
    u = tl.random.uint_to_uniform_float(c0)
    # Same floor as lmgen_fast.philox.UNIFORM_FLOOR: keeps every key finite.
    u = tl.maximum(u, 2.3283064365386963e-10)
    return -tl.log(-tl.log(u))


@triton.jit
def _to_key(z):
    """Order-preserving map of float32 (no NaN, zeros canonical) to uint32."""
    b = z.to(tl.uint32, bitcast=True)
    return tl.where((b >> 31) == 1, ~b, b | 0x80000000)


@triton.jit
def _from_key(k):
    b = tl.where((k >> 31) == 1, k ^ 0x80000000, ~k)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _best(key, idx, valid):
    """Largest key among ``valid`` lanes and the lowest index holding it (BIG if none)."""
    key = tl.where(valid, key, float("-inf"))
    best = tl.max(key, axis=0)
    at = tl.min(tl.where(valid & (key == best), idx, 2147483647), axis=0)
    return best, at


@triton.jit
def _combine(best, at, best2, at2):
    """Merge two (key, index) race results; an exact tie goes to the lower index."""
    new = tl.maximum(best, best2)
    a = tl.where(best == new, at, 2147483647)
    b = tl.where(best2 == new, at2, 2147483647)
    return new, tl.minimum(a, b)


@triton.jit
def _slots(ncand_ptr, ckey_ptr, row, n_chunks, base, s0, n_slots, CAP: tl.constexpr,
           TILE: tl.constexpr):
    """Validity and keys of candidate slots ``s0 .. s0 + TILE`` of one row."""
    s = s0 + tl.arange(0, TILE)
    live = s < n_slots
    n_c = tl.load(ncand_ptr + row * n_chunks + s // CAP, mask=live, other=0)
    valid = live & (s % CAP < n_c)
    key = tl.load(ckey_ptr + base + s, mask=valid, other=0).to(tl.uint32, bitcast=True)
    return valid, key


@triton.jit
def chunk_kernel(
    logits_ptr, stride_row, V,
    temp_ptr, topk_ptr, once_ptr, seed_ptr, step_ptr,
    win_ptr, W, wrange_ptr, pow_ptr,
    cmax_ptr, cidx_ptr, rkey_ptr, ridx_ptr,
    ncand_ptr, ckey_ptr, cidx_buf_ptr,
    gkey_ptr, gcnt_ptr, gbest_ptr, gidx_ptr,
    status_ptr,
    CHUNK: tl.constexpr, CAP: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    inb = offs < V
    row64 = row.to(tl.int64)
    x = tl.load(logits_ptr + row64 * stride_row + offs, mask=inb, other=float("-inf"))

    temp = tl.load(temp_ptr + row)
    greedy = temp == 0.0
    # IEEE division: the reference divides in float32 with correct rounding.
    z = tl.math.div_rn(x.to(tl.float32), tl.where(greedy, 1.0, temp))
    z = tl.where(z != z, float("-inf"), z)

    # Repetition penalty: the window is sorted per row and wrange gives the slice of it
    # that falls in this chunk, so a chunk only scans its own window entries.
    w_lo = tl.load(wrange_ptr + row * (n_chunks + 1) + chunk)
    w_hi = tl.load(wrange_ptr + row * (n_chunks + 1) + chunk + 1)
    if w_hi > w_lo:
        count = tl.zeros([CHUNK], dtype=tl.int32)
        for j in range(w_lo, w_hi):
            tok = tl.load(win_ptr + row64 * W + j)
            count += (offs == tok).to(tl.int32)
        once = tl.load(once_ptr + row) != 0
        count = tl.where(once, tl.minimum(count, 1), count)
        hit = count > 0
        factor = tl.load(pow_ptr + row64 * (W + 1) + count, mask=hit, other=1.0)
        pen = tl.where(z > 0.0, tl.math.div_rn(z, factor), z * factor)
        z = tl.where(hit, pen, z)
    # -0.0 and +0.0 are one value for top-k and argmax: give them one key.
    z = tl.where(z == 0.0, 0.0, z)

    cmax = tl.max(z, axis=0)
    cidx = tl.min(tl.where(inb & (z == cmax), offs, 2147483647), axis=0)
    out_at = row * n_chunks + chunk
    tl.store(cmax_ptr + out_at, cmax)
    tl.store(cidx_ptr + out_at, cidx)

    kk = tl.load(topk_ptr + row)
    k_eff = tl.where((kk > 0) & (kk < V), kk, 0).to(tl.int32)
    seed = tl.load(seed_ptr + row)
    step = tl.load(step_ptr + row)
    has_inf = cmax == float("inf")
    sampled = temp != 0.0

    rkey = tl.full([], float("-inf"), tl.float32)
    ridx = tl.full([], 2147483647, tl.int32)
    if sampled & (has_inf | (k_eff == 0)):
        g = _gumbel(seed, step, offs)
        # A row with +inf races among its +inf tokens alone, each with z = 0.
        race = tl.where(has_inf, tl.where(z == float("inf"), g, float("-inf")), z + g)
        rkey, ridx = _best(race, offs, inb & (race > float("-inf")))
    tl.store(rkey_ptr + out_at, rkey)
    tl.store(ridx_ptr + out_at, ridx)

    n_emit = tl.zeros([], dtype=tl.int32)
    gkey = tl.zeros([], dtype=tl.uint32)
    gcnt = tl.zeros([], dtype=tl.int32)
    gbest = tl.full([], float("-inf"), tl.float32)
    gidx = tl.full([], 2147483647, tl.int32)
    if sampled & (k_eff > 0) & (cmax != float("inf")):
        key = tl.where(inb, _to_key(z), 0)
        finite = inb & (z > float("-inf"))
        # Largest prefix t with count(key >= t) >= k, refined bit by bit until at most CAP
        # keys remain at or above it (those keys hold the chunk's top k).
        prefix = tl.zeros([], dtype=tl.uint32)
        bit = tl.full([], 0x80000000, dtype=tl.uint32)
        cnt = tl.sum(inb.to(tl.int32), axis=0)
        while (cnt > CAP) & (bit != 0):
            trial = prefix | bit
            c = tl.sum((key >= trial).to(tl.int32), axis=0)
            take = c >= k_eff
            prefix = tl.where(take, trial, prefix)
            cnt = tl.where(take, c, cnt)
            bit = bit >> 1
        # Still too many: prefix is the exact k-th largest key and ties fill the buffer.
        ties = cnt > CAP
        emit = finite & tl.where(ties, key > prefix, key >= prefix)
        emit_i = emit.to(tl.int32)
        pos = tl.cumsum(emit_i, axis=0) - 1
        n_emit = tl.sum(emit_i, axis=0)
        slot = row64 * n_chunks * CAP + chunk * CAP + pos
        ok = emit & (pos < CAP)
        tl.store(ckey_ptr + slot, key.to(tl.int32, bitcast=True), mask=ok)
        tl.store(cidx_buf_ptr + slot, offs, mask=ok)
        if n_emit > CAP:
            # Only a row whose k exceeds the capacity the launcher sized CAP for.
            tl.atomic_or(status_ptr + row, 2)
        if ties:
            eq = finite & (key == prefix)
            gkey = prefix
            gcnt = tl.sum(eq.to(tl.int32), axis=0)
            g = _gumbel(seed, step, offs)
            gbest, gidx = _best(z + g, offs, eq)
    tl.store(ncand_ptr + out_at, tl.minimum(n_emit, CAP))
    tl.store(gkey_ptr + out_at, gkey.to(tl.int32, bitcast=True))
    tl.store(gcnt_ptr + out_at, gcnt)
    tl.store(gbest_ptr + out_at, gbest)
    tl.store(gidx_ptr + out_at, gidx)


@triton.jit
def merge_kernel(
    V, n_chunks,
    temp_ptr, topk_ptr, seed_ptr, step_ptr,
    cmax_ptr, cidx_ptr, rkey_ptr, ridx_ptr,
    ncand_ptr, ckey_ptr, cidx_buf_ptr,
    gkey_ptr, gcnt_ptr, gbest_ptr, gidx_ptr,
    out_ptr, status_ptr,
    CAP: tl.constexpr, CP: tl.constexpr, TILE: tl.constexpr, ONE_TILE: tl.constexpr,
):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    ch = tl.arange(0, CP)
    cm = ch < n_chunks
    at = row * n_chunks + ch
    cmax = tl.load(cmax_ptr + at, mask=cm, other=float("-inf"))
    cidx = tl.load(cidx_ptr + at, mask=cm, other=2147483647)
    row_max = tl.max(cmax, axis=0)
    out = tl.min(tl.where(cm & (cmax == row_max), cidx, 2147483647), axis=0)
    empty = row_max == float("-inf")

    temp = tl.load(temp_ptr + row)
    kk = tl.load(topk_ptr + row)
    k_eff = tl.where((kk > 0) & (kk < V), kk, 0).to(tl.int32)
    sampled = (temp != 0.0) & (row_max > float("-inf"))
    has_inf = row_max == float("inf")
    no_inf = row_max != float("inf")

    if sampled & (has_inf | (k_eff == 0)):
        rkey = tl.load(rkey_ptr + at, mask=cm, other=float("-inf"))
        ridx = tl.load(ridx_ptr + at, mask=cm, other=2147483647)
        # Only chunks that hold +inf raced among +inf tokens.
        # (A vector comparison: the interpreter mis-broadcasts scalar booleans.)
        row_max_v = tl.zeros([CP], dtype=tl.float32) + row_max
        use = cm & ((cmax == float("inf")) | (row_max_v != float("inf")))
        _b, out = _best(rkey, ridx, use & (rkey > float("-inf")))
    if sampled & (k_eff > 0) & no_inf:
        seed = tl.load(seed_ptr + row)
        step = tl.load(step_ptr + row)
        gkey = tl.load(gkey_ptr + at, mask=cm, other=0).to(tl.uint32, bitcast=True)
        gcnt = tl.load(gcnt_ptr + at, mask=cm, other=0)
        n_slots = n_chunks * CAP
        base = row64 * n_slots
        # The k-th largest key of the candidates (tie groups count with their size) is
        # the row's k-th largest value: every value at or above it is a candidate.
        prefix = tl.zeros([], dtype=tl.uint32)
        bit = tl.full([], 0x80000000, dtype=tl.uint32)
        best = tl.full([], float("-inf"), tl.float32)
        best_at = tl.full([], 2147483647, tl.int32)
        if ONE_TILE:
            # The usual case (k up to a few hundred): the candidates stay in registers.
            valid, key = _slots(ncand_ptr, ckey_ptr, row, n_chunks, base, 0, n_slots, CAP, TILE)
            for _ in range(32):
                trial = prefix | bit
                c = tl.sum(tl.where(gkey >= trial, gcnt, 0), axis=0)
                c += tl.sum((valid & (key >= trial)).to(tl.int32), axis=0)
                prefix = tl.where(c >= k_eff, trial, prefix)
                bit = bit >> 1
            tok = tl.load(cidx_buf_ptr + base + tl.arange(0, TILE), mask=valid, other=0)
            race = _from_key(key) + _gumbel(seed, step, tok)
            best, best_at = _best(race, tok, valid & (key >= prefix))
        else:
            for _ in range(32):
                trial = prefix | bit
                c = tl.sum(tl.where(gkey >= trial, gcnt, 0), axis=0)
                for s0 in range(0, n_slots, TILE):
                    valid, key = _slots(
                        ncand_ptr, ckey_ptr, row, n_chunks, base, s0, n_slots, CAP, TILE
                    )
                    c += tl.sum((valid & (key >= trial)).to(tl.int32), axis=0)
                prefix = tl.where(c >= k_eff, trial, prefix)
                bit = bit >> 1
            for s0 in range(0, n_slots, TILE):
                valid, key = _slots(
                    ncand_ptr, ckey_ptr, row, n_chunks, base, s0, n_slots, CAP, TILE
                )
                tok = tl.load(cidx_buf_ptr + base + s0 + tl.arange(0, TILE), mask=valid, other=0)
                race = _from_key(key) + _gumbel(seed, step, tok)
                b2, a2 = _best(race, tok, valid & (key >= prefix))
                best, best_at = _combine(best, best_at, b2, a2)
        # prefix stays 0 when fewer than k finite values exist: every candidate survives.
        gbest = tl.load(gbest_ptr + at, mask=cm, other=float("-inf"))
        gidx = tl.load(gidx_ptr + at, mask=cm, other=2147483647)
        b2, a2 = _best(gbest, gidx, cm & (gcnt > 0) & (gkey >= prefix))
        best, out = _combine(best, best_at, b2, a2)

    # Never an out-of-range id: an empty row yields 0 and is reported in status.
    bad = (out >= V) | (out < 0)
    status = tl.load(status_ptr + row)
    status = status | tl.where(empty, 1, 0) | tl.where(bad & (row_max > float("-inf")), 4, 0)
    tl.store(status_ptr + row, status)
    tl.store(out_ptr + row, tl.where(empty | bad, 0, out).to(tl.int64))
