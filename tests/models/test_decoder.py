"""wrap(): which decoder a model gets, and that every decoder gives the model's own logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmgen_fast import wrap
from lmgen_fast.models.decoder import CachedLlamaDecoder, RecomputeDecoder

from conftest import random_model
from test_models import article_model

PROMPTS = [[1, 5, 7, 9], [1, 3, 3, 3, 3, 3, 8], [2]]


def run_decoder(decoder, steps=6, vocab=300):
    """Prefill then decode random tokens; return the logits of every step."""
    gen = torch.Generator().manual_seed(0)
    out = []
    with torch.no_grad():
        logits = decoder.prefill(PROMPTS, steps + 1)
        for _ in range(steps):
            out.append(logits)
            logits = decoder.decode(torch.randint(0, vocab, (len(PROMPTS),), generator=gen))
    out.append(logits)
    return out


def recompute_logits(model, steps=6, vocab=300):
    gen = torch.Generator().manual_seed(0)
    seqs = [list(p) for p in PROMPTS]
    out = []
    with torch.no_grad():
        for _ in range(steps + 1):
            out.append(torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs]))
            for s, t in zip(seqs, torch.randint(0, vocab, (3,), generator=gen).tolist(),
                            strict=True):
                s.append(t)
    return out


def test_our_model_is_cached_and_exact():
    model = random_model(300, seed=3)
    decoder = wrap(model)
    assert isinstance(decoder, CachedLlamaDecoder)
    for got, want in zip(run_decoder(decoder), recompute_logits(model), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_article_like_module_runs_cached_on_its_own_weights():
    model = article_model(seed=4)
    decoder = wrap(model)
    assert isinstance(decoder, CachedLlamaDecoder)
    shared = decoder.model.base_model.layers[0].self_attn.q_proj.weight
    assert shared.data_ptr() == model.base_model.layers[0].self_attn.q_proj.weight.data_ptr()
    for got, want in zip(run_decoder(decoder), recompute_logits(model), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_plain_callable_falls_back_to_recompute():
    model = random_model(300, seed=5)
    decoder = wrap(lambda ids: model(ids))
    assert isinstance(decoder, RecomputeDecoder)
    for got, want in zip(run_decoder(decoder), recompute_logits(model), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_module_with_biases_is_not_mistaken_for_the_article():
    model = article_model(seed=6)
    layer = model.base_model.layers[0].self_attn
    layer.q_proj = nn.Linear(layer.q_proj.in_features, layer.q_proj.out_features, bias=True)
    assert isinstance(wrap(model), RecomputeDecoder)


def test_not_callable_is_an_error():
    with pytest.raises(ValueError, match="model must be callable"):
        wrap(42)


def test_prompt_plus_max_tokens_beyond_positions_is_an_error():
    model = random_model(300, seed=0, max_position_embeddings=16)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        wrap(model).prefill([[1] * 10], 8)
