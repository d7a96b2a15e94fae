"""The article's generate() loop, kept as the baseline that benchmarks measure against.

Every step re-runs the whole sequence through the model and samples on the host: temperature,
a Python loop applying the repetition penalty, a top-k mask, softmax, ``torch.multinomial``.
It is what lmgen-fast replaces; nothing in the fast path calls it.
"""

from __future__ import annotations

import torch


def article_sample_row(
    logits: torch.Tensor,
    history: list[int],
    temperature: float,
    repetition_penalty: float,
    repetition_penalty_range: int,
    top_k: int,
) -> int:
    """The article's per-row sampling steps on a float32 ``[V]`` row (not modified)."""
    z = logits / temperature
    if repetition_penalty != 1.0 and history:
        for tok in history[-repetition_penalty_range:]:
            if z[tok] > 0:
                z[tok] /= repetition_penalty
            else:
                z[tok] *= repetition_penalty
    if top_k > 0:
        kth = torch.topk(z, top_k)[0][-1]
        z[z < kth] = float("-inf")
    return int(torch.multinomial(torch.softmax(z, dim=-1), num_samples=1))


@torch.no_grad()
def article_loop(
    model,
    input_ids: torch.Tensor,
    max_tokens: int,
    temperature: float,
    repetition_penalty: float,
    repetition_penalty_range: int,
    top_k: int,
    eot: int,
) -> list[int]:
    """The article's loop on int64 ``input_ids`` ``[1, T]``: the whole sequence through the
    model at every step, then :func:`article_sample_row`; stops at ``eot`` (not returned)."""
    generated: list[int] = []
    for _ in range(max_tokens):
        logits = model(input_ids)
        logits = getattr(logits, "logits", logits)[0, -1, :].float()
        nxt = article_sample_row(logits, generated, temperature, repetition_penalty,
                                 repetition_penalty_range, top_k)
        if nxt == eot:
            break
        input_ids = torch.cat([input_ids, torch.tensor([[nxt]], device=input_ids.device)], 1)
        generated.append(nxt)
    return generated


def article_generate_ids(
    model,
    tokenizer,
    prompt: str,
    max_tokens: int = 100,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    repetition_penalty_range: int = 10,
    top_k: int = 50,
    device=None,
    eos_token: str = "[EOT]",
) -> list[int]:
    """The article's ``generate()`` up to decoding: returns the new token ids.

    ``eos_token`` exists for benchmarks: a token that is never drawn makes a run last
    exactly ``max_tokens`` steps.
    """
    if hasattr(model, "eval"):
        model.eval()
    bot, eot = tokenizer.token_to_id("[BOT]"), tokenizer.token_to_id(eos_token)
    input_ids = torch.tensor([[bot, *tokenizer.encode(" " + prompt).ids]], device=device)
    return article_loop(model, input_ids, max_tokens, temperature, repetition_penalty,
                        repetition_penalty_range, top_k, eot)


def article_generate(model, tokenizer, prompt: str, *args, **kwargs) -> str:
    """The article's ``generate()``: the decoded text of :func:`article_generate_ids`."""
    return tokenizer.decode(article_generate_ids(model, tokenizer, prompt, *args, **kwargs))
