"""Speculative decoding that returns exactly the tokens of plain decoding.

A seeded row's token at step ``s`` is the winner of the race ``argmax_i(z_i + g(seed, s, i))``
(docs/semantics.md section 4): the noise is a pure function of (seed, step, token). So a
proposed token is checked by running the target's own race at that step, with the same
noise: it is accepted iff it is the target's winner. At the first mismatch the row takes the
target's winner and the round ends. Each round is one target forward over ``k + 1``
positions of every row (the row's last token, then its ``k`` drafts, at the row's own
positions) and ONE sampler call on the flattened ``[B * (k + 1), V]`` logits: position ``j``
of a row samples with its step ``s + j`` and the penalty window of its history plus its
first ``j`` drafts. A row keeps its accepted drafts and one token of the target's, so a
round gives each row 1 to ``k + 1`` tokens; only the number of target forwards changes.

Drafters (:class:`NgramDrafter`, :class:`ModelDrafter`) propose ``[B, k]`` tokens, ``-1``
where they have nothing (such a position is never accepted). Cache slots past a row's
accepted prefix hold rejected drafts; they are overwritten by the next round, which starts
at the row's last kept token.

On CUDA the verify step of a round (the forward and the sampler) replays as a CUDA graph
(:class:`_VerifyGraphs`); drafting and bookkeeping stay on the host, one wait per round.

The one caveat: the verify forward over ``k + 1`` positions and a one-token decode step
compute the same logits with a different summation order (a few ulps apart), so at a
near-tie between the two best race keys a token can differ from plain decoding's.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import NamedTuple, Protocol

import torch

from lmgen_fast.core.params import PackedParams, SamplingParams, check_int
from lmgen_fast.core.rows import history_window, prompt_base
from lmgen_fast.engine import GenerationError, RowLogprobs, TokenCallback
from lmgen_fast.models.decoder import CachedLlamaDecoder, Decoder, wrap
from lmgen_fast.runtime import graphs
from lmgen_fast.runtime.graphs import GraphPool
from lmgen_fast.sampling import reference
from lmgen_fast.sampling.reference import EmptyRowError

NGRAM_MAX = 3  # the ngram drafter matches the row's last 3, then 2, then 1 tokens


class RowStats(NamedTuple):
    """One row's cost: target forwards it took part in (the prefill included), drafted
    tokens the target confirmed and the row used, and drafted tokens the row could have
    used (within its ``max_tokens``, none after a drafted EOT) that the target checked."""

    target_forwards: int
    accepted_drafts: int
    proposed_drafts: int


def _fixed_shapes(device: torch.device) -> bool:
    """Whether rounds on ``device`` sample with the reference's fixed-shape path (no host
    waits inside the sampler), as the engine does off the CPU."""
    return device.type != "cpu"


def _sample_positions(logits: torch.Tensor, flat: PackedParams, hist: torch.Tensor | None,
                      hlen: torch.Tensor, ranges: torch.Tensor, steps: torch.Tensor,
                      drafts: torch.Tensor, offset: int, width: int, fixed: bool,
                      return_logprobs: bool) -> reference.SampleResult:
    """One sampler call for ``T`` positions of every row (see :meth:`_Rows.sample`).

    Reads device tensors only: ``hist`` ``[B, H]`` (None: no penalties), ``hlen``,
    ``ranges`` and ``steps`` ``[B]``, ``drafts`` ``[B, D]``; with ``fixed``, through the
    reference's fixed-shape path, so a CUDA graph can capture it.
    """
    batch, t, vocab = logits.shape
    dev = logits.device
    ahead = torch.arange(t, device=dev)
    steps = (steps.unsqueeze(1) + offset + ahead).flatten()
    window = None
    if hist is not None:
        used = offset + t - 1  # drafts that some position's window reads
        if used > 0:
            cols = hlen.unsqueeze(1) + torch.arange(used, device=dev)
            hist = torch.cat([hist, hist.new_full((batch, used), -1)], dim=1)
            hist.scatter_(1, cols, drafts[:, :used])
        hlens = (hlen.unsqueeze(1) + offset + ahead).flatten()
        window = history_window(hist.repeat_interleave(t, dim=0), hlens,
                                ranges.repeat_interleave(t), width)
    flat_logits = logits.reshape(batch * t, vocab)
    if not fixed:
        return reference.sample(flat_logits, flat, window, step=steps,
                                return_logprobs=return_logprobs, check=False, on_device=False)
    # Seeds are drawn already (every row races): no input checks, no host waits.
    if return_logprobs:
        # Each row's log-probabilities in its logprobs_mode, alternatives included.
        return reference.SampleResult(*reference.sample_on_device_logprobs(
            flat_logits, flat, window, steps, flat.logprobs, draw_seeds=False))
    tokens, status, _ = reference.sample_on_device(flat_logits, flat, window, steps,
                                                   draw_seeds=False)
    return reference.SampleResult(tokens, status, None)


class _Rows:
    """The host and device state of one speculative batch, read by the drafters.

    ``seqs[r]`` is row ``r``'s prompt and kept tokens; ``steps[r]`` the next step (tokens
    sampled, EOT included): it keys the noise of the row's next token, as in the engine.
    """

    def __init__(self, prompts: Sequence[Sequence[int]], rows: Sequence[SamplingParams],
                 max_tokens: Sequence[int], device: torch.device, hist_len: int):
        batch = len(prompts)
        self.device = device
        self.seqs = [list(p) for p in prompts]
        self.out: list[list[int]] = [[] for _ in prompts]
        self.max_tokens = list(max_tokens)
        self.done = [m == 0 for m in max_tokens]
        self.steps = [0] * batch
        self.forwards = [0] * batch
        self.accepted = [0] * batch
        self.proposed = [0] * batch
        # Rows whose last round hit a position with nothing to sample: they take a plain
        # one-token round before that counts as an error (see book).
        self.retry = [False] * batch
        self.token_lp: list[list[float]] = [[] for _ in prompts]
        self.top: list[list[list[tuple[int, float]]]] = [[] for _ in prompts]
        packed = PackedParams.from_rows(rows, device)
        # Unseeded rows draw their seed once (as the engine does on the GPU): each row then
        # races, so a draft can be checked against the target's own draw.
        if any(r.seed is None for r in rows):
            drawn = torch.randint(0, 2**62, (batch,), device=device)
            packed = replace(packed, seed=torch.where(packed.seeded, packed.seed, drawn))
        self.packed = replace(packed, seeded=torch.ones_like(packed.seeded))
        self.penalized = any(r.penalized for r in rows)
        self.range_list = [r.repetition_penalty_range for r in rows]
        self.ranges = torch.tensor(self.range_list, device=device)
        base = prompt_base(prompts, rows)
        self.hlen = list(base)
        self.hist = None
        if self.penalized:
            self.hist = torch.full((batch, hist_len), -1, dtype=torch.int64)
            for i, p in enumerate(prompts):
                self.hist[i, : base[i]] = torch.as_tensor(p[: base[i]], dtype=torch.int64)
            self.hist = self.hist.to(device)

    @property
    def batch(self) -> int:
        return len(self.seqs)

    def active(self) -> list[int]:
        return [r for r, d in enumerate(self.done) if not d]

    def sample(self, logits: torch.Tensor, drafts: torch.Tensor, offset: int = 0,
               return_logprobs: bool = False) -> reference.SampleResult:
        """Sample every position of every row in one sampler call.

        Parameters
        ----------
        logits : Tensor
            ``[B, T, V]`` float: position ``t`` is the model's prediction after the row's
            kept tokens and ``drafts[:, :offset + t]``.
        drafts : LongTensor
            ``[B, D]`` int64, ``D >= offset + T - 1``, ``-1`` for no draft.
        offset : int
            Drafts already before position 0.
        return_logprobs : bool
            Also the raw log-probabilities (with the rows' top alternatives).

        Returns
        -------
        SampleResult
            ``tokens`` and ``status`` ``[B * T]`` (row-major), never raising for a row with
            nothing to sample: only positions a row keeps are checked, by the caller.
        """
        t = logits.shape[1]
        dev = logits.device
        width = 0
        if self.penalized:
            # As wide as the widest window any position reads (engine.Run.width).
            longest = [h + offset + t - 1 for h in self.hlen]
            width = max(min(rng or h, h) for rng, h in zip(self.range_list, longest, strict=True))
        return _sample_positions(
            logits, self.flat_params(t), self.hist, torch.tensor(self.hlen, device=dev),
            self.ranges, torch.tensor(self.steps, device=dev), drafts, offset, max(width, 1),
            _fixed_shapes(dev), return_logprobs)

    def flat_params(self, t: int) -> PackedParams:
        """The rows' parameters repeated for ``t`` positions each (row-major)."""
        return replace(self.packed, **{f.name: getattr(self.packed, f.name).repeat_interleave(t)
                                       for f in fields(PackedParams)
                                       if isinstance(getattr(self.packed, f.name), torch.Tensor)})

    def book(self, got: reference.SampleResult, drafts: list[list[int]], t: int, eos_id: int,
             callback: TokenCallback | None) -> None:
        """Keep each active row's accepted drafts and the target's token after them."""
        tokens = got.tokens.view(self.batch, t).tolist()
        status = got.status.view(self.batch, t).tolist()
        lps = None
        if got.logprobs is not None:
            lp = got.logprobs
            n = lp.top_ids.shape[1]
            lps = (lp.token_logprob.view(self.batch, t).tolist(),
                   lp.top_ids.view(self.batch, t, n).tolist(),
                   lp.top_logprobs.view(self.batch, t, n).tolist())
        hist_rows, hist_cols, hist_vals = [], [], []
        for r in self.active():
            self.forwards[r] += 1
            self.proposed[r] += sum(d >= 0 for d in drafts[r])
            self.retry[r] = False
            kept = len(self.out[r])
            for j in range(t):
                if status[r][j]:
                    if t > 1:
                        # A draft whose keys or values are not finite (a model that gives NaN
                        # for some token) spoils even the positions before it: attention
                        # weighs masked slots by 0, and 0 * NaN is NaN. A one-token round
                        # decides, as plain decoding would.
                        self.retry[r] = True
                        break
                    exc = EmptyRowError([r])
                    raise GenerationError(f"at step {self.steps[r]}: {exc}", self.partial())
                tok = tokens[r][j]
                self.steps[r] += 1
                hist_rows.append(r)
                hist_cols.append(self.hlen[r])
                hist_vals.append(tok)
                self.hlen[r] += 1
                hit = j < len(drafts[r]) and drafts[r][j] == tok
                self.accepted[r] += hit
                if tok == eos_id:
                    self.done[r] = True
                    break
                self.out[r].append(tok)
                self.seqs[r].append(tok)
                if lps is not None:
                    self.token_lp[r].append(lps[0][r][j])
                    # A processed row lists its surviving tokens only (-1 pads the rest).
                    self.top[r].append([(i, v) for i, v in zip(lps[1][r][j], lps[2][r][j],
                                                                strict=True) if i >= 0])
                if len(self.out[r]) >= self.max_tokens[r]:
                    self.done[r] = True
                    break
                if not hit:
                    break
            if callback is not None:
                for tok in self.out[r][kept:]:
                    callback(r, tok)
        if self.hist is not None and hist_rows:
            at = (torch.tensor(hist_rows, device=self.device),
                  torch.tensor(hist_cols, device=self.device))
            self.hist.index_put_(at, torch.tensor(hist_vals, device=self.device))

    def usable(self, drafts: torch.Tensor, eos_id: int) -> torch.Tensor:
        """``drafts`` ``[B, k]`` with ``-1`` where a row could not use them: past its
        ``max_tokens``, after a drafted EOT, and for finished rows."""
        dev = drafts.device
        left = torch.tensor([0 if d else m - len(o) - 1 for d, m, o in
                             zip(self.done, self.max_tokens, self.out, strict=True)],
                            device=dev)
        eos = (drafts == eos_id).to(torch.int64)
        after_eos = (eos.cumsum(dim=1) - eos) > 0
        room = torch.arange(drafts.shape[1], device=dev) < left.unsqueeze(1)
        return torch.where(room & ~after_eos, drafts, -1)

    def partial(self) -> list[list[int]]:
        return [list(o) for o in self.out]


class Drafter(Protocol):
    """Proposes tokens for every row of a speculative batch."""

    def start(self, rows: _Rows, prompts: Sequence[Sequence[int]], max_new: int) -> None:
        """Called once after the target's prefill, before the first round."""

    def propose(self, rows: _Rows, k: int) -> torch.Tensor:
        """``[B, k]`` int64 on the rows' device: each row's guesses for its next ``k``
        tokens, ``-1`` where it has none."""


class NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the row's
    last ``n`` tokens (``n`` from 3 down to 1) in its prompt and output.

    Each row keeps, for every n-gram that has a successor, where its latest occurrence
    ends; indexing a new token costs O(1). A match near the end copies on into the tokens
    it proposes itself (as an overlapping copy would), so a repeating cycle is proposed in
    full.
    """

    def __init__(self, max_n: int = NGRAM_MAX):
        self.max_n = max_n

    def start(self, rows: _Rows, prompts: Sequence[Sequence[int]], max_new: int) -> None:
        self.index: list[dict[tuple[int, ...], int]] = [{} for _ in prompts]
        self.seen = [0] * len(prompts)

    def _catch_up(self, r: int, seq: list[int]) -> None:
        index = self.index[r]
        for m in range(max(self.seen[r], 1), len(seq)):
            # Token m follows the n-grams that end at m - 1: latest occurrence wins.
            for n in range(1, min(self.max_n, m) + 1):
                index[tuple(seq[m - n: m])] = m
        self.seen[r] = len(seq)

    def propose(self, rows: _Rows, k: int) -> torch.Tensor:
        out = []
        for r, seq in enumerate(rows.seqs):
            guess: list[int] = []
            if not rows.done[r]:
                self._catch_up(r, seq)
                for n in range(min(self.max_n, len(seq)), 0, -1):
                    follow = self.index[r].get(tuple(seq[-n:]))
                    if follow is not None:
                        ext = seq + guess
                        for j in range(k):
                            ext.append(ext[follow + j])
                        guess = ext[len(seq):]
                        break
            out.append(guess + [-1] * (k - len(guess)))
        return torch.tensor(out, dtype=torch.int64, device=rows.device).view(len(out), k)


def _forward(decoder: CachedLlamaDecoder, ids: torch.Tensor, positions: torch.Tensor,
             top: int) -> torch.Tensor:
    """Logits ``[B, T, V]`` of ``ids`` ``[B, T]`` at ``positions`` ``[B, T]`` (highest
    ``top``), writing the decoder's cache there."""
    kv_len = min(decoder._round(top + 1), decoder.cache.max_len)
    hidden = decoder.model.forward_cached(ids, positions, decoder.cache, kv_len=kv_len)
    return decoder.model.lm_head(hidden)


def _clear_slots(decoder: CachedLlamaDecoder, row: int, start: int) -> None:
    """Zero ``row``'s cache slots from ``start`` on (keys and values of every layer)."""
    for keys, values in zip(decoder.cache.k, decoder.cache.v, strict=True):
        keys[row, :, start:] = 0
        values[row, :, start:] = 0


def _capacity(decoder: CachedLlamaDecoder) -> int:
    """Positions a row may use in the decoder's cache."""
    return min(decoder.cache.max_len, decoder.model.config.max_position_embeddings)


class ModelDrafter:
    """A smaller model proposes by sampling its own tokens with the target's noise keys.

    Its draft ``j`` of a row is drawn like the target's token at step ``s + j``: the row's
    parameters and seed, its penalty window with the drafts before it. Where the two
    models' distributions are close, their races then often have the same winner. The
    draft model keeps its own KV cache; each round it re-reads the row's last two kept
    tokens (the last one is new to it, and after a fully accepted round so is the one
    before), then runs ``k - 1`` one-token steps.

    Parameters
    ----------
    model
        Anything :func:`lmgen_fast.wrap` runs with a cache at per-row positions (our Llama,
        a module laid out like the article's, a transformers Llama), with the target's
        vocabulary; or such a decoder.
    """

    def __init__(self, model):
        decoder = model if isinstance(model, Decoder) else wrap(model)
        if not isinstance(decoder, CachedLlamaDecoder):
            raise ValueError(
                f"speculative= draft model must be one lmgen-fast runs with its own KV cache "
                f"(a Llama); {type(model).__name__} runs on {type(decoder).__name__}")
        self.decoder = decoder
        self.vocab = decoder.model.config.vocab_size

    def start(self, rows: _Rows, prompts: Sequence[Sequence[int]], max_new: int) -> None:
        limit = self.decoder.model.config.max_position_embeddings
        longest = max(len(p) for p in prompts)
        self.decoder.prefill(prompts, max(1, min(max_new, limit - longest + 1)))

    def capacity(self) -> int:
        return _capacity(self.decoder)

    def propose(self, rows: _Rows, k: int) -> torch.Tensor:
        dev = rows.device
        batch = rows.batch
        drafts = torch.full((batch, k), -1, dtype=torch.int64, device=dev)
        cap = self.capacity() - 1
        last = torch.tensor([s[-1] for s in rows.seqs], device=dev)
        prev = torch.tensor([s[-2] if len(s) > 1 else s[-1] for s in rows.seqs], device=dev)
        end = torch.tensor([len(s) - 1 for s in rows.seqs], device=dev)
        pos = torch.stack([(end - 1).clamp_min(0), end], dim=1).clamp_max(cap)
        ids = torch.stack([prev, last], dim=1)
        logits = _forward(self.decoder, ids, pos, int(pos.max()))[:, -1:]
        for j in range(k):
            drafts[:, j] = rows.sample(logits, drafts, offset=j).tokens
            if j + 1 < k:
                pos = (end + j + 1).clamp_max(cap).view(-1, 1)
                logits = _forward(self.decoder, drafts[:, j: j + 1], pos, int(pos.max()))
        return drafts


def _graph_backend(device: torch.device):
    """The engine's CUDA-graph class for ``device``, or None where there are no graphs."""
    return graphs.graph_backend(device)


class _Verify:
    """One captured verify step: the target's forward over ``T`` positions of every row at
    attention length ``kv_len``, then the sampler, reading and writing only these buffers."""

    def __init__(self, owner: _VerifyGraphs, t: int, kv_len: int):
        st, dec = owner.state, owner.decoder
        dev, b = st.device, st.batch
        i64 = dict(dtype=torch.int64, device=dev)
        self.ids = torch.zeros(b, t, **i64)
        self.positions = torch.zeros(b, t, **i64)
        self.drafts = torch.full((b, t - 1), -1, **i64)
        self.steps = torch.zeros(b, **i64)
        self.hlen = torch.zeros(b, **i64)
        self.tokens = torch.zeros(b * t, **i64)
        self.status = torch.zeros(b * t, dtype=torch.int32, device=dev)
        self.token_lp = torch.zeros(b * t, dtype=torch.float32, device=dev)
        flat = st.flat_params(t)
        # Every window as wide as the history plus the drafts: -1 padded, same penalties.
        width = (st.hist.shape[1] + t - 1) if st.hist is not None else 1
        logprobs = self.logprobs = owner.logprobs

        def fn() -> None:
            hidden = dec.model.forward_cached(self.ids, self.positions, dec.cache, kv_len=kv_len)
            got = _sample_positions(dec.model.lm_head(hidden), flat, st.hist, self.hlen,
                                    st.ranges, self.steps, self.drafts, 0, width, True, logprobs)
            self.tokens.copy_(got.tokens)
            self.status.copy_(got.status)
            if logprobs:
                self.token_lp.copy_(got.logprobs.token_logprob)

        self.fn = fn
        self.graph = owner.graph_cls(owner.pool)

    def result(self) -> reference.SampleResult:
        lp = None
        if self.logprobs:
            empty = self.tokens.new_zeros(self.tokens.shape[0], 0)
            lp = reference.SampleLogprobs(self.token_lp, empty, empty.float())
        return reference.SampleResult(self.tokens, self.status, lp)


class _VerifyGraphs:
    """The rounds' verify steps as CUDA graphs, one per (positions, attention length), kept
    for the call: a round is then copies into fixed buffers and one replay. Capture failing
    warns once and leaves the rest of the call eager (same tokens)."""

    def __init__(self, graph_cls, decoder: CachedLlamaDecoder, state: _Rows, logprobs: bool):
        self.graph_cls, self.decoder, self.state = graph_cls, decoder, state
        self.logprobs = logprobs
        self.pool = GraphPool()  # its graphs share its memory pool and stream
        self.steps: dict[tuple[int, int], _Verify] = {}
        self.broken = False

    def run(self, ids: torch.Tensor, positions: torch.Tensor, drafts: torch.Tensor,
            top: int) -> reference.SampleResult:
        st, dec = self.state, self.decoder
        t = ids.shape[1]
        kv_len = min(dec._round(top + 1), dec.cache.max_len)
        step = self.steps.get((t, kv_len))
        fresh = step is None
        if fresh:
            step = _Verify(self, t, kv_len)
        step.ids.copy_(ids)
        step.positions.copy_(positions)
        step.drafts.copy_(drafts)
        step.steps.copy_(torch.tensor(st.steps, device=st.device))
        step.hlen.copy_(torch.tensor(st.hlen, device=st.device))
        if not fresh:
            step.graph.replay()
            return step.result()
        step.graph.warm(step.fn)  # a real step: this round's
        try:
            step.graph.capture(step.fn)
        except Exception as exc:  # whatever broke the capture, eager rounds still work
            self.broken = True
            warnings.warn(f"capturing a speculative verify step as a CUDA graph failed "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0]}); the rest of "
                          "this call runs eagerly (same tokens)", RuntimeWarning, stacklevel=3)
        else:
            self.steps[(t, kv_len)] = step
        return step.result()


def make_drafter(speculative) -> Drafter:
    """The drafter ``speculative=`` names: "ngram", a model (or decoder) to draft with, or
    a drafter object (with ``start`` and ``propose``)."""
    if isinstance(speculative, str):
        if speculative == "ngram":
            return NgramDrafter()
        raise ValueError(f"speculative must be 'ngram', a draft model or a drafter, got "
                         f"{speculative!r}")
    if hasattr(speculative, "propose") and hasattr(speculative, "start"):
        return speculative
    return ModelDrafter(speculative)


def check_num_speculative_tokens(k) -> int:
    """Raise ValueError unless ``k`` is an int >= 1; return it."""
    return check_int("num_speculative_tokens", k, 1)


@torch.inference_mode()
def generate_ids(
    decoder: Decoder,
    prompts: Sequence[Sequence[int]],
    rows: Sequence[SamplingParams],
    max_tokens: Sequence[int],
    eos_id: int,
    *,
    speculative,
    num_speculative_tokens: int = 4,
    callback: TokenCallback | None = None,
    return_logprobs: bool = False,
    cuda_graph: bool = True,
) -> tuple[list[tuple[list[int], str]], list[RowLogprobs], list[RowStats]]:
    """:func:`lmgen_fast.engine.generate_ids` by speculative rounds: the same tokens.

    Parameters
    ----------
    decoder
        The target's decoder; it must be a :class:`~lmgen_fast.models.decoder.CachedLlamaDecoder`
        (models run by full recompute or by transformers' own cache are refused).
    prompts, rows, max_tokens, eos_id, callback
        As for :func:`lmgen_fast.engine.generate_ids` (``callback`` once a round).
    speculative
        "ngram", a draft model (see :class:`ModelDrafter`) or a :class:`Drafter`.
    num_speculative_tokens : int
        Drafts per row and round, ``k >= 1``: each round's target forward covers ``k + 1``
        positions of every row.
    return_logprobs : bool
        Fill the :class:`RowLogprobs` (empty lists otherwise).
    cuda_graph : bool
        On CUDA, replay each round's verify step (the target's forward over ``k + 1``
        positions and the sampler) as a CUDA graph, captured per number of positions and
        attention length and kept for the call. Not with top alternatives
        (``logprobs > 0``), which need the host. Same tokens either way.

    Returns
    -------
    (pairs, logprobs, stats)
        Per row ``(token_ids, finish_reason)``, its :class:`RowLogprobs` and its
        :class:`RowStats`.

    Raises
    ------
    ValueError
        Bad ``speculative`` or ``num_speculative_tokens``, a decoder without a usable
        cache, a draft model with another vocabulary.
    GenerationError
        A row had nothing to sample at a token it would keep.
    """
    k = check_num_speculative_tokens(num_speculative_tokens)
    drafter = make_drafter(speculative)
    if not isinstance(decoder, CachedLlamaDecoder):
        raise ValueError(
            f"speculative= needs a model lmgen-fast runs with its own KV cache (our Llama, a "
            f"module laid out like the article's, a transformers Llama); this model runs on "
            f"{type(decoder).__name__}")
    batch = len(prompts)
    total = max(max_tokens, default=0)
    if total == 0:
        return ([([], "length")] * batch,
                [RowLogprobs([], [] if r.logprobs > 0 else None) for r in rows],
                [RowStats(0, 0, 0)] * batch)
    if decoder.busy:
        raise RuntimeError("this decoder is already generating; use another one (wrap(model)) "
                           "for a nested call")
    vocab = decoder.model.config.vocab_size
    if getattr(drafter, "vocab", vocab) != vocab:
        raise ValueError(f"speculative= draft model has {drafter.vocab} tokens, the model "
                         f"{vocab}: they must share the tokenizer")
    decoder.busy = True
    try:
        limit = decoder.model.config.max_position_embeddings
        longest = max(len(p) for p in prompts)
        # Room for the drafts of the last round where the positions allow it; rounds are
        # shortened where they do not.
        max_new = max(total, min(total + k, limit - longest + 1))
        logits = decoder.prefill(prompts, max_new)
        dev = logits.device
        state = _Rows(prompts, rows, max_tokens, dev,
                      max(len(p) for p in prompts) + total + k + 1)
        drafter.start(state, prompts, max_new)
        none = torch.empty(batch, 0, dtype=torch.int64, device=dev)
        state.book(state.sample(logits.unsqueeze(1), none, return_logprobs=return_logprobs),
                   [[]] * batch, 1, eos_id, callback)
        graph_cls = _graph_backend(dev) if cuda_graph and _fixed_shapes(dev) else None
        graphs = None
        if graph_cls is not None and not any(r.logprobs for r in rows):
            graphs = _VerifyGraphs(graph_cls, decoder, state, return_logprobs)
        cap = _capacity(decoder)
        if hasattr(drafter, "capacity"):
            cap = min(cap, drafter.capacity() + 1)
        while not all(state.done):
            active = state.active()
            room = min(cap - len(state.seqs[r]) for r in active)
            left = max(state.max_tokens[r] - len(state.out[r]) for r in active)
            kr = max(0, min(k, room, left - 1))
            for r in active:
                if state.retry[r]:
                    kr = 0
                    _clear_slots(decoder, r, len(state.seqs[r]))
            drafts = drafter.propose(state, kr) if kr else none
            drafts = state.usable(drafts, eos_id)
            # Positions past every active row's last proposal cannot be accepted: a round
            # without any proposal is a plain one-token step.
            proposed = (drafts >= 0).cumprod(dim=1).sum(dim=1).tolist()
            kr = max(proposed[r] for r in active)
            drafts = drafts[:, :kr]
            last = torch.tensor([s[-1] for s in state.seqs], device=dev)
            ids = torch.cat([last.unsqueeze(1), drafts.clamp_min(0)], dim=1)
            end = torch.tensor([len(s) - 1 for s in state.seqs], device=dev)
            positions = (end.unsqueeze(1) + torch.arange(kr + 1, device=dev)).clamp_max(cap - 1)
            top = int(positions.max())
            if graphs is not None and not graphs.broken:
                got = graphs.run(ids, positions, drafts, top)
            else:
                logits = _forward(decoder, ids, positions, top)
                got = state.sample(logits, drafts, return_logprobs=return_logprobs)
            state.book(got, drafts.tolist(), kr + 1, eos_id, callback)
    finally:
        decoder.busy = False
    pairs = [(o, "eot" if len(o) < m else "length")
             for o, m in zip(state.out, max_tokens, strict=True)]
    lps = [RowLogprobs(state.token_lp[r], [alts[: row.logprobs] for alts in state.top[r]]
                       if row.logprobs > 0 else None) for r, row in enumerate(rows)]
    stats = [RowStats(*s) for s in zip(state.forwards, state.accepted, state.proposed,
                                       strict=True)]
    return pairs, lps, stats


class SpeculativeRun:
    """Stands in for :func:`lmgen_fast.engine.generate_ids` (same call, same results) in
    batch jobs, decoding speculatively and adding up every row's :class:`RowStats`.

    Parameters
    ----------
    speculative, num_speculative_tokens
        As for :func:`generate_ids`.
    """

    def __init__(self, speculative, num_speculative_tokens: int = 4):
        self.drafter = make_drafter(speculative)
        self.k = check_num_speculative_tokens(num_speculative_tokens)
        self.totals = RowStats(0, 0, 0)

    def __call__(self, decoder, prompts, rows, max_tokens, eos_id, *, callback=None,
                 return_logprobs: bool = False, cuda_graph: bool = True, **engine_options):
        # The other engine_options (backend, sync_every) do not apply: the rounds sample
        # with the reference, and the host looks at every round.
        pairs, lps, stats = generate_ids(
            decoder, prompts, rows, max_tokens, eos_id, speculative=self.drafter,
            num_speculative_tokens=self.k, callback=callback, return_logprobs=return_logprobs,
            cuda_graph=cuda_graph)
        self.totals = RowStats(*(sum(col) for col in zip(self.totals, *stats, strict=True)))
        return (pairs, lps) if return_logprobs else pairs

