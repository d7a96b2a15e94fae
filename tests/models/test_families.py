"""The Llama family (Llama 3, Qwen2, Qwen3, Mistral) on our cached model, against transformers.

Each family is a tiny random transformers model (hidden 64, 2 layers, GQA 4/2, an explicit
``head_dim`` of 32 != 64 / 4) with its own options: Llama 3's rope scaling, Qwen2's q/k/v
biases and tied embeddings, Qwen3's per-head q/k norm (with biases and YaRN), Mistral's
linear RoPE. ``wrap`` must run our Llama on the model's own tensors, and greedy decoding
must give transformers' greedy ``generate`` tokens while no transformers module runs.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import INTERPRETED

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'lmgen-fast[hf]')"
)

from lmgen_fast import SamplingParams, wrap  # noqa: E402
from lmgen_fast.engine import generate_ids  # noqa: E402
from lmgen_fast.models.decoder import CachedLlamaDecoder  # noqa: E402
from lmgen_fast.models.hf import HFCacheDecoder  # noqa: E402

V, EOS = 300, 2
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-6, initializer_range=0.1, head_dim=32, bos_token_id=1,
            eos_token_id=EOS)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 500000.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
        "rope_theta": 10000.0}
FAMILIES = {
    "llama3": ("LlamaForCausalLM", "LlamaConfig", dict(rope_parameters=LLAMA3)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(attention_bias=True, rope_parameters=YARN)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(
        sliding_window=None, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                              "rope_theta": 10000.0})),
    # Windows of 6 and 5 slots, exceeded by every prompt plus its 8 tokens; Qwen2's only on
    # its second layer (max_window_layers=1).
    "mistral-window": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=6)),
    "qwen2-window": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        use_sliding_window=True, sliding_window=5, max_window_layers=1)),
}
LENGTHS = (5, 9, 2)


def family_model(name: str, **overrides):
    """A tiny random model of the family; biases and norm weights randomised so they count."""
    cls, cfg, options = FAMILIES[name]
    kwargs = {**BASE, **options, **overrides}
    torch.manual_seed(sum(map(ord, name)))
    model = getattr(transformers, cls)(getattr(transformers, cfg)(**kwargs)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in n:
                p.normal_(1.0, 0.2)
    return model


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in LENGTHS]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation of one unpadded prompt, EOS excluded."""
    x = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=n, eos_token_id=EOS, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    return new[: new.index(EOS)] if EOS in new else new


class CountCalls:
    """Counts forward calls of every module of a model while active."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __enter__(self):
        self.hooks = [m.register_forward_hook(self._count) for m in self.model.modules()]
        return self

    def _count(self, *args) -> None:
        self.calls += 1

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()


def greedy_fused(dec: CachedLlamaDecoder, ids: list[list[int]], n: int) -> list[list[int]]:
    """Greedy decoding on the fused step itself (argmax on the host: no sampler kernels)."""
    with torch.no_grad():
        logits = dec.prefill(ids, n)
        dec.fused = True
        out = [[] for _ in ids]
        for step in range(n):
            tokens = logits.argmax(-1)
            for row, t in zip(out, tokens.tolist(), strict=True):
                row.append(t)
            if step + 1 < n:
                logits = dec.decode(tokens)
        assert dec.fused  # the fused step ran every step (a failure turns it off)
    return [row[: row.index(EOS)] if EOS in row else row for row in out]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_runs_ours_on_shared_weights_and_gives_hf_greedy_tokens(name):
    model = family_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: our Llama takes every family
        dec = wrap(model)
    assert isinstance(dec, CachedLlamaDecoder)
    theirs = {id(p) for p in model.parameters()}
    assert all(id(p) in theirs for p in dec.model.parameters())  # shared, never copied
    if name == "qwen2":
        assert dec.model.lm_head.weight is dec.model.base_model.embed_tokens.weight
    n = 8
    want = [hf_greedy(model, p, n) for p in prompts()]
    with CountCalls(model) as counter:
        got = generate_ids(dec, prompts(), [SamplingParams(temperature=0)] * len(LENGTHS),
                           [n] * len(LENGTHS), EOS, backend="reference")
    assert counter.calls == 0
    assert [tokens for tokens, *_ in got] == want
    windowed = name.endswith("-window")
    assert dec.supports_fused() == (INTERPRETED and not windowed)
    if windowed:  # the window matters: without it the tokens differ
        dec.model.base_model.windows = [None] * 2
        again = generate_ids(dec, prompts(), [SamplingParams(temperature=0)] * len(LENGTHS),
                             [n] * len(LENGTHS), EOS, backend="reference")
        assert [tokens for tokens, *_ in again] != want


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral", "llama3"])
def test_family_on_the_fused_step_gives_hf_greedy_tokens(kernel_device, name):
    model = family_model(name).to(kernel_device)
    dec = wrap(model)
    assert dec.supports_fused()
    n = 5
    want = [hf_greedy(model, p, n) for p in prompts()[:2]]
    with CountCalls(model) as counter:
        got = greedy_fused(dec, prompts()[:2], n)
    assert counter.calls == 0
    assert got == want


def test_uncovered_config_falls_back_with_a_warning_naming_the_field():
    model = family_model("mistral", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                     "rope_theta": 10000.0})
    with pytest.warns(RuntimeWarning, match="rope_type='dynamic'"):
        dec = wrap(model)
    assert isinstance(dec, HFCacheDecoder)


def test_load_model_reads_a_bf16_save_pretrained_directory_with_tokenizer(tmp_path, tokenizer):
    from lmgen_fast import generate_batch
    from lmgen_fast.api.default_model import load_model

    model = family_model("qwen3", vocab_size=tokenizer.get_vocab_size()).to(torch.bfloat16)
    model.generation_config.eos_token_id = 7
    model.save_pretrained(tmp_path)  # safetensors, bfloat16, generation_config.json
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer,
                                                  eos_token="[EOT]", unk_token="[UNK]")
    hf_tok.save_pretrained(tmp_path)
    loaded, tok = load_model(tmp_path)
    assert type(loaded) is type(model) and loaded.dtype == torch.bfloat16
    assert loaded.generation_config.eos_token_id == 7
    assert tok("a b").input_ids == hf_tok("a b").input_ids
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    dec = wrap(loaded)
    assert isinstance(dec, CachedLlamaDecoder) and dec.model.lm_head.weight.dtype == torch.bfloat16
    # Our cached bfloat16 Llama on the CPU, over the loaded tensors: the tokens of the same
    # decoder built on the in-memory model.
    got = generate_batch(loaded, tok, ["hello world"], max_tokens=6, temperature=0,
                         backend="reference")
    assert got == generate_batch(model, hf_tok, ["hello world"], max_tokens=6, temperature=0,
                                 backend="reference")


def test_from_hf_copies_a_qwen3_exactly_and_to_hf_refuses_what_llama_lacks():
    from lmgen_fast.models.hf import from_hf, to_hf

    model = family_model("qwen3")
    ours = from_hf(model)
    assert not {p.data_ptr() for p in ours.parameters()} & {
        p.data_ptr() for p in model.parameters()}
    ids = torch.tensor([prompts()[1]])
    with torch.no_grad():
        assert (ours(ids) - model(ids).logits).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="qk_norm"):
        to_hf(ours)


def test_qk_rmsnorm_kernel_matches_the_eager_norms(kernel_device):
    from lmgen_fast.models import fused_ops as fo
    from lmgen_fast.models.llama import RMSNorm

    heads, kv, d = 4, 2, 32
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(3)
        q_norm, k_norm = RMSNorm(d, 1e-6), RMSNorm(d, 1e-6)
        with torch.no_grad():
            q_norm.weight.normal_(1.0, 0.3)
            k_norm.weight.normal_(1.0, 0.3)
        q_norm, k_norm = q_norm.to(kernel_device, dtype), k_norm.to(kernel_device, dtype)
        qkv = torch.randn(3, (heads + 2 * kv) * d, device=kernel_device).to(dtype)
        with torch.no_grad():
            want = torch.cat([q_norm(qkv[:, :heads * d].view(3, heads, d)).view(3, -1),
                              k_norm(qkv[:, heads * d:(heads + kv) * d].view(3, kv, d))
                              .view(3, -1), qkv[:, (heads + kv) * d:]], dim=1)
        fo.qk_rmsnorm(qkv, q_norm.weight, k_norm.weight, 1e-6, heads, kv)
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(qkv.float(), want.float(), rtol=tol, atol=tol)
        assert torch.equal(qkv[:, (heads + kv) * d:], want[:, (heads + kv) * d:])
