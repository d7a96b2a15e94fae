"""The sampler's chunk kernel: one read of the logits, per chunk of the vocabulary.

Temperature, repetition, frequency and presence penalties, top-k, top-p, min-p, the Gumbel
race and the raw log-softmax normaliser take two launches, this one and the merge
(:mod:`lmgen_fast.kernels.merge`), with no host synchronisation and every size on the
device.

``chunk_kernel`` (grid ``[B, C]``) reads one chunk of ``CHUNK`` logits of one row, once,
and keeps it in registers. It forms ``z`` exactly as :mod:`lmgen_fast.reference` does
(SPEC section 7's bias and masks included: the row's bias entries in the chunk, found by a
binary search of its sorted list, and one int32 word per 32 logits of each bitmask, read
beside the logits) and
writes a few per-chunk aggregates: the maximum and its first index (greedy, ``+inf`` and
empty rows); for rows without any filter (or chunks holding ``+inf``) the best race key;
for filtered rows a bounded set of candidates, namely every finite value at or above a
threshold ``t`` at most the chunk's own ``k_sel``-th largest value (``k_sel`` is top-k, or
``CAP // 2`` for top-p/min-p rows without top-k). ``t`` is found by a bitwise search on
order-preserving integer keys that stops as soon as at most ``CAP`` values remain. Should
the exact ``k_sel``-th largest still leave more than ``CAP`` values (many equal values),
the values equal to it are summarised as one tie group (its value, size, best race key and
index) instead of being stored. Each chunk also leaves its threshold ``t`` and, for
top-p rows and processed-log-probability rows without top-k, ``sum(exp(z - chunk max))``
(the count of ``+inf`` values in a chunk holding some); with ``LOGPROBS`` the maximum and
the sum of exponentials of the raw logits.
"""

from __future__ import annotations

import triton
import triton.language as tl
from lmgen_fast.kernels.sampling_common import (
    device_exp,
    gumbel,
    race_best,
    row_masks,
    row_z,
    to_key,
)


@triton.jit
def chunk_kernel(
    logits_ptr, stride_row, V,
    temp_ptr, topk_ptr, once_ptr, seed_ptr, step_ptr,
    top_p_ptr, mlog_ptr, fpen_ptr, ppen_ptr, proc_ptr,
    win_ptr, W, wrange_ptr, pow_ptr,
    flags_ptr, mint_ptr, bias_ids_ptr, bias_vals_ptr, K, allowed_ptr, A, bm_ptr, BM,
    stop_ptr, S,
    cmax_ptr, cidx_ptr, rkey_ptr, ridx_ptr,
    ncand_ptr, ckey_ptr, cidx_buf_ptr,
    gkey_ptr, gcnt_ptr, gbest_ptr, gidx_ptr,
    ctau_ptr, csum_ptr, rmax_ptr, rsum_ptr,
    status_ptr,
    CHUNK: tl.constexpr, CAP: tl.constexpr, LOGPROBS: tl.constexpr, ACC: tl.constexpr,
    WT: tl.constexpr, MASKS: tl.constexpr,
):
    """One chunk of ``CHUNK`` logits of one row (grid ``[B, n_chunks]``): its ``z``, its
    aggregates and its candidates, as the module docstring lists them.

    Length: one pass over the logits in one launch. The body holds the chunk in registers
    from the first load to the last store; split into several kernels it would add
    launches and read the logits again.
    """
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    inb = offs < V
    row64 = row.to(tl.int64)

    temp = tl.load(temp_ptr + row)
    step = tl.load(step_ptr + row)
    # SPEC section 7's bias and masks, read beside the logits (MASKS: some row has them).
    flags, under = row_masks(flags_ptr, mint_ptr, row, step, MASKS)
    # The window is grouped by chunk and wrange gives the slice of it that falls in this
    # chunk, so a chunk only counts its own window entries (WT at a time).
    w_lo = tl.load(wrange_ptr + row * (n_chunks + 1) + chunk)
    w_hi = tl.load(wrange_ptr + row * (n_chunks + 1) + chunk + 1)
    x, z = row_z(logits_ptr, row64, stride_row, V, chunk * CHUNK, temp,
                 tl.load(once_ptr + row) != 0, tl.load(fpen_ptr + row),
                 tl.load(ppen_ptr + row), win_ptr, W, w_lo, w_hi, pow_ptr,
                 flags, under, bias_ids_ptr, bias_vals_ptr, K, allowed_ptr, A, bm_ptr, BM,
                 stop_ptr, S, CHUNK, WT, MASKS)

    cmax = tl.max(z, axis=0)
    cidx = tl.min(tl.where(inb & (z == cmax), offs, 2147483647), axis=0)
    out_at = row * n_chunks + chunk
    tl.store(cmax_ptr + out_at, cmax)
    tl.store(cidx_ptr + out_at, cidx)

    if LOGPROBS:
        # log_softmax of the raw logits with NaN as -inf; where +inf values exist they share
        # all the mass (SPEC section 3), so such a chunk leaves their count instead.
        xr = tl.where(x != x, float("-inf"), x)
        rmax = tl.max(xr, axis=0)
        rsum = tl.sum(tl.where(xr > float("-inf"), device_exp(xr - rmax, ACC), 0.0), axis=0)
        n_inf = tl.sum((xr == float("inf")).to(tl.float32), axis=0)
        tl.store(rmax_ptr + out_at, rmax)
        tl.store(rsum_ptr + out_at, tl.where(rmax == float("inf"), n_inf, rsum))

    kk = tl.load(topk_ptr + row)
    k_eff = tl.where((kk > 0) & (kk < V), kk, 0).to(tl.int32)
    top_p = tl.load(top_p_ptr + row)
    nucleus = (top_p < 1.0) | (tl.load(mlog_ptr + row) > float("-inf"))
    # Top-p/min-p rows without top-k keep CAP // 2 candidates per chunk: usually the
    # nucleus lies among them and the merge needs no second read of the row.
    k_sel = tl.where(k_eff > 0, k_eff, tl.where(nucleus, CAP // 2, 0)).to(tl.int32)
    seed = tl.load(seed_ptr + row)
    has_inf = cmax == float("inf")
    sampled = temp != 0.0

    rkey = tl.full([], float("-inf"), tl.float32)
    ridx = tl.full([], 2147483647, tl.int32)
    if sampled & (has_inf | (k_sel == 0)):
        g = gumbel(seed, step, offs)
        # A row with +inf races among its +inf tokens alone, each with z = 0.
        race = tl.where(has_inf, tl.where(z == float("inf"), g, float("-inf")), z + g)
        rkey, ridx = race_best(race, offs, inb & (race > float("-inf")))
    tl.store(rkey_ptr + out_at, rkey)
    tl.store(ridx_ptr + out_at, ridx)

    # Processed log-probabilities need the normaliser of rows without top-k (top-p needs it
    # too) and the count of +inf values (their share) from the same read.
    proc = tl.zeros([], dtype=tl.int1)
    if LOGPROBS:
        proc = tl.load(proc_ptr + row) != 0
    csum = tl.zeros([], dtype=tl.float32)
    if sampled & (((k_eff == 0) & ((top_p < 1.0) | proc)) | (has_inf & proc)):
        n_pinf = tl.sum((z == float("inf")).to(tl.float32), axis=0)
        esum = tl.sum(tl.where(z > float("-inf"), device_exp(z - cmax, ACC), 0.0), axis=0)
        csum = tl.where(has_inf, n_pinf, esum)
    tl.store(csum_ptr + out_at, csum)

    n_emit = tl.zeros([], dtype=tl.int32)
    prefix = tl.zeros([], dtype=tl.uint32)
    gkey = tl.zeros([], dtype=tl.uint32)
    gcnt = tl.zeros([], dtype=tl.int32)
    gbest = tl.full([], float("-inf"), tl.float32)
    gidx = tl.full([], 2147483647, tl.int32)
    if sampled & (k_sel > 0) & (cmax != float("inf")):
        key = tl.where(inb, to_key(z), 0)
        finite = inb & (z > float("-inf"))
        # Largest prefix t with count(key >= t) >= k_sel, refined bit by bit until at
        # most CAP keys remain at or above it (those keys hold the chunk's top k_sel).
        bit = tl.full([], 0x80000000, dtype=tl.uint32)
        cnt = tl.sum(inb.to(tl.int32), axis=0)
        while (cnt > CAP) & (bit != 0):
            trial = prefix | bit
            c = tl.sum((key >= trial).to(tl.int32), axis=0)
            take = c >= k_sel
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
            g = gumbel(seed, step, offs)
            gbest, gidx = race_best(z + g, offs, eq)
    tl.store(ncand_ptr + out_at, tl.minimum(n_emit, CAP))
    # Every token of this chunk with key >= ctau is a candidate or in the tie group.
    tl.store(ctau_ptr + out_at, prefix.to(tl.int32, bitcast=True))
    tl.store(gkey_ptr + out_at, gkey.to(tl.int32, bitcast=True))
    tl.store(gcnt_ptr + out_at, gcnt)
    tl.store(gbest_ptr + out_at, gbest)
    tl.store(gidx_ptr + out_at, gidx)
