"""Speculative decoding returns plain decoding's tokens (lmgen_fast.speculative).

Seeded and greedy rows are compared token for token with plain decoding on the embedded
model; unseeded rows by a chi-square test of the joint law of their first tokens against
the exact one, computed here in float64 from full forwards. An oracle drafter (it knows
plain decoding's output and errs where told) puts stops inside accepted runs and makes rows
accept different counts, with the number of target forwards known in advance.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from scipy import stats

import lmgen_fast
from lmgen_fast import SamplingParams, generate, generate_batch
from lmgen_fast.models import LlamaConfig, LlamaForPretraining
from lmgen_fast.models.decoder import decoder_for, wrap
from lmgen_fast.runtime import graphs
from lmgen_fast.speculative import drafters, verify
from lmgen_fast.speculative import rows as speculative_rows
from lmgen_fast.speculative.drafters import NgramDrafter

from conftest import ReplayedGraph, StandInGraph, random_model

SUBJECTS = ["The list type", "A dictionary maps keys", "The for statement", "import os",
            "def main():", "Exceptions are raised", "class Point:", "The module search path"]
TAILS = ["", " is used to", ". For example,", " returns a new"]


def _prompts() -> list[str]:
    out = []
    for i, (s, t) in enumerate(itertools.product(SUBJECTS, TAILS)):
        out.append(s + t)
        # Half the prompts repeat themselves: text the ngram drafter finds again.
        out.append(f"{s}{t} {s}{t} {s}" if i % 2 else f"{t} {s}.")
    return out


PROMPTS = _prompts()
assert len(PROMPTS) == 64


def _rows(greedy: bool) -> list[SamplingParams]:
    rows = []
    for i in range(len(PROMPTS)):
        extra = dict(repetition_penalty=1.0 + 0.1 * (i % 4), repetition_penalty_range=i % 3 * 8,
                     penalty_scope="all" if i % 5 == 0 else "generated",
                     penalty_mode="once" if i % 7 == 0 else "per_occurrence",
                     frequency_penalty=0.2 if i % 3 == 0 else 0.0,
                     presence_penalty=0.3 if i % 4 == 1 else 0.0)
        if greedy:
            rows.append(SamplingParams(temperature=0.0, seed=i, **extra))
        else:
            rows.append(SamplingParams(temperature=0.8, top_k=(0, 40, 8)[i % 3],
                                       top_p=(1.0, 0.9)[i % 2], seed=1000 + i, **extra))
    return rows


MAX_TOKENS = 32


@pytest.fixture(scope="module")
def default():
    return lmgen_fast.load_default()


@pytest.fixture(scope="module")
def plain(default, one_thread):
    model, tok = default
    return {greedy: generate_batch(model, tok, PROMPTS, MAX_TOKENS, params=_rows(greedy),
                                   return_details=True)
            for greedy in (True, False)}


def _compare(plain_rows, spec_rows) -> int:
    """Rows whose tokens differ; every row must carry its counts."""
    for g in spec_rows:
        assert g.target_forwards >= 1 and 0 <= g.accepted_drafts <= g.proposed_drafts
        # Every target forward but the prefill gives one token beyond its accepted drafts.
        assert len(g.token_ids) <= g.target_forwards + g.accepted_drafts
    return sum(p.token_ids != s.token_ids or p.finish_reason != s.finish_reason
               for p, s in zip(plain_rows, spec_rows, strict=True))


def _random_draft(vocab: int) -> LlamaForPretraining:
    torch.manual_seed(123)
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=1024, hidden_size=64,
                      intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2)
    return LlamaForPretraining(cfg).eval()


def test_ngram_matches_plain_decoding(default, plain):
    model, tok = default
    differ, rows, accepted, forwards, tokens = 0, 0, 0, 0, 0
    for greedy in (True, False):
        spec = generate_batch(model, tok, PROMPTS, MAX_TOKENS, params=_rows(greedy),
                              return_details=True, speculative="ngram",
                              num_speculative_tokens=4)
        differ += _compare(plain[greedy], spec)
        rows += len(spec)
        accepted += sum(g.accepted_drafts for g in spec)
        forwards += sum(g.target_forwards for g in spec)
        tokens += sum(len(g.token_ids) for g in spec)
    # README ("The caveat"): none of the rows of this file differs from plain decoding.
    assert differ == 0, f"{differ} of {rows} rows differ"
    assert accepted > 0 and forwards < tokens  # the drafts saved forwards


@pytest.mark.parametrize("draft", ["random", "self"])
def test_draft_model_matches_plain_decoding(default, plain, draft):
    model, tok = default
    drafter = _random_draft(model.config.vocab_size) if draft == "random" else model
    differ, rows, accepted, proposed = 0, 0, 0, 0
    for greedy in (True, False):
        spec = generate_batch(model, tok, PROMPTS, MAX_TOKENS, params=_rows(greedy),
                              return_details=True, speculative=drafter,
                              num_speculative_tokens=3)
        differ += _compare(plain[greedy], spec)
        rows += len(spec)
        accepted += sum(g.accepted_drafts for g in spec)
        proposed += sum(g.proposed_drafts for g in spec)
    # README ("The caveat"): none of the rows of this file differs from plain decoding.
    assert differ == 0, f"{differ} of {rows} rows differ"
    rate = accepted / proposed
    if draft == "self":
        # Same model, same noise keys: the drafts are the target's own draws.
        assert rate > 0.9, rate
    else:
        assert rate < 0.2, rate


def exact_joint(model, prompt: list[int], top_k: int, depth: int, eot: int,
                 temperature: float = 1.0) -> dict:
    """P(first ``depth`` tokens, a row ending at EOT) under ``temperature`` and top-k, from
    float64 softmaxes of full forwards."""
    out, done = {(): 1.0}, {}
    for _ in range(depth):
        nxt = {}
        for prefix, p in out.items():
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(prefix)]))[0, -1].double()
            vals, ids = logits.topk(top_k)
            probs = torch.softmax(vals / temperature, dim=0).tolist()
            for i, q in zip(ids.tolist(), probs, strict=True):
                (done if i == eot else nxt)[prefix + (i,)] = p * q
        out = nxt
    return {**out, **done}


@pytest.mark.parametrize("draft", ["perturbed", "self"])
def test_unseeded_rows_draw_the_exact_distribution(tokenizer, one_thread, draft):
    # Logits scaled by 5: the top-3 laws are sharp enough that 3000 rows reject a 20% error
    # in temperature with probability 0.9999 (at scale 1 it was 0.014; chi_square_power.py).
    model = random_model(tokenizer.get_vocab_size(), seed=3, scale=5.0)
    drafter = model
    if draft == "perturbed":  # agrees sometimes: accepted and rejected drafts both occur
        drafter = random_model(tokenizer.get_vocab_size(), seed=3, scale=5.0)
        with torch.no_grad():
            w = drafter.lm_head.weight
            w.add_(torch.randn_like(w) * w.std())
    bot = tokenizer.token_to_id("[BOT]")
    prompt_ids = [bot] + tokenizer.encode(" The quick").ids
    eot = tokenizer.token_to_id("[EOT]")
    exact = exact_joint(model, prompt_ids, top_k=3, depth=3, eot=eot)
    n = 3000
    torch.manual_seed(0)
    got = generate_batch(model, tokenizer, ["The quick"] * n, 3, temperature=1.0, top_k=3,
                         return_details=True, speculative=drafter, num_speculative_tokens=2)
    keys = sorted(exact)
    counts = {key: 0 for key in keys}
    for g in got:
        drawn = tuple(g.token_ids) + ((eot,) if g.finish_reason == "eot" else ())
        counts[drawn] += 1  # a KeyError would be a draw outside the support
    accepted = sum(g.accepted_drafts for g in got)
    proposed = sum(g.proposed_drafts for g in got)
    assert 0 < accepted <= proposed and (accepted < proposed) == (draft == "perturbed")
    observed = [counts[key] for key in keys]
    expected = [exact[key] * n for key in keys]
    # At a nominal 1e-3 the chi-square's true level is 1.16e-3 here (simulated, cells
    # expected 7.8 times and more); 7e-4 keeps false rejection under 1e-3.
    assert stats.chisquare(observed, expected).pvalue > 7e-4
    # The test has power: a temperature 20% off is rejected with probability 0.99 or more.
    from chi_square_power import noncentral_power

    for t in (0.8, 1.2):
        off = exact_joint(model, prompt_ids, top_k=3, depth=3, eot=eot, temperature=t)
        power = noncentral_power([exact[k] for k in keys], [off.get(k, 0.0) for k in keys],
                                 n, 7e-4, minimum=0.0)
        assert power >= 0.99, (t, power)


class OracleDrafter:
    """Proposes each row's true continuation (plain decoding's, EOT included), except that
    row ``r``'s draft number ``wrong[r]`` in every round is off by one token."""

    def __init__(self, truth: list[list[int]], prompt_lens: list[int], wrong: list[int]):
        self.truth, self.prompt_lens, self.wrong = truth, prompt_lens, wrong

    def start(self, rows, prompts, max_new):
        pass

    def propose(self, rows, k):
        out = []
        for r, seq in enumerate(rows.seqs):
            kept = len(seq) - self.prompt_lens[r]
            guess = self.truth[r][kept: kept + k]
            if self.wrong[r] < len(guess):
                guess[self.wrong[r]] = (guess[self.wrong[r]] + 1) % 50
            out.append(guess + [-1] * (k - len(guess)))
        return torch.tensor(out)


@pytest.mark.parametrize("k", [1, 4])
def test_stops_inside_accepted_runs_and_rows_accepting_different_counts(
        tokenizer, model, one_thread, k):
    prompts = ["The quick brown fox", "A", "Sampling with", "Once upon a time",
               "def generate(model", "The lazy dog"] * 2
    rows = [SamplingParams(temperature=t, top_k=20, seed=i)
            for i, t in enumerate([0.0, 1.0, 2.0, 0.7, 1.5, 1.0] * 2)]
    # The stop token: one the model draws early in row 0, so that some rows end on it.
    first = generate_batch(model, tokenizer, prompts[:1], 5, params=rows[:1],
                           return_details=True)[0]
    eos = first.token_ids[1]
    caps = [3, 7, 11, 17, 2, 30] * 2  # caps that land inside runs of k + 1 kept tokens
    kw = dict(params=rows, return_details=True, eos_token=eos)
    plain = generate_batch(model, tokenizer, prompts, caps, **kw)
    assert {g.finish_reason for g in plain} == {"eot", "length"}
    truth = [g.token_ids + ([eos] if g.finish_reason == "eot" else []) for g in plain]
    lens = [1 + len(tokenizer.encode(" " + p).ids) for p in prompts]
    wrong = [r % (k + 1) for r in range(len(prompts))]  # k: every draft right
    spec = generate_batch(model, tokenizer, prompts, caps, **kw,
                          speculative=OracleDrafter(truth, lens, wrong),
                          num_speculative_tokens=k)
    for r, (p, s) in enumerate(zip(plain, spec, strict=True)):
        assert (s.token_ids, s.finish_reason) == (p.token_ids, p.finish_reason), r
        sampled = len(truth[r])  # tokens drawn, the stop token included
        # After the prefill's token, each round keeps wrong[r] drafts and the target's next
        # token (fewer in the round where the row stops).
        rounds = math.ceil((sampled - 1) / (wrong[r] + 1))
        assert s.target_forwards == 1 + rounds, r
        # Within a round every kept token but the last is an accepted draft; the last is
        # one too where the row stopped on a draft.
        assert sampled - 1 - rounds <= s.accepted_drafts <= sampled - rounds, r
    assert len({s.accepted_drafts / s.target_forwards for s in spec}) > 2


def test_logprobs_and_callback_follow_the_kept_tokens(tokenizer, model, one_thread):
    prompts = ["The quick brown fox", "A", "Sampling with temperature"]
    kw = dict(max_tokens=12, temperature=0.9, top_k=10, seeds=[1, 2, 3], logprobs=2,
              return_details=True)
    plain = generate_batch(model, tokenizer, prompts, **kw)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    spec = generate_batch(model, tokenizer, prompts, **kw, speculative=model,
                          callback=lambda r, t: seen[r].append(t))
    for r, (p, s) in enumerate(zip(plain, spec, strict=True)):
        assert s.token_ids == p.token_ids == seen[r]
        assert s.logprobs == pytest.approx(p.logprobs, abs=1e-4)
        assert [[i for i, _ in alts] for alts in s.top_logprobs] == \
            [[i for i, _ in alts] for alts in p.top_logprobs]
        assert p.target_forwards is None
    one = generate(model, tokenizer, prompts[0], 12, 0.9, top_k=10, seed=1,
                   speculative="ngram", num_speculative_tokens=2)
    assert one == generate(model, tokenizer, prompts[0], 12, 0.9, top_k=10, seed=1)


def test_fixed_shape_sampler_path_gives_the_same_tokens(tokenizer, model, monkeypatch):
    # The path rounds take off the CPU (reference.sample_on_device), run here on the CPU.
    prompts = ["The quick brown fox", "A", "Sampling with temperature"]
    rows = [SamplingParams(temperature=t, top_k=10, top_p=0.9, repetition_penalty=1.2,
                           seed=i) for i, t in enumerate([0.0, 0.8, 1.3])]
    plain = generate_batch(model, tokenizer, prompts, 16, params=rows)
    monkeypatch.setattr(speculative_rows, "fixed_shapes", lambda device: True)
    assert generate_batch(model, tokenizer, prompts, 16, params=rows, speculative=model,
                          num_speculative_tokens=3) == plain


@pytest.mark.parametrize("fixed", [False, True])
def test_processed_logprobs_are_plain_decodings(tokenizer, model, monkeypatch, fixed):
    # logprobs_mode="processed" through the verify steps: the same values and surviving
    # alternatives as plain decoding, on the CPU path and the fixed-shape path.
    prompts = ["The quick brown fox", "A", "Sampling with temperature"]
    rows = [SamplingParams(temperature=t, top_k=k, top_p=0.8, min_p=0.05, seed=i, logprobs=3,
                           repetition_penalty=1.2, logprobs_mode="processed")
            for i, (t, k) in enumerate([(0.0, 10), (0.8, 0), (1.3, 6)])]
    plain = generate_batch(model, tokenizer, prompts, 12, params=rows, return_details=True)
    if fixed:
        monkeypatch.setattr(speculative_rows, "fixed_shapes", lambda device: True)
    spec = generate_batch(model, tokenizer, prompts, 12, params=rows, return_details=True,
                          speculative=model, num_speculative_tokens=3)
    for p, s in zip(plain, spec, strict=True):
        assert s.token_ids == p.token_ids
        assert s.logprobs == pytest.approx(p.logprobs, abs=1e-5)
        assert [[i for i, _ in alts] for alts in s.top_logprobs] == \
            [[i for i, _ in alts] for alts in p.top_logprobs]
    assert plain[0].logprobs == [0.0] * len(plain[0].token_ids)  # greedy: a point mass
    assert any(len(alts) < 3 for p in plain for alts in p.top_logprobs)  # survivors only


class Uncapturable(StandInGraph):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.mark.parametrize("graph", [ReplayedGraph, Uncapturable])
def test_captured_verify_steps_give_the_same_tokens(tokenizer, model, monkeypatch, graph):
    prompts = ["The quick brown fox", "A", "Sampling with temperature", "def generate("]
    rows = [SamplingParams(temperature=t, top_k=10, top_p=0.9, repetition_penalty=1.2,
                           presence_penalty=0.1 * i, penalty_scope=("all", "generated")[i % 2],
                           seed=i) for i, t in enumerate([0.0, 0.8, 1.3, 1.0])]
    plain = generate_batch(model, tokenizer, prompts, 24, params=rows, return_details=True)
    monkeypatch.setattr(speculative_rows, "fixed_shapes", lambda device: True)
    monkeypatch.setattr(graphs, "graph_backend", lambda device: graph)
    # Attention lengths in blocks, as on CUDA, so that rounds replay captured steps.
    monkeypatch.setattr(decoder_for(model), "kv_block", 32)
    ReplayedGraph.captures = ReplayedGraph.replays = 0
    for drafter in ("ngram", model):
        if graph is Uncapturable:
            with pytest.warns(RuntimeWarning, match="runs eagerly"):
                spec = generate_batch(model, tokenizer, prompts, 24, params=rows,
                                      return_details=True, speculative=drafter)
        else:
            spec = generate_batch(model, tokenizer, prompts, 24, params=rows,
                                  return_details=True, speculative=drafter)
        for p, s in zip(plain, spec, strict=True):
            assert s.token_ids == p.token_ids
            assert s.logprobs == pytest.approx(p.logprobs, abs=1e-4)
    if graph is ReplayedGraph:
        assert ReplayedGraph.replays > ReplayedGraph.captures > 0


def test_ngram_drafter_proposes_what_followed_the_latest_match():
    class Rows:
        device = torch.device("cpu")
        seqs = [[5, 1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], [4, 4, 4], [1, 2, 3], [8, 6, 8]]
        done = [False, False, False, True]

    d = NgramDrafter()
    d.start(Rows, Rows.seqs, 0)
    got = d.propose(Rows, 3).tolist()
    assert got[0] == [7, 1, 2]  # last 3 tokens seen before, latest occurrence: "7" follows
    assert got[1] == [4, 4, 4]  # an overlapping copy continues the cycle
    assert got[2] == [-1, -1, -1]  # nothing seen before
    assert got[3] == [-1, -1, -1]  # finished rows get no drafts
    Rows.seqs[2] += [1, 2]  # now "1 2" recurs: "3" followed it, then the copy goes on
    assert d.propose(Rows, 4).tolist()[2] == [3, 1, 2, 3]


def test_bad_arguments(tokenizer, model):
    def call(m=model, **kw):
        return generate_batch(m, tokenizer, ["A"], 3, seed=0, **kw)

    with pytest.raises(ValueError, match="num_speculative_tokens"):
        call(speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="speculative must be"):
        call(speculative="lookup")
    with pytest.raises(ValueError, match="KV cache"):
        call(m=lambda ids: model(ids), speculative="ngram")
    other = random_model(tokenizer.get_vocab_size() + 8, seed=1)
    with pytest.raises(ValueError, match="share the tokenizer"):
        call(speculative=other)


def test_cli_generate_and_run_take_speculative_options(tmp_path, capsys, one_thread):
    from safetensors.torch import save_file

    from lmgen_fast.cli.main import main

    model, tok = lmgen_fast.load_default()
    settings = ["--max-tokens", "24", "--temperature", "0.8", "--top-k", "40", "--seed", "3",
                "--device", "cpu"]
    prompt = "The list type"
    expected = generate(model, tok, prompt, 24, 0.8, top_k=40, seed=3)
    assert main(["generate", prompt, *settings, "--speculative", "ngram",
                 "--num-speculative-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n"
    assert "drafted tokens accepted" in err and "tokens per target forward" in err

    # A draft checkpoint directory (the random draft model, sharing the vocabulary).
    draft = tmp_path / "draft"
    draft.mkdir()
    small = _random_draft(model.config.vocab_size)
    (draft / "config.json").write_text(json.dumps(small.config.to_dict()))
    save_file({k: v.contiguous() for k, v in small.state_dict().items()},
              str(draft / "model.safetensors"))
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n"
                           for i, p in enumerate(SUBJECTS)))
    plain_out, spec_out = tmp_path / "plain.jsonl", tmp_path / "spec.jsonl"
    base = ["run", "--input", str(inp), "--no-progress", *settings]
    assert main([*base, "--output", str(plain_out)]) == 0
    capsys.readouterr()
    assert main([*base, "--output", str(spec_out), "--speculative", str(draft)]) == 0
    err = capsys.readouterr().err
    assert "tokens per target forward" in err
    assert plain_out.read_text() == spec_out.read_text()
    assert main(["generate", prompt, *settings, "--num-speculative-tokens", "0"]) == 2
    assert "--num-speculative-tokens" in capsys.readouterr().err
    assert main(["generate", prompt, *settings, "--speculative", str(tmp_path / "none")]) == 2
    assert "--speculative" in capsys.readouterr().err
    other = random_model(400)  # another vocabulary
    (draft / "config.json").write_text(json.dumps(other.config.to_dict()))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()},
              str(draft / "model.safetensors"))
    assert main(["generate", prompt, *settings, "--speculative", str(draft)]) == 2
    assert "share the tokenizer" in capsys.readouterr().err


def test_transformers_llama_target_and_draft(tokenizer, model, one_thread):
    pytest.importorskip("transformers")
    hf = model.to_hf()
    prompts = ["The quick brown fox", "Sampling with temperature"]
    kw = dict(max_tokens=16, temperature=0.9, top_k=20, seeds=[4, 5])
    plain = generate_batch(hf, tokenizer, prompts, **kw)
    assert generate_batch(hf, tokenizer, prompts, **kw, speculative="ngram") == plain
    assert generate_batch(model, tokenizer, prompts, **kw, speculative=hf) == \
        generate_batch(model, tokenizer, prompts, **kw)


def test_a_row_with_nothing_to_sample_raises_with_what_was_kept(tokenizer):
    from lmgen_fast.api.generate import GenerationError

    model = random_model(tokenizer.get_vocab_size(), seed=5, scale=4.0)
    kw = dict(max_tokens=12, temperature=0.0, top_k=0)
    good = generate_batch(model, tokenizer, ["The quick brown fox"], return_details=True, **kw)
    poison = good[0].token_ids[2]
    with torch.no_grad():  # the logits after this token are NaN: nothing left to sample
        model.base_model.embed_tokens.weight[poison] = float("nan")
    errors = []
    for spec in ({}, dict(speculative="ngram"), dict(speculative=OracleDrafter(
            [good[0].token_ids], [len(tokenizer.encode(" The quick brown fox").ids) + 1],
            [4]))):
        with pytest.raises(GenerationError, match="row\\(s\\) \\[0\\]") as info:
            generate_batch(model, tokenizer, ["The quick brown fox"], **kw, **spec)
        errors.append((str(info.value), info.value.partial))
    assert errors[0][1] == [good[0].token_ids[:3]]
    assert errors[1] == errors[0] and errors[2] == errors[0]


def test_draft_model_proposes_its_own_greedy_continuation(tokenizer, model, one_thread):
    # The draft model's cache is re-synced every round (its last two kept tokens): its
    # drafts must be what a full recompute of the draft model picks.
    draft = random_model(tokenizer.get_vocab_size(), seed=9, scale=8.0)
    inner = drafters.ModelDrafter(draft)
    seen = []

    class Recording:
        vocab = inner.vocab

        def start(self, rows, prompts, max_new):
            inner.start(rows, prompts, max_new)

        def propose(self, rows, k):
            drafts = inner.propose(rows, k)
            seen.append(([list(s) for s in rows.seqs], list(rows.done), drafts.tolist()))
            return drafts

    prompts = ["The quick brown fox", "A", "Sampling with temperature"]
    plain = generate_batch(model, tokenizer, prompts, 20, temperature=0.0)
    got = generate_batch(model, tokenizer, prompts, 20, temperature=0.0,
                         speculative=Recording(), num_speculative_tokens=3)
    assert got == plain and len(seen) > 3
    for seqs, done, drafts in seen:
        for seq, finished, guess in zip(seqs, done, drafts, strict=True):
            if finished:
                continue
            with torch.no_grad():
                for j, d in enumerate(guess):
                    expect = draft(torch.tensor([seq + guess[:j]]))[0, -1].argmax().item()
                    assert d == expect


@pytest.mark.parametrize("penalized", [False, True])
def test_the_captured_verify_step_never_waits_for_the_device(penalized):
    # As tests/engine/test_capture_safety.py checks the engine's step: on the meta device, the
    # captured region runs under a mode that records every host wait and CPU tensor.
    from test_capture_safety import CheckedCapture

    CheckedCapture.found, CheckedCapture.captures = [], 0
    model = random_model(64, seed=1).to("meta")
    decoder = wrap(model)
    decoder.kv_block = 4
    prompts = [[1, 2, 3], [4, 5]]
    rows = [SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=1),
            SamplingParams(temperature=0.0, repetition_penalty=1.3 if penalized else 1.0,
                           frequency_penalty=0.2 if penalized else 0.0)]
    decoder.prefill(prompts, 16)
    meta = torch.device("meta")
    state = speculative_rows.Rows(prompts, rows, [12, 12], meta, 24)
    graphs = verify.VerifyGraphs(CheckedCapture, decoder, state, logprobs=True)
    for length, t in [(4, 3), (5, 3), (9, 5), (9, 1)]:
        positions = (torch.tensor([[length - 1], [length - 2]]) + torch.arange(t)).to(meta)
        ids = torch.zeros(2, t, dtype=torch.int64, device=meta)
        drafts = torch.zeros(2, t - 1, dtype=torch.int64, device=meta)
        got = graphs.run(ids, positions, drafts, length + t)
        assert got.tokens.shape == (2 * t,) and got.tokens.device.type == "meta"
    assert not graphs.broken and CheckedCapture.captures == 4
    assert CheckedCapture.found == []


def _random_ledger(gen: torch.Generator, batch: int, cols: int, done: torch.Tensor,
                   count: torch.Tensor, max_tokens: torch.Tensor, steps: int = 1):
    """A ledger with room for ``steps`` more steps of every row."""
    from lmgen_fast.engine.bookkeeping import Ledger

    i64 = dict(dtype=torch.int64)
    return Ledger(out=torch.zeros(batch, cols, **i64), token_lp=None, top_ids=None,
                  top_lp=None, hist=torch.zeros(batch, cols, **i64),
                  hlen=torch.zeros(batch, **i64), tokens=torch.zeros(batch, **i64),
                  step=torch.randint(0, cols - steps + 1, (batch,), generator=gen),
                  count=count.clone(), max_tokens=max_tokens, done=done.clone(),
                  bad_step=torch.full((batch,), -1, **i64),
                  bad_bits=torch.zeros(batch, dtype=torch.int32))


def test_the_stop_rule_is_the_engines_bookkeeping():
    # Rounds decide, per row and position, keep and stop with core.rows.book_stop; the
    # engine's book_eager (tested against the bookkeeping kernel) must decide alike.
    from lmgen_fast.core.errors import STATUS_SLOW
    from lmgen_fast.core.rows import book_stop
    from lmgen_fast.engine.bookkeeping import book_eager

    gen = torch.Generator().manual_seed(0)
    batch, eos = 64, 3
    for _ in range(50):
        done = torch.rand(batch, generator=gen) < 0.3
        count = torch.randint(0, 6, (batch,), generator=gen)
        max_tokens = torch.randint(1, 7, (batch,), generator=gen)
        tokens = torch.randint(0, 6, (batch,), generator=gen)
        flags = torch.randint(0, 16, (batch,), generator=gen, dtype=torch.int32)
        status = torch.where(torch.rand(batch, generator=gen) < 0.3, flags, 0).int()
        led = _random_ledger(gen, batch, 8, done, count, max_tokens)
        book_eager(led, tokens, status, eos)
        bad = (status & ~STATUS_SLOW) != 0
        kept, after, stop = book_stop(done, bad, tokens == eos, count, max_tokens)
        assert torch.equal(after, led.count) and torch.equal(stop, led.done)
        assert torch.equal(kept.long(), led.count - count)
        for r in range(batch):  # one row at a time, as a round books it
            one = book_stop(bool(done[r]), bool(bad[r]), int(tokens[r]) == eos,
                            int(count[r]), int(max_tokens[r]))
            assert one == (bool(kept[r]), int(after[r]), bool(stop[r]))


def test_a_round_keeps_and_stops_as_the_engine_would():
    # A whole round booked by accept.book_round against book_eager run position by
    # position, each row leaving the round at its first rejected draft; the end id and
    # some rows' stop ids end a row (book_eager given the rows' packed stop ids).
    from lmgen_fast.engine.bookkeeping import book_eager
    from lmgen_fast.sampling.reference import SampleResult
    from lmgen_fast.speculative.accept import book_round

    gen = torch.Generator().manual_seed(1)
    batch, eos, t = 32, 3, 5
    for _ in range(20):
        max_tokens = torch.randint(1, 9, (batch,), generator=gen)
        count = (torch.rand(batch, generator=gen) * max_tokens).long()
        done = torch.rand(batch, generator=gen) < 0.2
        params = [SamplingParams(seed=0, stop_token_ids=[5] if r % 3 == 0 else [])
                  for r in range(batch)]
        state = speculative_rows.Rows([[1, 2]] * batch, params, max_tokens.tolist(),
                                      torch.device("cpu"), 32, end_ids=(eos,))
        for r in range(batch):
            state.out[r] = [7] * int(count[r])
            state.seqs[r] += state.out[r]
            state.done[r] = bool(done[r])
        tokens = torch.randint(0, 8, (batch, t), generator=gen)
        drafts = torch.where(torch.rand(batch, t - 1, generator=gen) < 0.7, tokens[:, :-1],
                             torch.randint(0, 8, (batch, t - 1), generator=gen))
        book_round(state, SampleResult(tokens.flatten(), torch.zeros(batch * t,
                                                                     dtype=torch.int32), None),
                   drafts.tolist(), t, None)
        led = _random_ledger(gen, batch, 2 * t, done, count, max_tokens, steps=t)
        final_count, final_done, in_round = count.clone(), done.clone(), ~done
        for j in range(t):
            book_eager(led, tokens[:, j], None, state.packed.stop_ids)
            hit = drafts[:, j] == tokens[:, j] if j < t - 1 else torch.zeros_like(done)
            leave = in_round & (led.done | ~hit)
            final_count = torch.where(leave, led.count, final_count)
            final_done = torch.where(leave, led.done, final_done)
            led.done.logical_or_(leave)  # a row out of the round books nothing more
            in_round &= ~leave
        assert [len(o) for o in state.out] == final_count.tolist()
        assert state.done == final_done.tolist()
        for r in range(batch):
            assert state.out[r][int(count[r]):] == tokens[r, : int(final_count[r] - count[r])] \
                .tolist()
