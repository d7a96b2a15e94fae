"""The article's ``generate()`` and its batched form: arguments in, text out.

The loop itself is :func:`lmgen_fast.engine.generate_ids`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from lmgen_fast.api.requests import Samples, check_rows, end_ids, prompt_ids, vocab_size
from lmgen_fast.api.stops import StopStrings, finish_row
from lmgen_fast.api.structured import row_grammars
from lmgen_fast.api.tokenization import TokenizerAdapter, adapt_tokenizer
from lmgen_fast.core.params import SamplingParams, check_int
from lmgen_fast.engine import (  # noqa: F401  (re-exported: jobs and users import them from here)
    DecodeOutOfMemory,
    GenerationError,
    RowLogprobs,
    TokenCallback,
    TopLogprobs,
    check_max_batch_size,
    check_sync_every,
    default_slots,
    generate_ids,
)
from lmgen_fast.models.decoder import decoder_for
from lmgen_fast.sampling.dispatch import resolve_backend
from lmgen_fast.speculative.rounds import check_num_speculative_tokens, make_drafter
from lmgen_fast.speculative.rounds import generate_ids as speculative_ids

# The keywords generate() passes on to generate_batch as they are.
RESEARCH_FIELDS = ("stop", "stop_token_ids", "include_stop_str_in_output", "min_tokens",
                   "logit_bias", "allowed_token_ids", "json_schema", "regex", "grammar")


@dataclass(frozen=True)
class Generation:
    """One row's result: its text, its token ids (EOT excluded) and why it stopped.

    ``logprobs`` holds the log-probability of each token of ``token_ids``, in the row's
    ``logprobs_mode`` (raw, or processed: under the distribution it was drawn from);
    ``top_logprobs`` the row's ``logprobs`` best ``(token_id, logprob)`` pairs per token, most
    probable first (``None`` when the row's ``logprobs`` is 0). A processed row lists only
    tokens its filters kept, so a list can be shorter (a greedy row's has its token alone).
    With ``speculative=``, ``target_forwards`` counts the target's forwards the row took
    part in (its prefill included), ``accepted_drafts`` the drafted tokens the target
    confirmed and ``proposed_drafts`` the drafted tokens it checked (see
    :class:`lmgen_fast.speculative.RowStats`); all three are None otherwise.

    ``finish_reason`` is "eot" (an end token), "stop" (a stop string or stop id, given by
    ``stop_reason``, or a completed grammar, ``stop_reason`` None) or "length"
    (``max_tokens``). ``prompt_index`` and ``sample_index``
    say which prompt and which of its ``n`` samples the row is.
    """

    text: str
    token_ids: list[int]
    finish_reason: str  # "eot", "stop" or "length"
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: TopLogprobs | None = None
    target_forwards: int | None = None
    accepted_drafts: int | None = None
    proposed_drafts: int | None = None
    stop_reason: str | int | None = None
    prompt_index: int = 0
    sample_index: int = 0


def _check_max_tokens(max_tokens, batch: int) -> list[int]:
    values = [max_tokens] * batch if not isinstance(max_tokens, Sequence) else list(max_tokens)
    if len(values) != batch:
        raise ValueError(f"max_tokens has {len(values)} entries for {batch} prompts")
    return [check_int("max_tokens", v, 0) for v in values]


def _row_params(
    batch: int, keywords: SamplingParams, params, seeds
) -> list[SamplingParams]:
    rows = [keywords] * batch
    if params is not None:
        params = list(params)
        if len(params) != batch:
            raise ValueError(f"params has {len(params)} entries for {batch} prompts")
        for i, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}")
        rows = params
    if seeds is not None:
        seeds = list(seeds)
        if len(seeds) != batch:
            raise ValueError(f"seeds has {len(seeds)} entries for {batch} prompts")
        rows = [p if s is None else replace(p, seed=s) for p, s in zip(rows, seeds, strict=True)]
    return rows


def _details(tok: TokenizerAdapter, stops: StopStrings | None, samples: Samples, r: int,
             pair, lp, stats=()) -> Generation:
    """Row ``r``'s Generation: its tokens cut at a stop string where one matched."""
    ids, text, reason, stop_reason = finish_row(stops, tok.decode, r, pair)
    logprobs, top = [], None
    if lp is not None:
        logprobs = lp.logprobs[: len(ids)]
        top = None if lp.top_logprobs is None else lp.top_logprobs[: len(ids)]
    return Generation(text, ids, reason, logprobs, top, *stats, stop_reason=stop_reason,
                      prompt_index=samples.prompt_index[r],
                      sample_index=samples.sample_index[r])


def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[str] | None = None,
    max_tokens: int | Sequence[int] = 100,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    repetition_penalty_range: int = 10,
    top_k: int = 50,
    device=None,
    *,
    seed: int | None = None,
    backend: str = "auto",
    penalty_scope: str = "generated",
    penalty_mode: str = "per_occurrence",
    params: Sequence[SamplingParams] | None = None,
    seeds: Sequence[int | None] | None = None,
    bos_token: str | int | None = None,
    eos_token: str | int | None = None,
    callback: TokenCallback | None = None,
    return_details: bool = False,
    top_p: float = 1.0,
    min_p: float = 0.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    logprobs: int = 0,
    cuda_graph: bool = True,
    sync_every: int | None = None,
    speculative=None,
    num_speculative_tokens: int = 4,
    logprobs_mode: str = "raw",
    max_batch_size: int | None = None,
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
    messages: Sequence[Sequence[dict]] | None = None,
    n: int = 1,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    include_stop_str_in_output: bool = False,
    min_tokens: int = 0,
    logit_bias: dict[int, float] | None = None,
    allowed_token_ids: Sequence[int] | None = None,
    json_schema: str | dict | None = None,
    regex: str | None = None,
    grammar: str | None = None,
) -> list[str] | list[Generation]:
    """Generate a continuation for every prompt, in one batch.

    Length: one keyword per sampling field, and the research-job fields documented here.

    Parameters
    ----------
    model, tokenizer
        As for :func:`generate`.
    prompts : sequence of str, optional
        Prompts of any lengths, encoded as the tokenizer's kind wants (see :func:`generate`).
    prompt_token_ids : sequence of sequences of int, optional
        Prompts as token ids, used as given (no BOT added).
    messages : sequence of conversations, optional
        Each a list of ``{"role": ..., "content": ...}`` dicts, through the tokenizer's chat
        template with ``add_generation_prompt=True`` and used as it comes out (a tokenizer
        without a template is refused). Exactly one of ``prompts``, ``prompt_token_ids``
        and ``messages``.
    max_tokens : int or sequence of int
        Per-row cap on new tokens (one value for all, or one per prompt).
    temperature, repetition_penalty, repetition_penalty_range, top_k, seed, penalty_scope,
    penalty_mode, top_p, min_p, frequency_penalty, presence_penalty, logprobs, logprobs_mode
        The sampling parameters of every row (see :class:`SamplingParams`).
    n, stop, stop_token_ids, include_stop_str_in_output, min_tokens, logit_bias,
    allowed_token_ids, json_schema, regex, grammar
        The research-job fields of every row (see :class:`SamplingParams`). ``n`` samples
        per prompt come back prompt-major (prompt ``i``'s at ``i*n .. i*n+n-1``); sample
        ``j`` of a prompt seeded ``s`` is its ``n=1`` result with seed ``s + j``. The
        prompt is prefilled once and its keys and values copied to its samples' cache rows
        (our cached Llama; transformers' own cache and recomputing models prefill each
        sample). ``stop`` strings are checked at host checks, on the decoded text of the
        generated tokens; ``stop_token_ids`` end a row on the device, like the end token.
        A transformers model's ``generation_config.eos_token_id`` ids all end rows ("eot")
        unless ``eos_token=`` names the one end token. A ``json_schema``, ``regex`` or
        ``grammar`` (EBNF) row samples under its grammar's mask (xgrammar, the
        ``structured`` extra; compiled before anything runs, every end id allowed where
        the grammar may end) and ends "stop" when its grammar is complete; not with
        ``speculative=``.
    params : sequence of SamplingParams, optional
        One per prompt; replaces the keywords row by row.
    seeds : sequence of int or None, optional
        One per prompt; a non-None entry replaces that row's seed.
    bos_token, eos_token : str or int, optional
        The tokens that play ``[BOT]`` and ``[EOT]`` when the tokenizer has other names.
    callback : callable, optional
        ``callback(row, token_id)`` for each new token, for streaming (``row`` numbers the
        results: ``i*n + j`` for sample ``j`` of prompt ``i``).
    return_details : bool
        Return :class:`Generation` records instead of strings, with each token's
        log-probability (raw, or with ``logprobs_mode="processed"`` under the distribution
        it was drawn from) and, for rows with ``logprobs > 0``, the top alternatives.
    cuda_graph : bool
        On CUDA, replay each decode step as a CUDA graph (captured on the first call, kept
        with the model for later calls). Same tokens either way.
    sync_every : int, optional
        Steps between the host's looks at the device (stop when all rows are done, hand
        tokens to ``callback``); default 16 on CUDA, 1 on the CPU.
    speculative : "ngram", a model, or a drafter, optional
        Speculative decoding (:mod:`lmgen_fast.speculative`): each round, the drafter proposes
        ``num_speculative_tokens`` tokens per row and one forward of ``model`` checks them
        all. Seeded and greedy rows get plain decoding's tokens (up to a near-tie of the
        logits' rounding); unseeded rows draw from the same distribution. "ngram" looks the
        row's last tokens up in its prompt and output; a model (with the same tokenizer)
        drafts by sampling with the row's own noise. Needs a model run with lmgen-fast's
        own KV cache (a ValueError otherwise); the rounds sample with ``backend``'s sampler
        and verify through the fused decode kernels where the plain decode would (on CUDA,
        each round's forward and sampler replay as one CUDA graph).
    num_speculative_tokens : int
        Drafts per row and round (``k >= 1``).
    max_batch_size : int, optional
        Rows decoded at once. With more prompts than that, continuous batching: a fixed set
        of ``max_batch_size`` slots, where a finished row's slot takes the next prompt at the
        next host check (our cached Llama; other models run batches of that size in turn;
        here speculative decoding runs every prompt in one batch, ``lmgen-fast run
        --speculative`` through slots).
        Default: up to 64 prompts in one batch, as ever; more go through 64 slots, fewer
        where the KV cache of 64 would not fit in half the device's free memory.

    Returns
    -------
    list of str (or of Generation)
        The decoded new tokens of each row, prompt excluded, in the order of the prompts
        (``n`` per prompt), cut before a matched stop string. A seeded row's result does not
        depend on its batch mates or the batch size.

    Raises
    ------
    ValueError
        Naming the bad value: a sampling field, more or fewer than one prompt form, a
        malformed prompt or message, ``min_tokens`` above ``max_tokens``, an id outside
        the vocabulary, a grammar that does not compile. Nothing has run then.
    GenerationError
        A row had nothing to sample; ``partial`` holds what every row had so far.
    """
    keywords = SamplingParams(
        temperature=temperature, top_k=top_k, repetition_penalty=repetition_penalty,
        repetition_penalty_range=repetition_penalty_range, seed=seed,
        penalty_scope=penalty_scope, penalty_mode=penalty_mode, top_p=top_p, min_p=min_p,
        frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        logprobs=logprobs, logprobs_mode=logprobs_mode, n=n,
        stop=() if stop is None else stop,
        stop_token_ids=() if stop_token_ids is None else stop_token_ids,
        include_stop_str_in_output=include_stop_str_in_output, min_tokens=min_tokens,
        logit_bias=() if logit_bias is None else logit_bias,
        allowed_token_ids=allowed_token_ids, json_schema=json_schema, regex=regex,
        grammar=grammar,
    )
    tok = adapt_tokenizer(tokenizer, bos_token, eos_token)
    ids = prompt_ids(tok, prompts, prompt_token_ids, messages)
    batch = len(ids)
    rows = _row_params(batch, keywords, params, seeds)
    caps = _check_max_tokens(max_tokens, batch)
    resolve_backend(backend, "cpu")  # validates the name before any work
    check_sync_every(sync_every)
    if speculative is not None:
        check_num_speculative_tokens(num_speculative_tokens)
        speculative = make_drafter(speculative)
    check_max_batch_size(max_batch_size)
    if batch == 0:
        return []
    decoder = decoder_for(model, device)
    check_rows(rows, caps, vocab_size(decoder, model), ids)
    samples = Samples(ids, rows, caps)
    ends = end_ids(model, tok, eos_token)
    grammars = row_grammars(decoder, tok, samples.rows, ends, speculative is not None)
    stops = StopStrings(tok.decode, samples.rows) if any(r.stop for r in rows) else None
    if speculative is not None:
        results, lps, stats = speculative_ids(
            decoder, samples.ids, samples.rows, samples.caps, ends, speculative=speculative,
            num_speculative_tokens=num_speculative_tokens, callback=callback,
            return_logprobs=return_details, cuda_graph=cuda_graph, backend=backend,
            stop_check=stops)
    else:
        if max_batch_size is None:
            max_batch_size = default_slots(decoder, samples.ids, samples.caps)
        got = generate_ids(
            decoder, samples.ids, samples.rows, samples.caps, ends,
            return_logprobs=return_details, backend=backend, callback=callback,
            cuda_graph=cuda_graph, sync_every=sync_every, max_batch_size=max_batch_size,
            stop_check=stops, grammars=grammars)
        results, lps = got if return_details else (got, [None] * len(got))
        stats = [()] * len(results)
    out = [_details(tok, stops, samples, r, pair, lp if return_details else None, st)
           for r, (pair, lp, st) in enumerate(zip(results, lps, stats, strict=True))]
    return out if return_details else [g.text for g in out]


def generate(
    model,
    tokenizer,
    prompt: str | None = None,
    max_tokens: int = 100,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    repetition_penalty_range: int = 10,
    top_k: int = 50,
    device=None,
    *,
    seed: int | None = None,
    backend: str = "auto",
    penalty_scope: str = "generated",
    penalty_mode: str = "per_occurrence",
    bos_token: str | int | None = None,
    eos_token: str | int | None = None,
    callback: Callable[[int], None] | None = None,
    top_p: float = 1.0,
    min_p: float = 0.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    cuda_graph: bool = True,
    sync_every: int | None = None,
    speculative=None,
    num_speculative_tokens: int = 4,
    prompt_token_ids: Sequence[int] | None = None,
    messages: Sequence[dict] | None = None,
    n: int = 1,
    **fields,
) -> str | list[str]:
    """Drop-in for the article's ``generate()``: same arguments, same distribution, cached.

    Parameters
    ----------
    model
        ``LlamaForPretraining``, a module laid out like the article's, or any callable
        ``model(input_ids [B, T]) -> logits [B, T, V]`` (recomputed each step).
    tokenizer
        A ``tokenizers.Tokenizer`` with ``[BOT]`` and ``[EOT]`` (or pass ``bos_token`` and
        ``eos_token``).
    prompt : str
        Encoded as ``[BOT]`` + ``tokenizer.encode(" " + prompt).ids``.
    max_tokens, temperature, repetition_penalty, repetition_penalty_range, top_k
        The article's parameters (``temperature=0``: greedy; ``top_k <= 0``: off).
    device
        Where input ids go for a recomputed model; a cached model uses its weights' device.
    seed : int, optional
        Reproducible draws independent of torch's global generator. Without it, a run after
        ``torch.manual_seed(s)`` draws like the article's loop after the same call.
    callback : callable, optional
        ``callback(token_id)`` for each new token as it is produced.
    top_p, min_p, frequency_penalty, presence_penalty
        Beyond the article (see :class:`SamplingParams`); the defaults turn them off.
    cuda_graph, sync_every, speculative, num_speculative_tokens
        As for :func:`generate_batch`.
    prompt_token_ids : sequence of int, optional
        The prompt as token ids (used as given), instead of ``prompt``.
    messages : list of dict, optional
        The prompt as one conversation through the chat template, instead of ``prompt``.
    n : int
        Samples: with ``n > 1`` a list of ``n`` strings (sample ``j`` seeded ``seed + j``).
    **fields
        ``stop``, ``stop_token_ids``, ``include_stop_str_in_output``, ``min_tokens``,
        ``logit_bias``, ``allowed_token_ids``, ``json_schema``, ``regex``, ``grammar``: as
        for :func:`generate_batch`.

    Returns
    -------
    str
        ``tokenizer.decode`` of the generated ids (prompt and ``[EOT]`` excluded).

    Examples
    --------
    >>> text = generate(model, tokenizer, "Once upon a time", max_tokens=50)  # doctest: +SKIP
    """
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    unknown = sorted(set(fields) - set(RESEARCH_FIELDS))
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments {unknown}")
    texts = generate_batch(
        model, tokenizer, None if prompt is None else [prompt], max_tokens, temperature,
        repetition_penalty,
        repetition_penalty_range, top_k, device, seed=seed, backend=backend,
        penalty_scope=penalty_scope, penalty_mode=penalty_mode, bos_token=bos_token,
        eos_token=eos_token,
        callback=None if callback is None else (lambda _row, t: callback(t)),
        top_p=top_p, min_p=min_p, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, cuda_graph=cuda_graph, sync_every=sync_every,
        speculative=speculative, num_speculative_tokens=num_speculative_tokens,
        prompt_token_ids=None if prompt_token_ids is None else [prompt_token_ids],
        messages=None if messages is None else [messages], n=n, **fields,
    )
    return texts[0] if n == 1 else texts
