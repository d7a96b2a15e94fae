"""The sampler's merge kernel: one program per row combines the row's chunks.

``merge_kernel`` (grid ``[B]``) reads what :mod:`lmgen_fast.kernels.chunk` left per chunk:
greedy argmax, the ``+inf`` race, the race without filters, or, for filtered rows:

* top-k: the exact k-th largest key over the candidates (a 32-step bitwise search). Every
  value at or above it is a candidate, so the survivors of top-k are all in registers;
* top-p: the largest key ``P`` with ``F(P) >= top_p``, ``F(t)`` the softmax mass of the
  survivors with key ``>= t`` (a 32-step bitwise search over the candidates); token ``i``
  is kept iff ``key_i >= P``, which is exactly "the mass strictly above ``i`` is below
  ``top_p``" and keeps tie groups together. Without top-k, the candidates hold every
  token with key at or above ``lo = max(chunk thresholds)`` and ``F`` is exact there, so
  the search is exact whenever ``F(lo) >= top_p`` (the nucleus lies among the candidates,
  the usual case). Otherwise, unless min-p already rules out every token below ``lo``, the
  row takes the slow path: a radix search re-reads the row ``32 / RB`` times (``RB`` bits
  of ``P`` per pass, masses accumulated per digit) and one more pass runs the race;
* min-p: ``z - z_max >= t`` on the survivors, ``t`` the row's float32 threshold
  (:func:`lmgen_fast.core.params.min_p_threshold`, exactly ``exp(z - z_max) >= min_p``);
* the race over the survivors, whose noise is computed there.

With ``LOGPROBS`` each row also leaves its token's log-probability, raw or processed
(``logprobs_mode``). A processed row's normaliser is ``sum(exp(z - z_max))`` over the
final survivors, summed where the race reads them: the candidates (and tie groups) of a
filtered row, the slow path's last pass, or the chunk sums of a row without filters; its
token's ``z`` is recomputed from one logit by the chunk kernel's own code.

Compile time: the multi-pass path's loops are ``range``, not ``tl.static_range``: unrolled,
they held 32 to 64 copies of ``row_z`` and took 12 to 42 s to compile per variant.
"""

from __future__ import annotations

import triton
import triton.language as tl
from lmgen_fast.kernels.sampling_common import (
    device_exp,
    from_key,
    gumbel,
    race_best,
    race_combine,
    row_masks,
    row_z,
    to_key,
)


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
def _unnorm(key, valid, row_max, ACCURATE: tl.constexpr):
    """``exp(z - z_max)`` of valid candidate keys, 0 elsewhere."""
    z = tl.where(valid, from_key(key), float("-inf"))
    return device_exp(z - row_max, ACCURATE)


@triton.jit
def _top_p_search(key, q, gkey, qg, top_p):
    """Largest key ``P`` with ``F(P) >= top_p`` (0 if none), candidates in registers."""
    prefix = tl.zeros([], dtype=tl.uint32)
    bit = tl.full([], 0x80000000, dtype=tl.uint32)
    for _ in range(32):
        trial = prefix | bit
        f = tl.sum(tl.where(key >= trial, q, 0.0), axis=0)
        f += tl.sum(tl.where(gkey >= trial, qg, 0.0), axis=0)
        prefix = tl.where(f >= top_p, trial, prefix)
        bit = bit >> 1
    return prefix


@triton.jit
def merge_kernel(
    logits_ptr, stride_row, V, n_chunks,
    temp_ptr, topk_ptr, seed_ptr, step_ptr,
    top_p_ptr, mlog_ptr, once_ptr, fpen_ptr, ppen_ptr, proc_ptr,
    win_ptr, W, wrange_ptr, pow_ptr,
    flags_ptr, mint_ptr, bias_ids_ptr, bias_vals_ptr, K, allowed_ptr, A, bm_ptr, BM,
    stop_ptr, S,
    cmax_ptr, cidx_ptr, rkey_ptr, ridx_ptr,
    ncand_ptr, ckey_ptr, cidx_buf_ptr,
    gkey_ptr, gcnt_ptr, gbest_ptr, gidx_ptr,
    ctau_ptr, csum_ptr, rmax_ptr, rsum_ptr,
    out_ptr, status_ptr, lp_ptr,
    CAP: tl.constexpr, CP: tl.constexpr, TILE: tl.constexpr, ONE_TILE: tl.constexpr,
    CHUNK: tl.constexpr, SUB: tl.constexpr, RB: tl.constexpr, NBINS: tl.constexpr,
    LOGPROBS: tl.constexpr, ACC: tl.constexpr, WT: tl.constexpr, MASKS: tl.constexpr,
):
    """One row (grid ``[B]``): its token, status bits and log-probabilities from the chunk
    kernel's aggregates and candidates, as the module docstring lists them.

    Length: one launch per step after the chunk kernel. Its branches (greedy, ``+inf``,
    top-k, top-p, min-p, the slow path, log-probabilities) share the row's loaded state;
    split into kernels they would add launches and reload it.
    """
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
    top_p = tl.load(top_p_ptr + row)
    mlog = tl.load(mlog_ptr + row)
    top_p_on = top_p < 1.0
    nucleus = top_p_on | (mlog > float("-inf"))
    sampled = (temp != 0.0) & (row_max > float("-inf"))
    has_inf = row_max == float("inf")
    no_inf = row_max != float("inf")
    slow = tl.zeros([], dtype=tl.int1)
    # Processed log-probabilities of filtered rows: sum(exp(z - row_max)) over the final
    # survivors and the smallest surviving z, from the candidates the race reads.
    p_sum = tl.zeros([], dtype=tl.float32)
    p_cut = tl.full([], float("-inf"), tl.float32)

    if sampled & (has_inf | ((k_eff == 0) & (~nucleus))):
        rkey = tl.load(rkey_ptr + at, mask=cm, other=float("-inf"))
        ridx = tl.load(ridx_ptr + at, mask=cm, other=2147483647)
        # Only chunks that hold +inf raced among +inf tokens.
        # (A vector comparison: the interpreter mis-broadcasts scalar booleans.)
        row_max_v = tl.zeros([CP], dtype=tl.float32) + row_max
        use = cm & ((cmax == float("inf")) | (row_max_v != float("inf")))
        _b, out = race_best(rkey, ridx, use & (rkey > float("-inf")))
    if sampled & no_inf & ((k_eff > 0) | nucleus):
        seed = tl.load(seed_ptr + row)
        step = tl.load(step_ptr + row)
        gkey = tl.load(gkey_ptr + at, mask=cm, other=0).to(tl.uint32, bitcast=True)
        gcnt = tl.load(gcnt_ptr + at, mask=cm, other=0)
        ctau = tl.load(ctau_ptr + at, mask=cm, other=0).to(tl.uint32, bitcast=True)
        n_slots = n_chunks * CAP
        base = row64 * n_slots
        # The k-th largest key of the candidates (tie groups count with their size) is
        # the row's k-th largest value: every value at or above it is a candidate.
        tau = tl.zeros([], dtype=tl.uint32)
        best = tl.full([], float("-inf"), tl.float32)
        best_at = tl.full([], 2147483647, tl.int32)
        # Without top-k, F (the mass at or above a key) is exact from the candidates at
        # or above lo: every such token is a candidate.
        lo = tl.where(k_eff > 0, tau, tl.max(tl.where(cm, ctau, 0), axis=0))
        # Normaliser of softmax over the survivors of top-k (all of the row without it).
        csum = tl.load(csum_ptr + at, mask=cm, other=0.0)
        s_row = tl.sum(tl.where(cm & (cmax > float("-inf")),
                                csum * device_exp(cmax - row_max, ACC), 0.0), axis=0)
        prefix = tl.zeros([], dtype=tl.uint32)
        f_lo = tl.zeros([], dtype=tl.float32)
        if ONE_TILE:
            # The usual case (k up to a few hundred): the candidates stay in registers.
            valid, key = _slots(ncand_ptr, ckey_ptr, row, n_chunks, base, 0, n_slots, CAP, TILE)
            if k_eff > 0:
                bit = tl.full([], 0x80000000, dtype=tl.uint32)
                for _ in range(32):
                    trial = tau | bit
                    c = tl.sum(tl.where(gkey >= trial, gcnt, 0), axis=0)
                    c += tl.sum((valid & (key >= trial)).to(tl.int32), axis=0)
                    tau = tl.where(c >= k_eff, trial, tau)
                    bit = bit >> 1
                lo = tau
            # prefix stays 0 when fewer than k finite values exist: every candidate survives.
            surv = valid & (key >= tau)
            grp = cm & (gcnt > 0) & (gkey >= tau)
            e = _unnorm(key, surv, row_max, ACC)
            eg = tl.where(grp, gcnt.to(tl.float32) * _unnorm(gkey, grp, row_max, ACC), 0.0)
            if top_p_on:
                if k_eff > 0:
                    s_row = tl.sum(e, axis=0) + tl.sum(eg, axis=0)
                q = tl.math.div_rn(e, s_row)
                qg = tl.math.div_rn(eg, s_row)
                f_lo = tl.sum(tl.where(key >= lo, q, 0.0), axis=0)
                f_lo += tl.sum(tl.where(gkey >= lo, qg, 0.0), axis=0)
                prefix = _top_p_search(key, q, gkey, qg, top_p)
            cut, slow = _cut(k_eff, tau, lo, prefix, f_lo, top_p, top_p_on, mlog, row_max, ACC)
            tok = tl.load(cidx_buf_ptr + base + tl.arange(0, TILE), mask=valid, other=0)
            race = from_key(key) + gumbel(seed, step, tok)
            fin = surv & (key >= cut) & _min_p_ok(key, row_max, mlog)
            best, best_at = race_best(race, tok, fin)
            if LOGPROBS:
                p_sum = tl.sum(tl.where(fin, e, 0.0), axis=0)
                p_cut = tl.min(tl.where(fin, from_key(key), float("inf")), axis=0)
        else:
            if k_eff > 0:
                bit = tl.full([], 0x80000000, dtype=tl.uint32)
                for _ in range(32):
                    trial = tau | bit
                    c = tl.sum(tl.where(gkey >= trial, gcnt, 0), axis=0)
                    for s0 in range(0, n_slots, TILE):
                        valid, key = _slots(
                            ncand_ptr, ckey_ptr, row, n_chunks, base, s0, n_slots, CAP, TILE
                        )
                        c += tl.sum((valid & (key >= trial)).to(tl.int32), axis=0)
                    tau = tl.where(c >= k_eff, trial, tau)
                    bit = bit >> 1
                lo = tau
            grp = cm & (gcnt > 0) & (gkey >= tau)
            eg = tl.where(grp, gcnt.to(tl.float32) * _unnorm(gkey, grp, row_max, ACC), 0.0)
            if top_p_on:
                if k_eff > 0:
                    s_row = tl.sum(eg, axis=0)
                    for s0 in range(0, n_slots, TILE):
                        valid, key = _slots(
                            ncand_ptr, ckey_ptr, row, n_chunks, base, s0, n_slots, CAP, TILE
                        )
                        s_row += tl.sum(_unnorm(key, valid & (key >= tau), row_max, ACC), axis=0)
                qg = tl.math.div_rn(eg, s_row)
                bit = tl.full([], 0x80000000, dtype=tl.uint32)
                # Bit 32 of the search (trial = lo) gives F(lo); the other 32 give P.
                for i in range(33):
                    trial = tl.where(i == 0, lo, prefix | bit)
                    f = tl.sum(tl.where(gkey >= trial, qg, 0.0), axis=0)
                    for s0 in range(0, n_slots, TILE):
                        valid, key = _slots(
                            ncand_ptr, ckey_ptr, row, n_chunks, base, s0, n_slots, CAP, TILE
                        )
                        q = tl.math.div_rn(_unnorm(key, valid & (key >= tau), row_max, ACC), s_row)
                        f += tl.sum(tl.where(key >= trial, q, 0.0), axis=0)
                    if i == 0:
                        f_lo = f
                    else:
                        prefix = tl.where(f >= top_p, trial, prefix)
                        bit = bit >> 1
            cut, slow = _cut(k_eff, tau, lo, prefix, f_lo, top_p, top_p_on, mlog, row_max, ACC)
            p_cut = tl.full([], float("inf"), tl.float32)
            for s0 in range(0, n_slots, TILE):
                valid, key = _slots(
                    ncand_ptr, ckey_ptr, row, n_chunks, base, s0, n_slots, CAP, TILE
                )
                tok = tl.load(cidx_buf_ptr + base + s0 + tl.arange(0, TILE), mask=valid, other=0)
                race = from_key(key) + gumbel(seed, step, tok)
                fin = valid & (key >= tau) & (key >= cut) & _min_p_ok(key, row_max, mlog)
                b2, a2 = race_best(race, tok, fin)
                best, best_at = race_combine(best, best_at, b2, a2)
                if LOGPROBS:
                    p_sum += tl.sum(tl.where(fin, _unnorm(key, fin, row_max, ACC), 0.0), axis=0)
                    p_cut = tl.minimum(
                        p_cut, tl.min(tl.where(fin, from_key(key), float("inf")), axis=0))
        gbest = tl.load(gbest_ptr + at, mask=cm, other=float("-inf"))
        gidx = tl.load(gidx_ptr + at, mask=cm, other=2147483647)
        g_ok = grp & (gkey >= cut) & _min_p_ok(gkey, row_max, mlog)
        b2, a2 = race_best(gbest, gidx, g_ok)
        best, out = race_combine(best, best_at, b2, a2)
        if LOGPROBS:
            p_sum += tl.sum(tl.where(g_ok, eg, 0.0), axis=0)
            p_cut = tl.minimum(p_cut, tl.min(tl.where(g_ok, from_key(gkey), float("inf")),
                                             axis=0))
        if slow:
            m_flags, m_under = row_masks(flags_ptr, mint_ptr, row, step, MASKS)
            out, p_sum, p_cut = _slow_path(
                logits_ptr, stride_row, V, n_chunks, row, row64, temp,
                tl.load(once_ptr + row) != 0, tl.load(fpen_ptr + row), tl.load(ppen_ptr + row),
                win_ptr, W, wrange_ptr, pow_ptr, seed, step,
                row_max, s_row, top_p, top_p_on, mlog,
                m_flags, m_under, bias_ids_ptr,
                bias_vals_ptr, K, allowed_ptr, A, bm_ptr, BM, stop_ptr, S,
                CHUNK, SUB, RB, NBINS, ACC, LOGPROBS, WT, MASKS,
            )

    # Never an out-of-range id: an empty row yields 0 and is reported in status.
    bad = (out >= V) | (out < 0)
    status = tl.load(status_ptr + row)
    status = status | tl.where(empty, 1, 0) | tl.where(bad & (row_max > float("-inf")), 4, 0)
    status = status | tl.where(slow, 8, 0)
    tl.store(status_ptr + row, status)
    out = tl.where(empty | bad, 0, out)
    tl.store(out_ptr + row, out.to(tl.int64))

    if LOGPROBS:
        # Each row leaves (log-probability of its token, shift m, log-normaliser s, cut):
        # a token's log-probability is (v - m) - s, v its raw logit or, for a processed
        # row, its z if z >= cut (else -inf); m = +inf marks a row with +inf values, where
        # s is the share -log(count) of each +inf value.
        rmax = tl.load(rmax_ptr + at, mask=cm, other=float("-inf"))
        rsum = tl.load(rsum_ptr + at, mask=cm, other=0.0)
        big = tl.max(rmax, axis=0)
        total = tl.sum(tl.where(rmax > float("-inf"), rsum * device_exp(rmax - big, ACC), 0.0),
                       axis=0)
        n_inf = tl.sum(tl.where(rmax == float("inf"), rsum, 0.0), axis=0)
        share = -tl.log(tl.maximum(n_inf, 1.0))  # only read where n_inf >= 1
        x = tl.load(logits_ptr + row64 * stride_row + out).to(tl.float32)
        x = tl.where(x != x, float("-inf"), x)
        norm = tl.where(big == float("inf"), share, tl.log(total))
        lp = tl.where(big == float("inf"), tl.where(x == float("inf"), share, float("-inf")),
                      (x - big) - norm)
        shift = big
        cut_z = tl.full([], float("-inf"), tl.float32)
        if tl.load(proc_ptr + row) != 0:
            csum = tl.load(csum_ptr + at, mask=cm, other=0.0)
            # Rows without a filter: every finite z survives, the chunks summed them.
            s_all = tl.sum(tl.where(cm & (cmax > float("-inf")) & (cmax < float("inf")),
                                    csum * device_exp(cmax - row_max, ACC), 0.0), axis=0)
            filtered = (k_eff > 0) | nucleus
            p_sum = tl.where(filtered, p_sum, s_all)
            p_cut = tl.where(filtered, p_cut, float("-inf"))
            # The +inf tokens all survive every filter and share the mass.
            p_inf = tl.sum(tl.where(cm & (cmax == float("inf")), csum, 0.0), axis=0)
            p_share = -tl.log(tl.maximum(p_inf, 1.0))
            m_flags, m_under = row_masks(flags_ptr, mint_ptr, row, tl.load(step_ptr + row),
                                         MASKS)
            z_out = _token_z(logits_ptr, row64, stride_row, V, n_chunks, row, out, temp,
                             tl.load(once_ptr + row) != 0, tl.load(fpen_ptr + row),
                             tl.load(ppen_ptr + row), win_ptr, W, wrange_ptr, pow_ptr,
                             m_flags, m_under, bias_ids_ptr,
                             bias_vals_ptr, K, allowed_ptr, A, bm_ptr, BM, stop_ptr, S,
                             CHUNK, WT, MASKS)
            # p_sum is 0 only in greedy and empty rows, whose norm is never read.
            norm = tl.where(has_inf, p_share, tl.log(tl.where(p_sum > 0.0, p_sum, 1.0)))
            lp = tl.where(has_inf, p_share, (z_out - row_max) - norm)
            # A greedy row is a point mass on its token.
            lp = tl.where(temp == 0.0, 0.0, lp)
            shift = row_max
            cut_z = tl.where(has_inf, float("inf"), p_cut)
        tl.store(lp_ptr + row * 4, lp)
        tl.store(lp_ptr + row * 4 + 1, shift)
        tl.store(lp_ptr + row * 4 + 2, norm)
        tl.store(lp_ptr + row * 4 + 3, cut_z)


@triton.jit
def _cut(k_eff, tau, lo, prefix, f_lo, top_p, top_p_on, mlog, row_max, ACC: tl.constexpr):
    """Smallest surviving key after top-k and top-p, and whether the row needs the slow path.

    With top-k every survivor is a candidate: the cut is ``max(tau, P)``. Without top-k,
    ``P`` from the candidates is exact iff ``F(lo) >= top_p``; else the candidates suffice
    only if they hold every finite token (``lo`` at or below the key of ``-inf``) or min-p
    drops every token at or below ``lo`` (``exp`` is monotone).
    """
    # Keys at or below 0x007FFFFF are -inf (and NaN patterns); 0x00800000 is -FLT_MAX.
    all_cand = lo <= 0x007FFFFF
    fast_p = top_p_on & (f_lo >= top_p)
    z_lo = from_key(tl.where(all_cand, tl.full([], 0x00800000, tl.uint32), lo))
    fast_m = (mlog > float("-inf")) & (z_lo - row_max < mlog)
    topk_cut = tl.maximum(tau, prefix)
    free_cut = tl.where(fast_p, prefix, tl.where(all_cand, lo * 0, lo))
    cut = tl.where(k_eff > 0, topk_cut, free_cut).to(tl.uint32)
    slow = (k_eff == 0) & ~(fast_p | all_cand | fast_m)
    return cut, slow


@triton.jit
def _slow_path(
    logits_ptr, stride_row, V, n_chunks, row, row64, temp, once, fpen, ppen,
    win_ptr, W, wrange_ptr, pow_ptr, seed, step,
    row_max, s_row, top_p, top_p_on, mlog,
    flags, under, bias_ids_ptr, bias_vals_ptr, K, allowed_ptr, A, bm_ptr, BM, stop_ptr, S,
    CHUNK: tl.constexpr, SUB: tl.constexpr, RB: tl.constexpr, R: tl.constexpr,
    ACC: tl.constexpr, LOGPROBS: tl.constexpr, WT: tl.constexpr, MASKS: tl.constexpr,
):
    """Top-p/min-p without top-k when the nucleus is not among the candidates.

    A radix search for ``P`` (``RB`` bits per pass over the row, each pass summing the
    softmax mass per digit of the keys that share the bits found so far), then one pass
    for the race. ``z`` is recomputed with the chunk kernel's own code. Returns the token
    and, with ``LOGPROBS``, the survivors' ``sum(exp(z - row_max))`` and smallest ``z``.
    """
    digits = tl.arange(0, R)
    prefix = tl.zeros([], dtype=tl.uint32)
    if top_p_on:
        above = tl.zeros([], dtype=tl.float32)
        for p in range(32 // RB):
            shift = 32 - RB * (p + 1)
            hist = tl.zeros([R], dtype=tl.float32)
            for c in range(n_chunks):
                w_lo = tl.load(wrange_ptr + row * (n_chunks + 1) + c)
                w_hi = tl.load(wrange_ptr + row * (n_chunks + 1) + c + 1)
                for s in range(0, CHUNK, SUB):
                    offs = c * CHUNK + s + tl.arange(0, SUB)
                    _x, z = row_z(logits_ptr, row64, stride_row, V, c * CHUNK + s, temp, once,
                                  fpen, ppen, win_ptr, W, w_lo, w_hi, pow_ptr, flags, under,
                                  bias_ids_ptr, bias_vals_ptr, K, allowed_ptr, A, bm_ptr, BM,
                                  stop_ptr, S, SUB, WT, MASKS)
                    key = to_key(z)
                    live = (offs < V) & (z > float("-inf"))
                    if p > 0:
                        live = live & ((key >> (shift + RB)) == (prefix >> (shift + RB)))
                    q = tl.where(live, tl.math.div_rn(device_exp(z - row_max, ACC), s_row), 0.0)
                    d = ((key >> shift) & (R - 1)).to(tl.int32)
                    hit = d[:, None] == digits[None, :]
                    hist += tl.sum(tl.where(hit, q[:, None], 0.0), axis=0)
            # G[d] = mass of the keys >= prefix | d << shift; P's digit is the largest d
            # with G[d] >= top_p (0 when none: then every token is kept).
            ge = digits[None, :] >= digits[:, None]
            g = above + tl.sum(tl.where(ge, hist[None, :], 0.0), axis=1)
            dstar = tl.max(tl.where(g >= top_p, digits, 0), axis=0)
            above += tl.sum(tl.where(digits > dstar, hist, 0.0), axis=0)
            prefix = prefix | (dstar.to(tl.uint32) << shift)
    best = tl.full([], float("-inf"), tl.float32)
    best_at = tl.full([], 2147483647, tl.int32)
    p_sum = tl.zeros([], dtype=tl.float32)
    p_cut = tl.full([], float("inf"), tl.float32)
    for c in range(n_chunks):
        w_lo = tl.load(wrange_ptr + row * (n_chunks + 1) + c)
        w_hi = tl.load(wrange_ptr + row * (n_chunks + 1) + c + 1)
        for s in range(0, CHUNK, SUB):
            offs = c * CHUNK + s + tl.arange(0, SUB)
            _x, z = row_z(logits_ptr, row64, stride_row, V, c * CHUNK + s, temp, once, fpen,
                          ppen, win_ptr, W, w_lo, w_hi, pow_ptr, flags, under, bias_ids_ptr,
                          bias_vals_ptr, K, allowed_ptr, A, bm_ptr, BM, stop_ptr, S, SUB, WT,
                          MASKS)
            ok = (offs < V) & (z > float("-inf")) & (to_key(z) >= prefix)
            ok = ok & (z - row_max >= mlog)
            race = z + gumbel(seed, step, offs)
            b2, a2 = race_best(race, offs, ok)
            best, best_at = race_combine(best, best_at, b2, a2)
            if LOGPROBS:
                p_sum += tl.sum(tl.where(ok, device_exp(z - row_max, ACC), 0.0), axis=0)
                p_cut = tl.minimum(p_cut, tl.min(tl.where(ok, z, float("inf")), axis=0))
    return best_at, p_sum, p_cut


@triton.jit
def _min_p_ok(key, row_max, mlog):
    """Min-p's test on candidate keys: ``z - z_max >= mlog``, ``mlog`` the float32 threshold
    of :func:`lmgen_fast.params.min_p_threshold` (exactly ``exp(z - z_max) >= min_p``)."""
    return from_key(key) - row_max >= mlog


@triton.jit
def _token_z(logits_ptr, row64, stride_row, V, n_chunks, row, tok, temp, once, fpen, ppen,
             win_ptr, W, wrange_ptr, pow_ptr, flags, under, bias_ids_ptr, bias_vals_ptr, K,
             allowed_ptr, A, bm_ptr, BM, stop_ptr, S, CHUNK: tl.constexpr, WT: tl.constexpr,
             MASKS: tl.constexpr):
    """``z`` of token ``tok`` of one row, formed by the chunk kernel's own code (one logit
    and the window entries of its chunk)."""
    c = tok // CHUNK
    w_lo = tl.load(wrange_ptr + row * (n_chunks + 1) + c)
    w_hi = tl.load(wrange_ptr + row * (n_chunks + 1) + c + 1)
    offs = tok + tl.arange(0, 16)
    _x, z = row_z(logits_ptr, row64, stride_row, V, tok, temp, once, fpen, ppen,
                  win_ptr, W, w_lo, w_hi, pow_ptr, flags, under, bias_ids_ptr, bias_vals_ptr,
                  K, allowed_ptr, A, bm_ptr, BM, stop_ptr, S, 16, WT, MASKS)
    return tl.max(tl.where(offs == tok, z, float("-inf")), axis=0)
