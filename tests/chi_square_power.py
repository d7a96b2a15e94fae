"""Power and size of the suite's chi-square tests of sampled tokens, by exact computation and
by simulation (a helper, not a test module: pytest collects only ``test_*.py``).

A sampler test draws ``n`` tokens, checks that none leaves the support of the exact law
``p0`` (float64) and runs a chi-square test against ``p0`` at level ``alpha``. Its power
against a wrong law ``p1`` (e.g. the temperature off by 20%) is the chance that a sampler
drawing from ``p1`` fails it. Two estimates:

* :func:`noncentral_power`: the chi-square statistic under ``p1`` is about noncentral
  chi-square with ``cells - 1`` degrees of freedom and noncentrality
  ``n * sum((p1 - p0)**2 / p0)``;
* :func:`simulate`: ``sims`` multinomial samples of ``n`` draws from ``p1`` put through the
  very test (support check, pooling of cells expected fewer than ``minimum`` times, scipy's
  chi-square p-value); with ``p1 = p0`` it estimates the false rejection rate.

Draws of the tests are independent given the law (unseeded rows draw fresh noise, seeded
rows have distinct seeds or steps), so the multinomial model is the test's exact law.

    python tests/chi_square_power.py            # every design the statistical tests use
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def pooled(p0: np.ndarray, n: int, minimum: float = 5.0) -> np.ndarray:
    """Cell of each token after pooling: tokens of ``p0 > 0`` expected at least ``minimum``
    times keep a cell each, the rest share one (dropped when it would be expected fewer
    than ``minimum`` times on its own and there is another cell to join: the last one).

    Returns
    -------
    numpy.ndarray
        int64 ``[V]``: the cell of each token, ``-1`` outside the support.
    """
    p0 = np.asarray(p0, dtype=np.float64)
    cells = np.full(p0.shape, -1, dtype=np.int64)
    big = (p0 * n >= minimum) & (p0 > 0)
    cells[big] = np.arange(int(big.sum()))
    small = (p0 > 0) & ~big
    if small.any():
        alone = p0[small].sum() * n >= minimum or not big.any()
        cells[small] = int(big.sum()) if alone else int(big.sum()) - 1
    return cells


def cell_probs(p: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """``p`` summed into ``cells`` (from :func:`pooled`); mass outside the support dropped."""
    inside = cells >= 0
    return np.bincount(cells[inside], weights=np.asarray(p, np.float64)[inside],
                       minlength=int(cells.max()) + 1)


def noncentral_power(p0: np.ndarray, p1: np.ndarray, n: int, alpha: float,
                     minimum: float = 5.0, cells: np.ndarray | None = None) -> float:
    """Power of the pooled chi-square test against ``p1`` by the noncentral chi-square
    approximation (support violations by ``p1`` count as rejections). ``cells``: the cell
    of each token (``-1`` outside the support), else :func:`pooled`'s."""
    cells = pooled(p0, n, minimum) if cells is None else np.asarray(cells)
    q0, q1 = cell_probs(p0, cells), cell_probs(p1, cells)
    outside = float(np.asarray(p1, np.float64)[cells < 0].sum())
    df = len(q0) - 1
    lam = n * float(((q1 / q1.sum() - q0) ** 2 / q0).sum())
    chi = float(stats.ncx2.sf(stats.chi2.isf(alpha, df), df, lam)) if df > 0 else 0.0
    return 1.0 - (1.0 - outside) ** n * (1.0 - chi)


def simulate(p_draw: np.ndarray, p0: np.ndarray, n: int, alpha: float, sims: int,
             seed: int = 0, minimum: float = 5.0, chunk: int = 20000,
             cells: np.ndarray | None = None) -> float:
    """Rejection rate of the test (support check, then pooled chi-square at ``alpha``
    against ``p0``) over ``sims`` samples of ``n`` draws from ``p_draw``; ``cells`` as in
    :func:`noncentral_power`."""
    rng = np.random.default_rng(seed)
    cells = pooled(p0, n, minimum) if cells is None else np.asarray(cells)
    q0 = cell_probs(p0, cells)
    p_draw = np.asarray(p_draw, np.float64)
    rejected = 0
    for lo in range(0, sims, chunk):
        counts = rng.multinomial(n, p_draw / p_draw.sum(), size=min(chunk, sims - lo))
        outside = counts[:, cells < 0].sum(axis=1) > 0
        obs = np.stack([np.bincount(cells[cells >= 0], weights=c[cells >= 0],
                                    minlength=len(q0)) for c in counts])
        expected = q0 * n
        stat = ((obs - expected) ** 2 / expected).sum(axis=1)
        pvalue = stats.chi2.sf(stat, len(q0) - 1)
        rejected += int((outside | (pvalue <= alpha)).sum())
    return rejected / sims


def softmax64(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z[np.isfinite(z)].max())
    e[~np.isfinite(z)] = 0.0
    return e / e.sum()


def report(name: str, p0: np.ndarray, wrongs: dict[str, np.ndarray], n: int, alpha: float,
           sims: int, size_sims: int, minimum: float = 5.0,
           cells: np.ndarray | None = None) -> dict:
    """One design's numbers: cells, least expected count, false rejection and the power
    against each wrong law (noncentral and simulated); printed and returned."""
    cells = pooled(p0, n, minimum) if cells is None else np.asarray(cells)
    kw = dict(minimum=minimum, cells=cells)
    q0 = cell_probs(p0, cells)
    out = {"name": name, "n": n, "cells": len(q0), "min_expected": float(q0.min() * n),
           "under_5": int((np.asarray(p0)[np.asarray(p0) > 0] * n < 5).sum()),
           "size": simulate(p0, p0, n, alpha, size_sims, seed=1, **kw)}
    for label, p1 in wrongs.items():
        out[f"power {label}"] = (noncentral_power(p0, p1, n, alpha, **kw),
                                 simulate(p1, p0, n, alpha, sims, seed=2, **kw))
    print(f"{name}: n={n}, {out['cells']} cells (least expected {out['min_expected']:.1f}; "
          f"{out['under_5']} tokens expected < 5 before pooling), false rejection "
          f"{out['size']:.5f} at alpha {alpha:g}")
    for label in wrongs:
        nc, sim = out[f"power {label}"]
        print(f"    power against {label}: {nc:.4f} (noncentral), {sim:.4f} (simulated)")
    return out


def n_for_power(p0: np.ndarray, p1s: Sequence[np.ndarray], alpha: float, target: float,
                minimum: float = 5.0, start: int = 50, cells: np.ndarray | None = None) -> int:
    """The least ``n`` (in steps of 1%) whose noncentral power reaches ``target`` against
    every law of ``p1s``."""
    n = start
    while min(noncentral_power(p0, p1, n, alpha, minimum, cells) for p1 in p1s) < target:
        n = max(n + 1, math.ceil(n * 1.01))
    return n


# --------------------------------------------------------------------------- the designs


def two_level_test(counts: np.ndarray, top: int, group: np.ndarray, share: float,
                   alpha: float) -> np.ndarray:
    """test_slots' test on a batch of count vectors ``[S, V]``: the top token against the
    group (df 1) and the group's uniformity (df ``len(group) - 1``), each at ``alpha``;
    support: nothing outside ``top`` and ``group``. Returns the rejections ``[S]``."""
    n = counts.sum(axis=1)
    inside = counts[:, top] + counts[:, group].sum(axis=1)
    t = counts[:, top]
    stat1 = (t - n * share) ** 2 / (n * share) + (t - n * share) ** 2 / (n * (1 - share))
    g = counts[:, group]
    e = g.sum(axis=1, keepdims=True) / len(group)
    stat2 = ((g - e) ** 2 / e).sum(axis=1)
    return ((inside < n) | (stats.chi2.sf(stat1, 1) <= alpha)
            | (stats.chi2.sf(stat2, len(group) - 1) <= alpha))


def slots_design(sims: int = 200000) -> None:
    """tests/engine/test_slots.py: the current law (48 random logits, top_k=0, 480 draws)
    and the two-level one (1 + 23 tokens, top_k=24, 576 draws)."""
    t, vocab = 0.9, 48
    rng = np.random.default_rng(21)
    import torch

    row = (torch.randn(vocab, generator=torch.Generator().manual_seed(21)) * 1.5).double()
    old = {f: softmax64(row.numpy() / (t * f)) for f in (1.0, 1.2, 0.8)}
    report("test_slots, current", old[1.0], {"T*1.2": old[1.2], "T*0.8": old[0.8]}, 480,
           1e-3, 20000, sims, minimum=0.0)
    group, n, alpha = 23, 576, 5e-4
    z = np.full(vocab, -t * (math.log(group) + 1.0))
    z[0], z[1:1 + group] = 0.0, -t * math.log(group)

    def law(temp: float, top_k: bool = True) -> np.ndarray:
        zz = np.where(z >= z[1], z, -np.inf) if top_k else z
        return softmax64(zz / temp)

    p0 = law(t)
    members = np.arange(1, 1 + group)
    print(f"test_slots, two-level: n={n}, top share {p0[0]:.3f}, each of the {group} "
          f"expected {n * p0[1]:.1f} times")
    for label, p in (("size", p0), ("T*1.2", law(1.2 * t)), ("T*0.8", law(0.8 * t)),
                     ("top_k off", law(t, top_k=False))):
        counts = rng.multinomial(n, p, size=sims if label == "size" else 20000)
        rate = float(two_level_test(counts, 0, members, float(p0[0]), alpha).mean())
        print(f"    {'false rejection' if label == 'size' else 'power against ' + label}: "
              f"{rate:.5f}")


def speculative_design(sims: int = 1000000) -> None:
    """tests/speculative/test_speculative.py: 3000 rows, top-3 joint law of 3 tokens, the
    model's logits at scale 1 (current) and 5."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "speculative"))
    from test_speculative import exact_joint

    from conftest import make_tokenizer, random_model

    tok = make_tokenizer()
    prompt = [tok.token_to_id("[BOT]")] + tok.encode(" The quick").ids
    for scale in (1.0, 5.0):
        model = random_model(tok.get_vocab_size(), seed=3, scale=scale)
        laws = {t: exact_joint(model, prompt, 3, 3, tok.token_to_id("[EOT]"), t)
                for t in (1.0, 1.2, 0.8)}
        keys = sorted(laws[1.0])
        p = {t: np.array([law.get(k, 0.0) for k in keys]) for t, law in laws.items()}
        report(f"test_speculative, scale {scale:g}", p[1.0], {"T*1.2": p[1.2], "T*0.8": p[0.8]},
               3000, 1e-3, 20000, sims, minimum=0.0)


KERNEL_CASES = [
    ("top_p", dict(top_p=0.7)),
    ("min_p", dict(min_p=0.15)),
    ("both+penalties", dict(top_p=0.85, min_p=0.05, frequency_penalty=0.5,
                            presence_penalty=0.3)),
]


def kernel_design(sims: int = 200000) -> None:
    """tests/sampling/test_kernel_extensions.py's chi-square: 192 draws; 16 random logits
    (seed 6, scale 1.2; current) and 1024 (seed 16, scale 3; tokens expected fewer than 10
    times pooled)."""
    import torch

    from lmgen_fast import SamplingParams
    from lmgen_fast.sampling import reference

    for label, seed, scale, vocab, minimum in (("current", 6, 1.2, 16, 0.0),
                                               ("V=1024", 16, 3.0, 1024, 10.0)):
        row = torch.randn(1, vocab, generator=torch.Generator().manual_seed(seed)) * scale
        top = row[0].topk(2).indices.tolist()
        window = torch.tensor([[top[0], top[0], top[1], -1]])

        def law(extra: dict, temp: float, row=row, window=window) -> np.ndarray:
            params = SamplingParams(temperature=temp, top_k=0, repetition_penalty=1.2, **extra)
            z = reference.filtered_logits(row, params, window).double()
            return torch.softmax(z[0], dim=0).numpy()

        for name, extra in KERNEL_CASES:
            report(f"test_kernel_extensions {label} {name}", law(extra, 0.9),
                   {"T*1.2": law(extra, 1.08), "T*0.8": law(extra, 0.72)}, 192, 1e-3, 20000,
                   sims, minimum=minimum)


def gpu_design(sims: int = 200000) -> None:
    """test_kernel_extensions' GPU chi-square: 256 rows x 30 steps over V=128256 (logits
    x6, seed 5; top_p 0.9, min_p 0.001), simulated on its cells plus one cell for the mass
    the wrong law puts outside the support."""
    import torch

    from lmgen_fast import SamplingParams
    from lmgen_fast.sampling import reference

    row = torch.randn(1, 128256, generator=torch.Generator().manual_seed(5)) * 6
    n = 256 * 30

    def law(temp: float) -> np.ndarray:
        params = SamplingParams(temperature=temp, top_k=0, top_p=0.9, min_p=0.001)
        return torch.softmax(reference.filtered_logits(row, params, None).double()[0],
                             dim=0).numpy()

    p0 = law(1.0)
    cells = pooled(p0, n, 5.0)

    def on_cells(p: np.ndarray) -> np.ndarray:
        return np.append(cell_probs(p, cells), p[cells < 0].sum())

    q0 = on_cells(p0)
    outside = np.append(np.arange(len(q0) - 1), -1)
    report("test_kernel_extensions GPU", q0, {"T*1.2": on_cells(law(1.2)),
                                             "T*0.8": on_cells(law(0.8))},
           n, 1e-3, 20000, sims, cells=outside)


def main() -> None:
    slots_design()
    speculative_design()
    kernel_design()
    gpu_design()


if __name__ == "__main__":
    main()
