"""The article's model: state-dict compatibility, an independent forward, the KV cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmgen_fast.models import LlamaConfig, LlamaForPretraining

from conftest import random_model, small_config

# ---- an article-style model, written independently (explicit loops, no SDPA) -------------


class ArticleRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps)


class ArticleRotary(nn.Module):
    def __init__(self, dim, max_pos):
        super().__init__()
        freqs = [1.0 / 10000 ** (2 * i / dim) for i in range(dim // 2)]
        ang = torch.tensor([[p * f for f in freqs] for p in range(max_pos)], dtype=torch.float64)
        ang = torch.cat([ang, ang], dim=-1)
        self.register_buffer("cos", ang.cos().float())
        self.register_buffer("sin", ang.sin().float())


class ArticleAttention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        d = self.head_dim

        def rope(v):
            v1, v2 = v[..., : d // 2], v[..., d // 2 :]
            return v * cos + torch.cat([-v2, v1], -1) * sin

        q = rope(self.q_proj(x).view(b, t, -1, d).transpose(1, 2))
        k = rope(self.k_proj(x).view(b, t, -1, d).transpose(1, 2))
        v = self.v_proj(x).view(b, t, -1, d).transpose(1, 2)
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = q @ k.transpose(-1, -2) / d**0.5
        scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
        out = scores.softmax(-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class ArticleMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ArticleLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn = ArticleAttention(c)
        self.mlp = ArticleMLP(c)
        self.input_layernorm = ArticleRMSNorm(c.hidden_size)
        self.post_attention_layernorm = ArticleRMSNorm(c.hidden_size)


class ArticleBase(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([ArticleLayer(c) for _ in range(c.num_hidden_layers)])
        self.norm = ArticleRMSNorm(c.hidden_size)
        self.rotary_emb = ArticleRotary(c.hidden_size // c.num_attention_heads,
                                        c.max_position_embeddings)


class ArticleModel(nn.Module):
    """Same parameter names as the article's LlamaForPretraining; its own math."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.config = c
        self.base_model = ArticleBase(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, input_ids, attn_mask=None):
        t = input_ids.shape[1]
        cos, sin = self.base_model.rotary_emb.cos[:t], self.base_model.rotary_emb.sin[:t]
        x = self.base_model.embed_tokens(input_ids)
        for layer in self.base_model.layers:
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.base_model.norm(x))


def article_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return ArticleModel(small_config(300, **overrides)).eval()


# ---- tests ---------------------------------------------------------------------------------


def test_parameter_names_are_the_articles():
    names = set(LlamaForPretraining(small_config(100)).state_dict())
    assert "base_model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert "base_model.layers.1.self_attn.k_proj.weight" in names
    assert "base_model.layers.0.post_attention_layernorm.weight" in names
    assert not any("rotary" in n for n in names)


def test_loads_article_state_dict_strictly_and_matches_its_forward():
    ref = article_model(num_hidden_layers=3)
    sd = ref.state_dict()
    assert "base_model.rotary_emb.cos" in sd  # the article saves its tables
    ours = LlamaForPretraining(ref.config).eval()
    ours.load_state_dict(sd, strict=True)
    ids = torch.randint(0, 300, (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids), atol=1e-4, rtol=0)
    # and a state dict without the tables loads too
    LlamaForPretraining(ref.config).load_state_dict(
        {k: v for k, v in sd.items() if "rotary" not in k}, strict=True
    )


def test_strict_load_still_rejects_wrong_keys():
    sd = LlamaForPretraining(small_config(100)).state_dict()
    sd["base_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="extra"):
        LlamaForPretraining(small_config(100)).load_state_dict(sd, strict=True)


def test_cached_prefill_and_decode_equal_full_recompute():
    model = random_model(300, seed=1)
    prompts = [[1, 5, 7, 9, 11, 2], [1, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    seqs = [list(p) for p in prompts]
    cache = model.new_cache(3, 40)
    longest = max(map(len, prompts))
    ids = torch.zeros(3, longest, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    positions = torch.arange(longest).expand(3, longest)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hidden = model.forward_cached(ids, positions, cache, kv_len=longest)
        pos = torch.tensor([len(p) for p in prompts])
        logits = model.lm_head(hidden[torch.arange(3), pos - 1])
        kv_len = longest
        for _ in range(12):
            for i, s in enumerate(seqs):
                full = model(torch.tensor([s]))[0, -1]
                torch.testing.assert_close(logits[i], full, atol=1e-4, rtol=0)
            new = torch.randint(0, 300, (3,), generator=gen)
            for i in range(3):
                seqs[i].append(int(new[i]))
            kv_len += 1
            hidden = model.forward_cached(new.view(3, 1), pos.view(3, 1), cache, kv_len=kv_len)
            logits = model.lm_head(hidden[:, 0])
            pos = pos + 1


def test_padding_mask_gives_each_row_its_own_logits():
    model = random_model(300, seed=2)
    a, b = [1, 4, 9, 16, 25], [1, 8]
    ids = torch.tensor([a, b + [0, 0, 0]])
    mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])
    with torch.no_grad():
        both = model(ids, mask)
        torch.testing.assert_close(both[1, :2], model(torch.tensor([b]))[0], atol=1e-5, rtol=0)
        assert torch.isfinite(both).all()


def test_positions_beyond_the_table_raise():
    model = random_model(50, seed=0, max_position_embeddings=8)
    with pytest.raises(ValueError, match="max_position_embeddings 8"):
        model(torch.zeros(1, 9, dtype=torch.int64))


@pytest.mark.parametrize(
    "field, value", [("hidden_size", 0), ("num_attention_heads", -1), ("intermediate_size", 2.5)]
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        small_config(100, **{field: value})


def test_config_rejects_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        small_config(100, num_attention_heads=4, num_key_value_heads=3)


def test_config_round_trip_and_defaults():
    c = LlamaConfig()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_key_value_heads) == (
        50000, 768, 12, 3
    )
    assert LlamaConfig.from_dict({**c.to_dict(), "unknown_key": 1}) == c


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_per_position_is_what_the_cache_holds(dtype):
    model = random_model(50, seed=0).to(dtype)
    cache = model.new_cache(3, 7)
    held = sum(t.numel() * t.element_size() for t in (*cache.k, *cache.v))
    assert model.kv_bytes_per_position() * 3 * 7 == held
