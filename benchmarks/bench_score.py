"""Scoring speed: lm-evaluation-harness's ``loglikelihood`` through the ``lmgen-fast``
backend against the harness's own ``hf`` backend, on the same model directory and requests.

    python benchmarks/bench_score.py [--docs 32] [--choices 4] [--batch-size 16]
                                     [--repeats 5] [--device cpu] [--threads N] [--tiny]

A multiple-choice task as the harness runs it: ``--docs`` questions of 48 to 96 words, each
with ``--choices`` answers of 4 to 12 words (one request per answer, the question as context).
A random ``LlamaForCausalLM`` (hidden 256, intermediate 1024, 4 layers, 4 heads, 1 key/value
head, vocabulary 8000; ``--tiny``: hidden 32, 2 layers, vocabulary 400) and a word-level
tokenizer are saved with ``save_pretrained`` into a temporary directory that both backends
load (float32). The tokenizer adds [BOT] itself, which both backends keep (the hf backend
with ``add_bos_token=True``), so that they score the same ids.
Tokens per second count every context and continuation token of every request (what a
backend without shared-context reuse runs through the model); medians of the runs, the two
sides alternating so that load from other processes hits both alike; the best run too. The
largest difference between the two backends' log-likelihoods is reported as a check.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time

import torch
import transformers
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from tokenizers import Tokenizer, models, pre_tokenizers, processors

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from lmgen_fast.integrations.lm_eval import LmgenFastLM  # noqa: E402

from _common import device_name, sync, write_json  # noqa: E402


def save_model(directory: str, tiny: bool) -> int:
    """A random Llama and a word-level tokenizer over ``w4 ..``; returns the vocabulary."""
    vocab = 400 if tiny else 8000
    words = {"[UNK]": 0, "[BOT]": 1, "[EOT]": 2, "[PAD]": 3}
    words.update({f"w{i}": i for i in range(4, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # The tokenizer adds [BOT] itself, as Llama's does: lmgen-fast encodes with the
    # tokenizer's own special tokens, the hf backend (add_bos_token=True) too.
    tok.post_processor = processors.TemplateProcessing(single="[BOT] $A",
                                                       special_tokens=[("[BOT]", 1)])
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOT]", eos_token="[EOT]", unk_token="[UNK]",
        pad_token="[PAD]").save_pretrained(directory)
    torch.manual_seed(0)
    size = (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2) if tiny else
            dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4))
    config = transformers.LlamaConfig(
        vocab_size=vocab, num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=3, **size)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(directory)
    return vocab


def requests(docs: int, choices: int, vocab: int) -> list[Instance]:
    """The requests of a multiple-choice task: one per (question, answer)."""
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(n))

    out = []
    for d in range(docs):
        question = words(rng.randint(48, 96))
        for c in range(choices):
            out.append(Instance("loglikelihood", {}, (question, " " + words(rng.randint(4, 12))),
                                d * choices + c))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (a smoke run)")
    ap.add_argument("--json", default=None, help="where the results go (default: results/)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    directory = tempfile.mkdtemp(prefix="bench_score_")
    vocab = save_model(directory, args.tiny)
    reqs = requests(args.docs, args.choices, vocab)
    backends = {
        "lmgen-fast": LmgenFastLM(pretrained=directory, dtype="float32", device=args.device,
                                  batch_size=args.batch_size),
        "hf": HFLM(pretrained=directory, dtype="float32", device=args.device,
                   batch_size=args.batch_size, add_bos_token=True),
    }
    ids = backends["lmgen-fast"].adapter.encode_prompt
    tokens = sum(len(ids(ctx + cont)) for ctx, cont in (r.args for r in reqs))
    values = {name: lm.loglikelihood(reqs, disable_tqdm=True)  # warm-up, and the check
              for name, lm in backends.items()}
    diff = max(abs(a[0] - b[0]) for a, b in zip(values["lmgen-fast"], values["hf"],
                                               strict=True))
    rates: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(args.repeats):
        for name, lm in backends.items():
            sync(args.device)
            t0 = time.perf_counter()
            lm.loglikelihood(reqs, disable_tqdm=True)
            sync(args.device)
            rates[name].append(tokens / (time.perf_counter() - t0))
    med = {name: statistics.median(v) for name, v in rates.items()}
    best = {name: max(v) for name, v in rates.items()}
    print(f"device: {device_name(args.device)}  torch {torch.__version__}  "
          f"transformers {transformers.__version__}")
    print(f"{len(reqs)} requests ({args.docs} questions x {args.choices} answers), {tokens} "
          f"tokens, batch size {args.batch_size}; tokens/s, median (best) of {args.repeats}")
    print(f"{'hf backend':>24}{'lmgen-fast backend':>24}{'speed-up':>12}")
    print(f"{med['hf']:>15.1f} ({best['hf']:>7.1f}){med['lmgen-fast']:>15.1f} "
          f"({best['lmgen-fast']:>7.1f}){med['lmgen-fast'] / med['hf']:>11.2f}x")
    print(f"largest log-likelihood difference between the backends: {diff:.2e}")
    suffix = "" if args.device == "cpu" else "_" + args.device.split(":")[0]
    path = write_json(args.json or ("bench_score" + suffix), {
        "device": device_name(args.device), "torch": torch.__version__,
        "transformers": transformers.__version__, "requests": len(reqs), "tokens": tokens,
        "batch_size": args.batch_size, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "tiny": args.tiny, "tok_s": med,
        "best_tok_s": best, "runs": rates, "speedup": med["lmgen-fast"] / med["hf"],
        "max_abs_diff": diff,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
