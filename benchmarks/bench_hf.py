"""generate_batch() on transformers Llama-family models against their own model.generate().

    python benchmarks/bench_hf.py [--families llama3 qwen2 qwen3 mistral] [--tokens 32]
                                  [--repeats 5] [--batches 1 8] [--device cpu] [--threads 1]

One random model per family, the small configuration of the issue that asked for them
(hidden 128, intermediate 512, 2 layers, 4 heads, 2 key/value heads, vocabulary 8000) with
each family's own options: Llama 3's rope scaling, Qwen2's q/k/v biases and tied embeddings,
Qwen3's per-head q/k norm (head_dim 64, not 128 / 4), Mistral's plain Llama layout. A
word-level transformers tokenizer built locally. Both sides decode greedily (temperature 0,
``do_sample=False``); prompts in a batch have different lengths (transformers gets them left
padded). Tokens per second count the tokens each run produced (EOT stops a row); medians of
the runs, the two sides alternating so that load from other processes hits both alike; the
best run is reported too. ``--threads 1`` (the default) is the comparison's setting: one
torch thread, so neither side waits on a second one behind other jobs. Each row also says
whether the two sides' tokens are equal and how many times transformers' own modules ran
during lmgen-fast's call (0 on its own cached Llama).
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
from lmgen_fast import generate_batch, wrap  # noqa: E402
from lmgen_fast.api.tokenization import adapt_tokenizer  # noqa: E402
from lmgen_fast.models.hf import left_pad  # noqa: E402

from _common import device_name, sync, write_json  # noqa: E402

VOCAB = 8000
EOT, PAD = 2, 3
SMALL = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=EOT, pad_token_id=PAD)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
          "rope_theta": 500000.0}
FAMILIES = {
    "llama3": ("LlamaForCausalLM", "LlamaConfig", dict(rope_parameters=LLAMA3)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=64)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=None)),
}


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


def build_model(family: str, device: str):
    """The family's random model; biases (zero at init) drawn so that they count."""
    cls, cfg, options = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, cfg)(**SMALL, **options)
    model = getattr(transformers, cls)(config).to(device).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.02)
    return model


def produced(rows: torch.Tensor) -> int:
    """New tokens up to (not counting) each row's first EOT."""
    total = 0
    for row in rows.tolist():
        total += row.index(EOT) if EOT in row else len(row)
    return total


def count_calls(model, fn) -> tuple[object, int]:
    """``fn()`` and how many forward calls transformers' modules of ``model`` made in it."""
    calls = [0]
    hooks = [m.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
             for m in model.modules()]
    try:
        return fn(), calls[0]
    finally:
        for h in hooks:
            h.remove()


def bench_family(family: str, args, texts: list[str], tok) -> list[dict]:
    """Rows of the table for one family: one per batch size."""
    model = build_model(family, args.device)
    adapter = adapt_tokenizer(tok)
    path = type(wrap(model)).__name__
    rows = []
    for batch in args.batches:
        prompts = texts[:batch]
        ids, mask = (t.to(args.device)
                     for t in left_pad([adapter.encode_prompt(p) for p in prompts], PAD))

        def ours(prompts=prompts, details=False):
            # Timed runs count tokens through the callback: details would add the
            # log-probabilities, which transformers' side does not compute.
            count = [0]
            out = generate_batch(model, tok, prompts, args.tokens, temperature=0,
                                 return_details=details,
                                 callback=lambda row, token: count.__setitem__(0, count[0] + 1))
            sync(args.device)
            return out if details else count[0]

        def theirs(ids=ids, mask=mask):
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, do_sample=False,
                                     max_new_tokens=args.tokens, eos_token_id=EOT,
                                     pad_token_id=PAD)
            sync(args.device)
            return out[:, ids.shape[1]:]

        mine, hf_calls = count_calls(model, lambda: ours(details=True))  # also the warm-up
        want = theirs()
        equal = [g.token_ids for g in mine] == [
            r[: r.index(EOT)] if EOT in r else r for r in want.tolist()]
        rates: dict[str, list[float]] = {"lmgen-fast": [], "transformers": []}
        for _ in range(args.repeats):
            for name, fn, count in (
                    ("lmgen-fast", ours, int),
                    ("transformers", theirs, produced)):
                t0 = time.perf_counter()
                n = count(fn())
                rates[name].append(n / (time.perf_counter() - t0))
        med = {name: statistics.median(v) for name, v in rates.items()}
        best = {name: max(v) for name, v in rates.items()}
        rows.append({"family": family, "class": type(model).__name__, "path": path,
                     "batch": batch, "tok_s": med, "best_tok_s": best, "runs": rates,
                     "speedup": med["lmgen-fast"] / med["transformers"],
                     "speedup_best": best["lmgen-fast"] / best["transformers"],
                     "tokens_equal": equal, "hf_module_calls": hf_calls})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--json", default=None, help="where the results go (default: results/)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = word_tokenizer(VOCAB)
    texts = [" ".join(f"w{10 + 7 * r + i}" for i in range(12 + 2 * r)) for r in range(8)]
    results = [row for family in args.families for row in bench_family(family, args, texts, tok)]
    print(f"device: {device_name(args.device)}  torch {torch.__version__}  "
          f"transformers {transformers.__version__}  threads {torch.get_num_threads()}")
    print(f"greedy, {args.tokens} new tokens; tok/s, median (best) of {args.repeats} runs")
    print(f"{'family':<9}{'B':>3}{'transformers':>22}{'lmgen-fast':>22}{'speed-up':>16}"
          f"{'equal':>7}{'hf calls':>10}")
    for r in results:
        med, best = r["tok_s"], r["best_tok_s"]
        print(f"{r['family']:<9}{r['batch']:>3}"
              f"{med['transformers']:>13.1f} ({best['transformers']:>6.1f})"
              f"{med['lmgen-fast']:>13.1f} ({best['lmgen-fast']:>6.1f})"
              f"{r['speedup']:>9.2f}x ({r['speedup_best']:.2f}x)"
              f"{str(r['tokens_equal']):>7}{r['hf_module_calls']:>10}")
    suffix = "" if args.device == "cpu" else "_" + args.device.split(":")[0]
    path = write_json(args.json or ("bench_hf" + suffix), {
        "device": device_name(args.device), "torch": torch.__version__,
        "transformers": transformers.__version__, "tokens": args.tokens,
        "repeats": args.repeats, "threads": torch.get_num_threads(), "config": SMALL,
        "families": {f: FAMILIES[f][2] for f in args.families}, "results": results,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
