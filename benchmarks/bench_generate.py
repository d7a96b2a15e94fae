"""generate() against the article's loop on this machine (issue 2's CPU speed target).

    python benchmarks/bench_generate.py [--tokens 256] [--repeats 3]

A random model of the article's architecture (hidden 256, intermediate 1024, 4 layers,
4 heads, 1 key/value head, vocabulary 8000). Both sides sample with the article's defaults
(temperature 1, top-k 50, repetition penalty 1.2 over 10 tokens); tokens per second are
counted from the tokens each run actually produced. Medians, measured side by side.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from lmgen_fast import generate_batch  # noqa: E402
from lmgen_fast.api.baseline import article_generate_ids  # noqa: E402
from lmgen_fast.models import LlamaConfig, LlamaForPretraining  # noqa: E402

from _common import device_name, median_seconds, write_json  # noqa: E402

VOCAB = 8000


def word_tokenizer(vocab: int) -> Tokenizer:
    words = {"[UNK]": 0, "[BOT]": 1, "[EOT]": 2, "[PAD]": 3}
    words.update({f"w{i}": i for i in range(4, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-tokens", type=int, default=64,
                    help="tokens for the article loop (its per-token cost grows with length)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1)
    model = LlamaForPretraining(cfg).eval()
    tok = word_tokenizer(VOCAB)
    prompt = " ".join(f"w{i}" for i in range(10, 26))
    kw = dict(temperature=1.0, repetition_penalty=1.2, repetition_penalty_range=10, top_k=50)

    counts = {}

    def ours():
        out = generate_batch(model, tok, [prompt], args.tokens, return_details=True, **kw)
        counts["ours"] = len(out[0].token_ids)

    def naive():
        counts["naive"] = len(article_generate_ids(model, tok, prompt, args.naive_tokens, **kw))

    # The article's loop at the same length as ours, once, to report its true rate too.
    t0 = time.perf_counter()
    n_full = len(article_generate_ids(model, tok, prompt, args.tokens, **kw))
    naive_full = n_full / (time.perf_counter() - t0)
    t_ours, _ = median_seconds(ours, args.repeats)
    t_naive, _ = median_seconds(naive, args.repeats, warmup=0)
    rate_ours = counts["ours"] / t_ours
    rate_naive = counts["naive"] / t_naive
    rows = [
        ("article loop", args.naive_tokens, rate_naive),
        ("article loop", args.tokens, naive_full),
        ("lmgen-fast generate()", args.tokens, rate_ours),
    ]
    print(f"device: {device_name()}  torch {torch.__version__}")
    print(f"{'loop':<24}{'new tokens':>12}{'tok/s':>10}")
    for name, n, rate in rows:
        print(f"{name:<24}{n:>12}{rate:>10.1f}")
    print(f"speed-up at {args.tokens} tokens: {rate_ours / naive_full:.1f}x "
          f"(vs the article loop's {args.naive_tokens}-token rate: {rate_ours / rate_naive:.1f}x)")
    write_json("bench_generate", {
        "device": device_name(), "torch": torch.__version__, "config": cfg.to_dict(),
        "tokens": args.tokens, "ours_tok_s": rate_ours, "naive_tok_s_same_length": naive_full,
        "naive_tok_s_short": rate_naive, "naive_short_tokens": args.naive_tokens,
        "speedup": rate_ours / naive_full,
    })


if __name__ == "__main__":
    main()
