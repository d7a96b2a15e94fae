"""Speculative decoding against plain decoding on the CPU: target forwards and tokens/s.

    python benchmarks/bench_speculative.py [--tokens 128] [--batch 1] [--repeats 3] [-k 4]

The target is the embedded model (``lmgen_fast.load_default()``). Two tasks:

* copy: prompts whose greedy continuation repeats them: each is a short prompt followed by
  the model's own greedy continuation of 64 tokens (the small model loops, so what comes
  next is mostly in the prompt already); greedy. Prompts whose continuation stopped early
  are left out.
* ordinary: the short prompts alone, temperature 0.8, top-k 40, seeded.

Two drafters: "ngram" (prompt lookup) and a small draft model: the embedded model cut to
its first layer (embedding, layer 0, final norm and output layer: the same tokenizer, a
quarter of the layers). For each (task, drafter): target forwards per generated token (per
row: the prefill and every round the row takes part in; plain decoding needs one per
sampled token), drafted tokens accepted, tokens/s (medians of ``--repeats`` runs, plain and
speculative timed side by side in one run), and how many rows gave plain decoding's tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import lmgen_fast  # noqa: E402
from lmgen_fast.api.tokenization import adapt_tokenizer  # noqa: E402
from lmgen_fast.core.params import SamplingParams  # noqa: E402
from lmgen_fast.engine import generate_ids  # noqa: E402
from lmgen_fast.models import LlamaForPretraining  # noqa: E402
from lmgen_fast.models.decoder import decoder_for  # noqa: E402
from lmgen_fast.speculative.drafters import ModelDrafter  # noqa: E402
from lmgen_fast.speculative.rounds import generate_ids as speculative_ids  # noqa: E402

from _common import median_seconds, run_info, write_json  # noqa: E402

ORDINARY = ["The list type", "A dictionary maps keys", "The for statement", "import os",
            "def main():", "Exceptions are raised", "class Point:", "The module search path"]


def first_layers(model: LlamaForPretraining, layers: int) -> LlamaForPretraining:
    """A copy of ``model`` cut to its first ``layers`` layers."""
    small = LlamaForPretraining(dataclasses.replace(model.config, num_hidden_layers=layers))
    keep = {name: value for name, value in model.state_dict().items()
            if not name.startswith("base_model.layers.") or int(name.split(".")[2]) < layers}
    small.load_state_dict(keep)
    return small.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1,
                    help="rows per call; every prompt of a task is generated, in calls of "
                         "this many rows (default: 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("-k", type=int, default=4, help="num_speculative_tokens (default: 4)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default: 1; a tiny model decodes fastest on one)")
    ap.add_argument("--out", default="bench_speculative")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = lmgen_fast.load_default()
    tok = adapt_tokenizer(tokenizer)
    decoder = decoder_for(model)
    draft = ModelDrafter(first_layers(model, 1))

    greedy = SamplingParams(temperature=0.0)
    starts = [tok.encode_prompt(t) for t in ORDINARY]
    lead = generate_ids(decoder, starts, [greedy] * len(starts), [64] * len(starts), tok.eos_id)
    copy_ids = [s + o for s, (o, reason) in zip(starts, lead, strict=True) if reason == "length"]
    tasks = {
        "copy": (copy_ids, lambda i: greedy),
        "ordinary": (starts, lambda i: SamplingParams(temperature=0.8, top_k=40, seed=i)),
    }
    results = []
    print(f"{'task':<10}{'drafter':<14}{'fwd/token':>10}{'accepted':>10}{'plain tok/s':>13}"
          f"{'spec tok/s':>12}{'ratio':>7}{'same rows':>11}")
    for task, (prompts, params) in tasks.items():
        rows = [params(i) for i in range(len(prompts))]
        # Calls of --batch rows each, one after the other, over every prompt of the task.
        calls = [(prompts[i: i + args.batch], rows[i: i + args.batch],
                  [args.tokens] * len(prompts[i: i + args.batch]))
                 for i in range(0, len(prompts), args.batch)]
        got = {}

        def plain(calls=calls, got=got):
            got["plain"] = [pair for c in calls for pair in generate_ids(decoder, *c, tok.eos_id)]

        t_plain, _ = median_seconds(plain, args.repeats)
        plain_tokens = sum(len(o) for o, _ in got["plain"])
        for name, drafter in (("ngram", "ngram"), ("1-layer model", draft)):

            def spec(calls=calls, got=got, drafter=drafter):
                parts = [speculative_ids(decoder, *c, tok.eos_id, speculative=drafter,
                                         num_speculative_tokens=args.k) for c in calls]
                got["spec"] = ([p for part in parts for p in part[0]],
                               [s for part in parts for s in part[2]])

            t_spec, _ = median_seconds(spec, args.repeats)
            pairs, stats = got["spec"]
            tokens = sum(len(o) for o, _ in pairs)
            forwards = sum(s.target_forwards for s in stats)
            accepted = sum(s.accepted_drafts for s in stats)
            proposed = sum(s.proposed_drafts for s in stats)
            same = sum(a == b for a, b in zip(got["plain"], pairs, strict=True))
            row = {
                "task": task, "drafter": name, "k": args.k, "batch": args.batch,
                "rows": len(prompts), "tokens": tokens, "target_forwards": forwards,
                "forwards_per_token": forwards / tokens, "accepted_drafts": accepted,
                "proposed_drafts": proposed, "plain_tok_s": plain_tokens / t_plain,
                "spec_tok_s": tokens / t_spec,
                "speedup": (tokens / t_spec) / (plain_tokens / t_plain), "same_rows": same,
            }
            results.append(row)
            print(f"{task:<10}{name:<14}{row['forwards_per_token']:>10.2f}"
                  f"{accepted:>5}/{proposed:<4}{row['plain_tok_s']:>13.1f}"
                  f"{row['spec_tok_s']:>12.1f}{row['speedup']:>6.2f}x{same:>7}/{len(prompts)}")
            write_json(args.out, {"kind": "bench_speculative", **run_info("cpu"),
                                  "tokens": args.tokens, "k": args.k, "results": results})


if __name__ == "__main__":
    main()
