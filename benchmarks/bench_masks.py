"""What SPEC section 7's logit bias and masks add to one step of the Triton sampler, counted
without a device: launches per step and the bytes each row reads besides its logits.

    python benchmarks/bench_masks.py [--vocabs 32000 128256] [--bias 0 16 300]

Launches: the calls :func:`lmgen_fast.sampling.kernel_launch.kernel_calls` builds (on the
``meta`` device) for a batch without constraints and for one with a bias, an allowed set,
a token bitmask and ``min_tokens`` on every row: the same three (set-up, chunk, merge).

Bytes per row, from what the chunk kernel loads (``kernels/sampling_common.py``'s
``constrain``): each bitmask in use (the row's allowed set, the step's token bitmask) is
one int32 word per 32 logits; a bias list of ``K`` entries costs each of the row's chunk
programs a binary search (``ceil(log2(K + 1))`` int64 loads) and one more id, plus 12
bytes per entry once; where the launch has masks (some row has a constraint), every
program reads its row's int32 flags and int64 ``min_tokens``, and its stop ids while under
``min_tokens``; a launch without them reads nothing more than before. The merge re-reads
these only on the multi-pass path and for one token's log-probability. Bytes, not time:
on a GPU these words are read beside the logits by the same program, and a bitmask's 64
words per chunk of 2048 logits come in one cache line pair. Time is for
``bench_sampler.py`` to measure on a GPU; nothing here ran on one.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import torch

from lmgen_fast.core.intmath import cdiv
from lmgen_fast.core.params import PackedParams, SamplingParams
from lmgen_fast.sampling import kernel_launch, launch_plan

BF16 = 2


def launches(vocab: int, masked: bool, batch: int = 2) -> list[str]:
    """The kernels one sampler step launches, without or with every constraint."""
    extra = dict(logit_bias={1: 1.0, 2: -1.0}, allowed_token_ids=[1, 2, 3], min_tokens=2,
                 stop_token_ids=[4]) if masked else {}
    rows = [SamplingParams(top_k=50, seed=0, **extra)] * batch
    packed = PackedParams.from_rows(rows, "meta", end_ids=(0,), vocab_size=vocab)
    logits = torch.empty(batch, vocab, dtype=torch.bfloat16, device="meta")
    steps = torch.zeros(batch, dtype=torch.int64, device="meta")
    bitmask = (torch.empty(batch, cdiv(vocab, 32), dtype=torch.int32, device="meta")
               if masked else None)
    lp = launch_plan.plan_launch(vocab, 50, cuda=True)
    calls, _, _ = kernel_launch.kernel_calls(logits, packed, None, steps, packed.seed, lp,
                                             None, cuda=True, token_bitmask=bitmask)
    return [c.name for c in calls]


def extra_bytes(vocab: int, bias: int, *, allowed: bool, bitmask: bool, masked: bool) -> int:
    """Bytes one row's chunk programs read for the constraints (module docstring)."""
    n_chunks = cdiv(vocab, launch_plan.CUDA_CHUNK)
    words = 4 * cdiv(vocab, 32)
    total = n_chunks * 12 if masked else 0  # each program's flags and min_tokens
    total += words * (int(allowed) + int(bitmask))
    if bias:
        total += n_chunks * 8 * (math.ceil(math.log2(bias + 1)) + 1) + 12 * bias
    return total


def table(vocabs: Sequence[int], biases: Sequence[int]) -> list[dict]:
    """One row per vocabulary and constraint set: extra bytes against the bf16 logits'."""
    rows = []
    for vocab in vocabs:
        cases = [("none (launch without masks)", 0, False, False, False),
                 ("none (other rows have masks)", 0, False, False, True),
                 ("allowed_token_ids", 0, True, False, True),
                 ("token bitmask", 0, False, True, True)]
        cases += [(f"logit_bias, {k} entries", k, False, False, True) for k in biases if k]
        cases.append(("all of them", max(biases), True, True, True))
        for name, k, allowed, bitmask, masked in cases:
            b = extra_bytes(vocab, k, allowed=allowed, bitmask=bitmask, masked=masked)
            rows.append(dict(vocab=vocab, case=name, extra_bytes=b, logits_bytes=BF16 * vocab,
                             share=b / (BF16 * vocab)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--bias", type=int, nargs="+", default=[0, 16, 300])
    args = ap.parse_args(argv)
    for vocab in args.vocabs:
        plain, masked = launches(vocab, False), launches(vocab, True)
        print(f"V={vocab}: launches per step {len(plain)} without constraints "
              f"({', '.join(plain)}), {len(masked)} with every one")
    print("| V | constraint | extra bytes per row | bf16 logits bytes | share |")
    print("|---|---|---|---|---|")
    for r in table(args.vocabs, args.bias):
        print(f"| {r['vocab']} | {r['case']} | {r['extra_bytes']} | {r['logits_bytes']} | "
              f"{100 * r['share']:.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
