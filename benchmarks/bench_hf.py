"""generate_batch() on a transformers LlamaForCausalLM against its own model.generate().

    python benchmarks/bench_hf.py [--tokens 128] [--repeats 7] [--batches 1 8] [--device cpu]
                                  [--threads N]

A random LlamaForCausalLM (hidden 256, intermediate 1024, 4 layers, 4 heads, 1 key/value
head, vocabulary 8000) and a word-level transformers tokenizer, both built locally. Both sides
sample with the same settings and the same distribution: temperature 0.8, top-k 50,
repetition penalty 1.1 applied once per distinct token of prompt and output (transformers'
rule, which is lmgen-fast's ``penalty_scope="all", penalty_mode="once"``, range 0 = all).
Prompts in a batch have different lengths (transformers gets them left padded). Tokens per
second count the tokens each run actually produced (EOT stops a row); medians of the runs,
the two sides alternating so that load from other processes hits both alike; the best run
is reported too (closest to an idle machine). On a shared
CPU, ``--threads 1`` keeps the two torch threads from waiting on each other behind other jobs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from lmgen_fast import generate_batch  # noqa: E402
from lmgen_fast.api.tokenization import adapt_tokenizer  # noqa: E402
from lmgen_fast.models.hf import left_pad  # noqa: E402

from _common import device_name, sync, write_json  # noqa: E402

VOCAB = 8000
EOT, PAD = 2, 3
SAMPLING = dict(temperature=0.8, top_k=50, repetition_penalty=1.1)


def word_tokenizer(vocab: int) -> transformers.PreTrainedTokenizerFast:
    """A transformers tokenizer over the words ``w4 .. w{vocab-1}`` and the article's specials."""
    words = {"[UNK]": 0, "[BOT]": 1, "[EOT]": EOT, "[PAD]": PAD}
    words.update({f"w{i}": i for i in range(4, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOT]", eos_token="[EOT]", unk_token="[UNK]",
        pad_token="[PAD]",
    )


def build_model(device: str) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=2048,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=EOT, pad_token_id=PAD,
    )
    return transformers.LlamaForCausalLM(config).to(device).eval()


def produced(rows: torch.Tensor) -> int:
    """New tokens up to (not counting) each row's first EOT."""
    total = 0
    for row in rows.tolist():
        total += row.index(EOT) if EOT in row else len(row)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.device)
    tok = word_tokenizer(VOCAB)
    adapter = adapt_tokenizer(tok)
    texts = [" ".join(f"w{10 + 7 * r + i}" for i in range(12 + 2 * r)) for r in range(8)]
    results = []
    for batch in args.batches:
        prompts = texts[:batch]
        ids, mask = (t.to(args.device)
                     for t in left_pad([adapter.encode_prompt(p) for p in prompts], PAD))

        def ours(prompts=prompts):
            out = generate_batch(
                model, tok, prompts, args.tokens, penalty_scope="all", penalty_mode="once",
                repetition_penalty_range=0, return_details=True, **SAMPLING,
            )
            sync(args.device)
            return sum(len(g.token_ids) for g in out)

        def theirs(ids=ids, mask=mask):
            with torch.inference_mode():
                out = model.generate(
                    ids, attention_mask=mask, do_sample=True, max_new_tokens=args.tokens,
                    eos_token_id=EOT, pad_token_id=PAD, **SAMPLING,
                )
            sync(args.device)
            return produced(out[:, ids.shape[1]:])

        rates: dict[str, list[float]] = {"lmgen-fast": [], "transformers": []}
        ours(), theirs()  # warm-up
        for rep in range(args.repeats):
            for name, fn in (("lmgen-fast", ours), ("transformers", theirs)):
                torch.manual_seed(rep)
                t0 = time.perf_counter()
                n = fn()
                rates[name].append(n / (time.perf_counter() - t0))
        row = {name: statistics.median(v) for name, v in rates.items()}
        best = {name: max(v) for name, v in rates.items()}
        results.append({"batch": batch, "tok_s": row, "best_tok_s": best, "runs": rates,
                        "speedup": row["lmgen-fast"] / row["transformers"],
                        "speedup_best": best["lmgen-fast"] / best["transformers"]})

    print(f"device: {device_name(args.device)}  torch {torch.__version__}  "
          f"transformers {transformers.__version__}")
    print("tok/s, median (best) of the runs")
    print(f"{'B':>3}{'transformers':>22}{'lmgen-fast':>22}{'speed-up':>16}")
    for r in results:
        med, best = r["tok_s"], r["best_tok_s"]
        print(f"{r['batch']:>3}"
              f"{med['transformers']:>13.1f} ({best['transformers']:>6.1f})"
              f"{med['lmgen-fast']:>13.1f} ({best['lmgen-fast']:>6.1f})"
              f"{r['speedup']:>9.1f}x ({r['speedup_best']:.1f}x)")
    suffix = "" if args.device == "cpu" else "_" + args.device.split(":")[0]
    path = write_json("bench_hf" + suffix, {
        "device": device_name(args.device), "torch": torch.__version__,
        "transformers": transformers.__version__, "tokens": args.tokens,
        "repeats": args.repeats, "threads": torch.get_num_threads(), "sampling": SAMPLING,
        "config": model.config.to_dict(),
        "results": results,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
