"""Shared fixtures: a small byte-level BPE tokenizer and small random Llama models."""

from __future__ import annotations

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
    """Base of the CPU stand-ins for :class:`lmgen_fast.engine._CudaGraph`: the engine hands
    it the state, warms a step up by running it, then captures and replays; subclasses say
    what capture and replay do."""

    def __init__(self, state):
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
