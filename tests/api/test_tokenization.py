"""Prompt encoding and special tokens of transformers tokenizers (Qwen- and SmolLM2-like).

A transformers tokenizer encodes a text prompt as ``tokenizer(prompt)`` does; one without a
bos token works; a special token named by its text resolves even where its id is the
unknown token's.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'lmgen-fast[hf]')"
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402

from lmgen_fast import generate_batch  # noqa: E402
from lmgen_fast.api.tokenization import adapt_tokenizer  # noqa: E402

WORDS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "the", "capital", "of", "France",
         "is", "Paris", "a", "b"]


def word_tokenizer(bos: str | None, template: bool):
    """A word-level transformers tokenizer whose unknown token is ``<|endoftext|>`` (id 0,
    as in SmolLM2); with ``template``, its post-processor puts ``bos`` first (Llama-like)."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        raw.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<|endoftext|>", eos_token="<|im_end|>",
        **({"bos_token": bos} if bos else {}))


def test_own_encoding_no_bos_and_special_tokens_sharing_the_unknown_id():
    qwen_like = word_tokenizer(None, template=False)
    tok = adapt_tokenizer(qwen_like)
    prompt = "the capital of France is"
    assert tok.bos_id is None
    assert tok.encode_prompt(prompt) == qwen_like(prompt)["input_ids"] == [3, 4, 5, 6, 7]
    # A Llama-like tokenizer puts its bos itself; add_bos overrides either way.
    llama_like = word_tokenizer("<|im_start|>", template=True)
    assert adapt_tokenizer(llama_like).encode_prompt(prompt) == [1, 3, 4, 5, 6, 7]
    assert adapt_tokenizer(llama_like, add_bos=False).encode_prompt(prompt) == [3, 4, 5, 6, 7]
    assert adapt_tokenizer(qwen_like, bos_token="a", add_bos=True).encode_prompt("is") == [9, 7]
    assert adapt_tokenizer(llama_like, bos_token="").encode_prompt("is") == [1, 7]
    assert adapt_tokenizer(llama_like, bos_token="", add_bos=True).bos_id is None
    # <|endoftext|> is id 0, the unknown token's id: named by its text it still resolves.
    assert adapt_tokenizer(qwen_like, eos_token="<|endoftext|>").eos_id == 0
    with pytest.raises(ValueError, match="'Berlin'.*eos_token="):
        adapt_tokenizer(qwen_like, eos_token="Berlin")
    with pytest.raises(ValueError, match="add_bos"):
        adapt_tokenizer(qwen_like, add_bos="yes")


def test_a_tokenizer_without_bos_generates_from_its_own_encoding():
    qwen_like = word_tokenizer(None, template=False)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)).eval()
    prompt = "the capital of France is"
    [res] = generate_batch(model, qwen_like, [prompt], max_tokens=4, temperature=0,
                           backend="reference", return_details=True)
    ids = torch.tensor([qwen_like(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=4, eos_token_id=2, pad_token_id=0)
    new = out[0, ids.shape[1]:].tolist()
    assert res.token_ids == (new[: new.index(2)] if 2 in new else new)
