"""Hugging Face transformers: wrap(), tokenizers, and exact conversion both ways.

Every model is built from a config with random weights (no network). transformers is the
independent reference for our Llama.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'lmgen-fast[hf]')"
)

from lmgen_fast import generate_batch, wrap  # noqa: E402
from lmgen_fast.api.generate import generate  # noqa: E402
from lmgen_fast.api.tokenization import adapt_tokenizer  # noqa: E402
from lmgen_fast.models import LlamaConfig, LlamaForPretraining  # noqa: E402
from lmgen_fast.models.decoder import CachedLlamaDecoder, RecomputeDecoder  # noqa: E402
from lmgen_fast.models.hf import HFCacheDecoder, from_hf, hf_adapter, to_hf  # noqa: E402

PROMPTS = [
    "The quick brown fox jumps over the lazy dog and then",
    "Once",
    "A language model predicts",
]
LLAMA3 = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
VARIANTS = {
    "plain": {},
    "tied": dict(tie_word_embeddings=True),
    "bias": dict(attention_bias=True, mlp_bias=True),
    "head_dim": dict(head_dim=32),
    "llama3": dict(rope_scaling=LLAMA3, rope_theta=500000.0),
}


def article_model(vocab_size: int, seed: int) -> LlamaForPretraining:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=128, hidden_size=64, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )
    return LlamaForPretraining(config).eval()


def hf_llama(vocab_size: int, seed: int = 0, **overrides):
    """A tiny random LlamaForCausalLM; a wide init makes greedy choices clear-cut."""
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
        pad_token_id=3,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    with torch.no_grad():  # HF zero-initialises biases: make them matter
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer):
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="[BOT]", eos_token="[EOT]", unk_token="[UNK]",
        pad_token="[PAD]",
    )


@pytest.fixture(scope="module")
def llama(tokenizer):
    return hf_llama(tokenizer.get_vocab_size())


def hf_greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    """transformers' own greedy continuation of one unpadded prompt, EOT excluded."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
            max_new_tokens=n, eos_token_id=eos, pad_token_id=3,
        )
    new = out[0, len(ids):].tolist()
    return new[: new.index(eos)] if eos in new else new


def test_import_does_not_import_transformers():
    code = "import sys, lmgen_fast; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_wrap_llama_runs_ours_on_shared_weights(llama):
    dec = wrap(llama)
    assert isinstance(dec, CachedLlamaDecoder)
    ours = dict(dec.model.named_parameters(remove_duplicate=False))
    theirs = dict(llama.named_parameters(remove_duplicate=False))
    for name, p in ours.items():
        assert p is theirs["model." + name.removeprefix("base_model.")
                           if name.startswith("base_model.") else name]


def test_greedy_matches_hf_generate(llama, tokenizer, hf_tokenizer):
    n = 24
    results = generate_batch(
        llama, hf_tokenizer, PROMPTS, max_tokens=n, top_k=1, return_details=True
    )
    tok = adapt_tokenizer(hf_tokenizer)
    for prompt, res in zip(PROMPTS, results, strict=True):
        ids = tok.encode_prompt(prompt)
        assert res.token_ids == hf_greedy(llama, ids, n, tok.eos_id)
        assert res.text == hf_tokenizer.decode(res.token_ids, skip_special_tokens=True)
        assert ids == hf_tokenizer(prompt)["input_ids"]  # the tokenizer's own encoding
    # The article's convention on its own tokenizer ([BOT], leading space) is add_bos=True
    # and the space on the transformers one: the same ids, so the same tokens.
    article = adapt_tokenizer(hf_tokenizer, add_bos=True)
    again = generate_batch(llama, tokenizer, PROMPTS, max_tokens=n, top_k=1, return_details=True)
    spaced = generate_batch(llama, article, [" " + p for p in PROMPTS], max_tokens=n, top_k=1,
                            return_details=True)
    assert [r.token_ids for r in again] == [r.token_ids for r in spaced]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_model_gives_hf_logits(variant, tokenizer):
    hf = hf_llama(tokenizer.get_vocab_size(), seed=1, **VARIANTS[variant])
    ours = from_hf(hf)
    assert isinstance(ours, LlamaForPretraining)
    hf_ptrs = {p.data_ptr() for p in hf.parameters()}
    assert not any(p.data_ptr() in hf_ptrs for p in ours.parameters()), "from_hf must copy"
    torch.manual_seed(2)
    ids = torch.randint(0, tokenizer.get_vocab_size(), (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (ours(ids) - ref).abs().max() <= 1e-4
        # Cached: a prefill of 30 tokens, then one token at a time.
        cache = ours.new_cache(2, 40)
        pos = torch.arange(40).expand(2, 40)
        hidden = ours.forward_cached(ids[:, :30], pos[:, :30], cache, kv_len=30)
        got = [ours.lm_head(hidden)]
        for t in range(30, 40):
            hidden = ours.forward_cached(ids[:, t:t + 1], pos[:, t:t + 1], cache, kv_len=t + 1)
            got.append(ours.lm_head(hidden))
        assert (torch.cat(got, dim=1) - ref).abs().max() <= 1e-4
        # Back to transformers: the same tensors, the same logits.
        back = to_hf(ours)
        assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
        theirs = back.state_dict()
        for name, p in hf.state_dict().items():
            assert torch.equal(theirs[name], p), name
        assert (back(ids).logits - ref).abs().max() <= 1e-4
        # And our adapter on the HF model itself.
        dec = wrap(hf)
        assert isinstance(dec, CachedLlamaDecoder)
        first = dec.prefill([ids[0, :30].tolist(), ids[1, :21].tolist()], 10)
        assert (first[0] - ref[0, 29]).abs().max() <= 1e-4
        assert (first[1] - ref[1, 20]).abs().max() <= 1e-4


def test_article_model_round_trip(tokenizer):
    ours = article_model(tokenizer.get_vocab_size(), seed=3)
    hf = ours.to_hf()
    cfg = hf.config
    assert cfg.tie_word_embeddings is False and cfg.rms_norm_eps == 1e-5
    assert sorted(hf.state_dict()) == sorted(
        "model." + k.removeprefix("base_model.") if k.startswith("base_model.") else k
        for k in ours.state_dict()
    )
    back = LlamaForPretraining.from_hf(hf)
    assert back.config == ours.config
    for name, p in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name
    ids = torch.randint(0, tokenizer.get_vocab_size(), (1, 20))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-4


def test_seeded_sampling_reproducible_and_batch_invariant(llama, hf_tokenizer):
    kw = dict(max_tokens=16, temperature=0.9, top_k=20, repetition_penalty=1.3)
    seeds = [11, 12, 13]
    batch = generate_batch(llama, hf_tokenizer, PROMPTS, seeds=seeds, **kw)
    assert generate_batch(llama, hf_tokenizer, PROMPTS, seeds=seeds, **kw) == batch
    for prompt, seed, text in zip(PROMPTS, seeds, batch, strict=True):
        assert generate_batch(llama, hf_tokenizer, [prompt], seed=seed, **kw) == [text]
    assert generate(llama, hf_tokenizer, PROMPTS[1], seed=12, **kw) == batch[1]


def gpt2(vocab_size: int):
    torch.manual_seed(4)
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=128, n_embd=64, n_layer=2, n_head=4,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama-dynamic-rope"])
def test_generic_cache_path_matches_hf_generate(kind, tokenizer, hf_tokenizer):
    vocab = tokenizer.get_vocab_size()
    if kind == "gpt2":
        model = gpt2(vocab)
    else:  # a rope scaling our Llama lacks: the model's own cache instead, with a warning
        model = hf_llama(vocab, seed=5, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert isinstance(wrap(model), HFCacheDecoder)
    assert [str(w.message) for w in caught if "dynamic" in str(w.message)] or kind == "gpt2"
    n = 16
    results = generate_batch(model, hf_tokenizer, PROMPTS, max_tokens=n, top_k=1,
                             return_details=True)
    tok = adapt_tokenizer(hf_tokenizer)
    for prompt, res in zip(PROMPTS, results, strict=True):
        assert res.token_ids == hf_greedy(model, tok.encode_prompt(prompt), n, tok.eos_id)


def test_adapter_ignores_other_models(tokenizer):
    assert hf_adapter(article_model(tokenizer.get_vocab_size(), seed=0)) is None
    assert hf_adapter(lambda ids: ids) is None


def test_model_without_cache_argument_is_recomputed(tokenizer):
    class Plain(transformers.PreTrainedModel):
        config_class = transformers.GPT2Config

        def __init__(self, config):
            super().__init__(config)
            self.inner = gpt2(tokenizer.get_vocab_size())

        def forward(self, input_ids):
            return self.inner(input_ids, use_cache=False)

    model = Plain(transformers.GPT2Config())
    dec = wrap(model)
    assert isinstance(dec, RecomputeDecoder)
    logits = dec.prefill([[1, 5, 6]], 1)
    with torch.no_grad():
        ref = model.inner(torch.tensor([[1, 5, 6]])).logits[:, -1]
    assert torch.equal(logits, ref)


def test_hf_tokenizer_ids_and_errors(tokenizer, hf_tokenizer):
    tok = adapt_tokenizer(hf_tokenizer)
    art = adapt_tokenizer(tokenizer)
    assert (tok.bos_id, tok.eos_id) == (art.bos_id, art.eos_id)
    # Its own encoding (this one adds no special token, and no space), unless add_bos says.
    assert tok.encode_prompt("hello world") == hf_tokenizer("hello world")["input_ids"]
    assert tok.encode_prompt("hello world") == art.encode_prompt("hello world")[2:]
    assert (adapt_tokenizer(hf_tokenizer, add_bos=True).encode_prompt(" hello world")
            == art.encode_prompt("hello world"))
    assert adapt_tokenizer(tokenizer, add_bos=False).encode_prompt("hi") == \
        art.encode_prompt("hi")[1:]
    assert tok.decode([tok.bos_id, *tok.encode_prompt(" fox"), tok.eos_id]) == " fox"
    # Without declared specials the [BOT]/[EOT] tokens still serve.
    bare = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    assert adapt_tokenizer(bare).bos_id == art.bos_id
    assert adapt_tokenizer(bare, bos_token="[PAD]", eos_token=7).bos_id == 3
    assert adapt_tokenizer(bare, eos_token=7).eos_id == 7


def test_hf_tokenizer_missing_token_names_keyword():
    from tokenizers import Tokenizer, models

    plain = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=plain, unk_token="<unk>")
    with pytest.raises(ValueError, match="eos.*eos_token="):
        adapt_tokenizer(hf)  # no bos is fine (Qwen has none); no eos is not
    with pytest.raises(ValueError, match="bos.*bos_token="):
        adapt_tokenizer(hf, eos_token="b", add_bos=True)
    assert adapt_tokenizer(hf, eos_token="b").bos_id is None
    with pytest.raises(ValueError, match="eos.*eos_token="):
        adapt_tokenizer(hf, bos_token="a")
    with pytest.raises(ValueError, match="'zz'.*bos_token="):
        adapt_tokenizer(hf, bos_token="zz", eos_token="b")
    assert adapt_tokenizer(hf, bos_token="a", eos_token="b").eos_id == 1


def test_cli_generates_from_a_transformers_checkpoint(tmp_path, tokenizer, hf_tokenizer):
    model = hf_llama(tokenizer.get_vocab_size(), seed=3)
    model.save_pretrained(tmp_path)
    hf_tokenizer.save_pretrained(tmp_path)
    want = generate(model, hf_tokenizer, "The quick", 12, seed=4)
    res = subprocess.run(
        [sys.executable, "-m", "lmgen_fast.cli", "generate", "The quick", "--model",
         str(tmp_path), "--max-tokens", "12", "--seed", "4", "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == want + "\n"
