"""Shared fixtures: a small byte-level BPE tokenizer and small random Llama models."""

from __future__ import annotations

import math
import os

import pytest
import torch
from scipy import stats
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmgen_fast.models import LlamaConfig, LlamaForPretraining

# Without a GPU the Triton kernels run in the interpreter, which must be chosen before any
# kernel is defined; setting it here, first, keeps the order of test imports irrelevant.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Where the kernel tests run: CUDA, or the interpreter on CPU tensors.
CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA or INTERPRETED, reason="needs a CUDA device")


def require_kernel_runtime() -> None:
    """Skip the calling test module unless triton is installed and can run here."""
    pytest.importorskip("triton")
    if not CUDA and not INTERPRETED:
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)


class StandInGraph:
    """Base of the CPU stand-ins for :class:`lmgen_fast.runtime.graphs.CudaGraph`: the
    caller hands it a :class:`~lmgen_fast.runtime.graphs.GraphPool`, warms a step up by
    running it, then captures and replays; subclasses say what capture and replay do."""

    def __init__(self, pool):
        pass

    @staticmethod
    def warm(fn):
        fn()


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the ones before it.",
    "Sampling with temperature, top-k and a repetition penalty shapes the output.",
    "def generate(model, tokenizer, prompt): return text",
    "Once upon a time there was a small model that wrote short stories.",
] * 20


def make_tokenizer(specials=("[UNK]", "[BOT]", "[EOT]", "[PAD]"), vocab_size=400) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread.

    Tiny models decode fastest on one thread, and on a machine whose cores are busy, two
    threads mostly wait for each other (seen here: 10 to 40 times slower).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return make_tokenizer()


def small_config(vocab_size: int, **overrides) -> LlamaConfig:
    base = dict(
        vocab_size=vocab_size, max_position_embeddings=256, hidden_size=64,
        intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )
    base.update(overrides)
    return LlamaConfig(**base)


def random_model(vocab_size: int, seed: int = 0, scale: float = 1.0, **overrides):
    """A random LlamaForPretraining; ``scale`` sharpens the output distribution."""
    torch.manual_seed(seed)
    model = LlamaForPretraining(small_config(vocab_size, **overrides))
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model.eval()


@pytest.fixture(scope="session")
def model(tokenizer) -> LlamaForPretraining:
    return random_model(tokenizer.get_vocab_size(), seed=0, scale=8.0)


def assert_frequencies_match(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    """Drawn ``tokens`` never leave the support of ``probs`` (float64 ``[V]``) and pass a
    chi-square test against it (p-value above 1e-3; fixed seeds keep it deterministic)."""
    observed = torch.bincount(tokens, minlength=probs.numel()).to(torch.float64)
    support = probs > 0
    assert observed[~support].sum() == 0, "drew a token outside the support"
    _, pvalue = stats.chisquare(observed[support], probs[support] * tokens.numel())
    assert pvalue > 1e-3, pvalue


def exact_processed(logits: torch.Tensor, p, window: list[int] | None, token: int) -> torch.Tensor:
    """The processed log-probabilities of one row in float64, written from the contract
    (docs/semantics.md sections 2 and 3) without the library's code: float64 ``[V]``.

    ``logits`` ``[V]``; ``p`` a SamplingParams; ``window`` the row's penalty window (``-1``
    for empty slots); ``token`` the drawn token (a greedy row is a point mass on it).
    """
    z = logits.to(torch.float64).clone()
    z[torch.isnan(z)] = -math.inf
    vocab = z.numel()
    greedy = p.temperature == 0
    t = 1.0 if greedy else p.temperature
    z = z / t
    counts: dict[int, int] = {}
    for w in window or []:
        if w >= 0:
            counts[w] = counts.get(w, 0) + 1
    for w, c in counts.items():
        reps = 1 if p.penalty_mode == "once" else c
        factor = p.repetition_penalty ** reps
        z[w] = z[w] / factor if z[w] > 0 else z[w] * factor
        z[w] = z[w] - (p.frequency_penalty * c + p.presence_penalty) / t
    out = torch.full((vocab,), -math.inf, dtype=torch.float64)
    if greedy:
        out[token] = 0.0
        return out
    if 0 < p.top_k < vocab:
        tau = torch.sort(z, descending=True).values[p.top_k - 1]
        z[z < tau] = -math.inf
    inf = z == math.inf
    if inf.any():
        out[inf] = -math.log(int(inf.sum()))
        return out
    if p.top_p < 1:
        q = torch.softmax(z, dim=0)
        above = torch.stack([q[z > v].sum() for v in z])
        z[above >= p.top_p] = -math.inf
    if p.min_p > 0:
        z[torch.exp(z - z.max()) < p.min_p] = -math.inf
    return torch.log_softmax(z, dim=0)


def assert_processed_close(got_token: torch.Tensor, got_ids: torch.Tensor,
                           got_vals: torch.Tensor, logits: torch.Tensor, rows, window,
                           tokens: torch.Tensor, atol: float = 1e-5) -> None:
    """A sample's processed log-probabilities (token ``[B]``, top ids and values ``[B, n]``)
    against :func:`exact_processed`: the same survivors listed in the same order (equal
    values lower id first), each value within ``atol``, and when every survivor is listed,
    their probabilities sum to 1 within ``atol``."""
    for r, p in enumerate(rows):
        win = None if window is None else window[r].tolist()
        want = exact_processed(logits[r].cpu(), p, win, int(tokens[r]))
        tok = int(tokens[r])
        assert want[tok] > -math.inf, f"row {r}: token {tok} was removed"
        assert abs(float(got_token[r]) - float(want[tok])) <= atol, (r, got_token[r], want[tok])
        n = got_ids.shape[1]
        survivors = int((want > -math.inf).sum())
        order = sorted(range(want.numel()), key=lambda i: (-float(want[i]), i))[:min(n, survivors)]
        ids = got_ids[r].tolist()
        listed = [i for i in ids if i >= 0]
        assert len(listed) == min(n, survivors), (r, ids, survivors)
        assert all(i == -1 for i in ids[len(listed):])
        # Ranks may swap only between values equal within atol.
        for a, b in zip(listed, order, strict=True):
            assert a == b or abs(float(want[a]) - float(want[b])) <= atol, (r, listed, order)
        vals = got_vals[r, :len(listed)].double().cpu()
        assert torch.allclose(vals, want[listed], atol=atol, rtol=0), (r, vals, want[listed])
        assert (got_vals[r, len(listed):] == -math.inf).all()
        if survivors <= n:
            assert abs(float(torch.exp(vals).sum()) - 1.0) <= atol
