"""What a call asks for (SPEC section 7): n samples per prompt (sample j is the n=1 run
with seed s + j; one prefill per prompt, counted in positions through the model), prompts
as token ids and as chat messages, the end ids of a transformers model, bad input."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers

from lmgen_fast import SamplingParams, generate, generate_batch
from lmgen_fast.api.requests import end_ids
from lmgen_fast.api.tokenization import adapt_tokenizer
from lmgen_fast.engine import generate_ids
from lmgen_fast.models.decoder import decoder_for

from conftest import CHAT_TEMPLATE

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
PROMPTS = ["Once upon a time", "The cat sat on"]


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="[BOT]", eos_token="[EOT]", unk_token="[UNK]",
        pad_token="[PAD]")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def position_counter(decoder, monkeypatch):
    """benchmarks/bench_jobs.py's counter of positions run outside decode steps (one copy
    for the benchmark's prefill column and this test), its wrappers undone after the test."""
    spec = importlib.util.spec_from_file_location("bench_jobs", BENCHMARKS / "bench_jobs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PrefillCounter(decoder, patch=monkeypatch.setattr)


def test_n_samples_are_the_seeded_single_runs_and_share_one_prefill(model, tokenizer,
                                                                    monkeypatch):
    """n=3 for two prompts: prompt-major, sample j == the prompt's n=1 run with seed s + j
    (its processed log-probabilities up to rounding); the prompt's positions go through the
    model once, as one batch and through 2 slots (samples admitted at different host checks
    copy a sibling's cache rows)."""
    tok = adapt_tokenizer(tokenizer)
    ids = [tok.encode_prompt(p) for p in PROMPTS]
    # One prefill per prompt: as one batch, both padded to the longest; through slots,
    # each prompt but its last token, alone (its samples are copies).
    once = {None: 2 * max(map(len, ids)), 2: sum(len(p) - 1 for p in ids)}
    kw = dict(max_tokens=8, return_details=True, logprobs_mode="processed", temperature=0.9)
    single = [generate_batch(model, tokenizer, [p], seed=100 + j, **kw)[0]
              for p in PROMPTS for j in range(3)]
    counter = position_counter(decoder_for(model), monkeypatch)
    for slots, want in once.items():
        counter.positions = 0
        got = generate_batch(model, tokenizer, PROMPTS, seed=100, n=3, max_batch_size=slots,
                             **kw)
        assert counter.positions == want, slots
        assert [(g.prompt_index, g.sample_index) for g in got] == \
            [(i, j) for i in range(2) for j in range(3)]
        for g, s in zip(got, single, strict=True):
            assert (g.token_ids, g.finish_reason) == (s.token_ids, s.finish_reason)
            # Up to the rounding of a batch of another size.
            assert g.logprobs == pytest.approx(s.logprobs, abs=1e-4)
    assert len({tuple(g.token_ids) for g in got}) > 2  # the samples differ
    # Through slots with every row running to its cap: siblings finish together, and the
    # next ones still copy their rows.
    counter.positions = 0
    rows = [SamplingParams(seed=7 + j) for j in range(3)] * 2
    generate_ids(decoder_for(model), [ids[0]] * 3 + [ids[1]] * 3, rows, [4] * 6, -1,
                 max_batch_size=2)
    assert counter.positions == once[2]


def test_token_id_and_chat_prompts_match_their_text_forms(model, tokenizer, chat_tokenizer):
    """prompt_token_ids are used as given (no BOT added): the article encoding's ids give
    the text prompt's result. Messages go through the chat template with the generation
    prompt, as the tokenizer renders and encodes it (no BOT or space added)."""
    tok = adapt_tokenizer(tokenizer)
    kw = dict(max_tokens=6, seed=5)
    text = generate_batch(model, tokenizer, PROMPTS, **kw)
    assert generate_batch(model, tokenizer, prompt_token_ids=[tok.encode_prompt(p)
                                                              for p in PROMPTS], **kw) == text
    chat = [[{"role": "system", "content": "Be brief."},
             {"role": "user", "content": p}] for p in PROMPTS]
    rendered = [chat_tokenizer.apply_chat_template(c, add_generation_prompt=True,
                                                   tokenize=False) for c in chat]
    assert rendered[0].endswith("<assistant>") and rendered[0].startswith("<system>")
    ids = [chat_tokenizer.encode(r, add_special_tokens=False) for r in rendered]
    by_ids = generate_batch(model, chat_tokenizer, prompt_token_ids=ids, **kw)
    assert generate_batch(model, chat_tokenizer, messages=chat, **kw) == by_ids
    assert generate(model, chat_tokenizer, messages=chat[1], **kw) == by_ids[1]
    assert generate(model, tokenizer, prompt_token_ids=tok.encode_prompt(PROMPTS[0]),
                    n=2, **kw) == generate_batch(model, tokenizer, PROMPTS[:1], n=2, **kw)


def test_a_transformers_models_eos_list_ends_rows(tokenizer):
    """generation_config.eos_token_id (a list) adds to the tokenizer's end id, unless
    eos_token= names the one end token."""
    # What end_ids reads of a transformers model (building a real one takes seconds).
    hf = SimpleNamespace(generation_config=transformers.GenerationConfig(eos_token_id=[5, 9]))
    tok = adapt_tokenizer(tokenizer)
    assert end_ids(hf, tok, None) == (tok.eos_id, 5, 9)
    assert end_ids(hf, tok, "[EOT]") == (tok.eos_id,)


def test_bad_prompts_are_refused_by_name(model, tokenizer, chat_tokenizer):
    cases = [
        (dict(prompts=PROMPTS, messages=[[{"role": "user", "content": "x"}]]),
         "exactly one of prompts, prompt_token_ids and messages"),
        (dict(), "exactly one of"),
        (dict(prompt_token_ids=[[1, 2], "ab"]), r"prompt_token_ids\[1\]"),
        (dict(prompt_token_ids=[[1, -2]]), r"prompt_token_ids\[0\] holds -2"),
        (dict(prompt_token_ids=[[1, 2], [3, 10**6]]),
         r"prompt 1: prompt_token_ids has token id 1000000, outside the vocabulary"),
        (dict(messages=[[{"role": "user"}]]), r"messages\[0\]\[0\] needs a string 'content'"),
        (dict(messages=[["hi"]]), r"messages\[0\]\[0\] must be a dict"),
        (dict(prompts=PROMPTS, n=0), "n must be >= 1"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            generate_batch(model, chat_tokenizer, max_tokens=2, **kwargs)
    with pytest.raises(ValueError, match="chat template"):
        generate_batch(model, tokenizer, messages=[[{"role": "user", "content": "x"}]])
