"""Triton kernel of the decode loop's per-step bookkeeping, one row per program.

After the sampler drew ``tok`` for row ``r`` at its own step ``s = step[r]``, one launch does
what the eager engine does with about thirty torch ops:

* a row still running whose sampler status has a flag (besides "slow") is bad: the first
  such step goes to ``bad_step``, the flags are OR-ed into ``bad_bits``, and the row stops;
* ``out[r, s] = tok``; with log-probabilities ``token_lp[r, s]`` and, with top
  alternatives, ``top_ids[r, s, :]`` and ``top_lp[r, s, :]``;
* ``count[r]`` grows by one for a running row whose token does not end it; ``done[r]`` is
  set by a bad row, an ending token or ``count >= max_tokens``. The ending tokens are
  ``eos`` and, with ``STOPS > 0``, the row's ``stop_ids[r, :STOPS]`` (``-1`` padded: the
  end ids, then the row's ``stop_token_ids``);
* ``hist[r, hlen[r]] = tok``, ``hlen += 1``, ``tokens[r] = tok`` (the next step's input)
  and ``step += 1``.

A store at a column beyond a buffer's width is dropped (the eager path's index would be
out of range; the engine sizes its buffers so that this never happens).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bookkeeping_kernel(
    tok_ptr, status_ptr, lp_ptr, lp_stride, top_ids_src, top_lp_src,
    out_ptr, token_lp_ptr, top_ids_ptr, top_lp_ptr, cols,
    hist_ptr, hist_cols, hlen_ptr, tokens_ptr, step_ptr,
    count_ptr, max_ptr, done_ptr, bad_step_ptr, bad_bits_ptr,
    eos, ignore_bits, stop_ptr, stop_cols,
    LOGPROBS: tl.constexpr, TOP_N: tl.constexpr, NB: tl.constexpr,
    STOPS: tl.constexpr, SB: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tok = tl.load(tok_ptr + row)
    step = tl.load(step_ptr + row)
    bits = tl.load(status_ptr + row) & ~ignore_bits
    active = tl.load(done_ptr + row) == 0
    newly = active & (bits != 0)
    bad_step = tl.load(bad_step_ptr + row)
    tl.store(bad_step_ptr + row, tl.where(newly & (bad_step < 0), step, bad_step))
    tl.store(bad_bits_ptr + row, tl.load(bad_bits_ptr + row) | tl.where(newly, bits, 0))
    active = active & (bits == 0)
    in_cols = step < cols
    tl.store(out_ptr + row * cols + step, tok, mask=in_cols)
    if LOGPROBS:
        tl.store(token_lp_ptr + row * cols + step, tl.load(lp_ptr + row * lp_stride),
                 mask=in_cols)
    if TOP_N > 0:
        k = tl.arange(0, NB)
        ok = k < TOP_N
        at = (row * cols + step) * TOP_N + k
        put = ok & (step + 0 * k < cols)  # a vector mask (the interpreter takes no scalar)
        tl.store(top_ids_ptr + at, tl.load(top_ids_src + row * TOP_N + k, mask=ok), mask=put)
        tl.store(top_lp_ptr + at, tl.load(top_lp_src + row * TOP_N + k, mask=ok), mask=put)
    eot = tok == eos
    if STOPS > 0:
        j = tl.arange(0, SB)
        ids = tl.load(stop_ptr + row * stop_cols + j, mask=j < STOPS, other=-1)
        eot = eot | (tl.sum((ids == tok).to(tl.int32), axis=0) > 0)
    count = tl.load(count_ptr + row) + (active & ~eot).to(tl.int64)
    tl.store(count_ptr + row, count)
    done = ~active | eot | (count >= tl.load(max_ptr + row))
    tl.store(done_ptr + row, done.to(tl.int1))
    hlen = tl.load(hlen_ptr + row)
    tl.store(hist_ptr + row * hist_cols + hlen, tok, mask=(hlen >= 0) & (hlen < hist_cols))
    tl.store(hlen_ptr + row, hlen + 1)
    tl.store(tokens_ptr + row, tok)
    tl.store(step_ptr + row, step + 1)
