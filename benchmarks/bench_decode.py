"""End-to-end decode throughput of the engine (issue 5), against what researchers run today.

    python benchmarks/bench_decode.py [--device cuda] [--batches 1 16 64 256] [--tokens 256]
                                      [--budget-s 150] [--no-hf] [--no-compile] [--tiny]

Model: the article's default configuration (hidden 768, 12 layers, 12 heads, 3 key/value
heads, vocabulary 50000) with random weights, in bfloat16 on CUDA (float32 on the CPU;
``--tiny`` shrinks it for a smoke run). Prompts: random ids, 8 to 40 tokens, different per
row. Every side samples with temperature 0.8, top-k 50 and repetition penalty 1.1 applied
once per distinct token of prompt and output (transformers' rule; lmgen-fast's
``penalty_scope="all", penalty_mode="once"``, range 0), and no EOT, so that every row makes
exactly ``--tokens`` tokens.

Per batch size B, tokens/s (B x tokens over the wall time of one whole call, prefill
included, median of the repeats, after a warm-up call that also captures the graphs) of:

* lmgen-fast: ``generate_ids`` with CUDA graphs (the fused Triton decode step), the same
  with the eager model step (``allow_fused = False``, the same Triton sampler and graphs:
  the fused step's before and after, side by side), and the fused step without graphs;
* transformers ``LlamaForCausalLM.generate`` on a copy of the same weights (dynamic cache),
  and with ``cache_implementation="static"`` plus ``torch.compile`` where that works on the
  installed version and the time budget allows (B = 1 first);
* the naive article loop (B = 1 only, ``--naive-tokens`` tokens, full recompute each step,
  per-token rate as measured: it only gets slower with length, so this flatters it).

Also per B: the decode step time ((t(tokens) - t(1)) / (tokens - 1)), the sampler's share
of it (the engine's sampler launches replayed from a CUDA graph on the run's own state),
and the step time over the memory roofline: weights read per step (all but the embedding)
plus the KV cache of every row's positions so far, over the copy bandwidth measured here.
Then one decode step without graphs at B = 1 and 64 under the profiler: kernels per step
and the busiest ones (what to fuse next). Prints the tables (last) and writes JSON
under ``benchmarks/results/``, rewritten after every batch size so that a run cut short by a
timeout keeps what it measured (``complete`` is false until the end).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from lmgen_fast import SamplingParams  # noqa: E402
from lmgen_fast.api.baseline import article_loop  # noqa: E402
from lmgen_fast.engine import generate_ids  # noqa: E402
from lmgen_fast.models import LlamaConfig, LlamaForPretraining  # noqa: E402
from lmgen_fast.models.decoder import decoder_for  # noqa: E402
from lmgen_fast.sampling import kernel_launch  # noqa: E402

from _common import (  # noqa: E402
    copy_bandwidth_gbs,
    cuda_median_us,
    device_name,
    median_seconds,
    run_info,
    sync,
    write_json,
)

TEMPERATURE, TOP_K, PENALTY = 0.8, 50, 1.1
ROW = SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, repetition_penalty=PENALTY,
                     repetition_penalty_range=0, penalty_scope="all", penalty_mode="once")
NO_EOT = -1  # an id no token has: every row runs to its length


def build(device: str, tiny: bool) -> LlamaForPretraining:
    config = LlamaConfig() if not tiny else LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForPretraining(config)
    with torch.no_grad():  # default init gives near-uniform logits; sharpen them a little
        model.lm_head.weight.mul_(4.0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return model.to(device, dtype).eval()


def make_prompts(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 41, (batch,), generator=gen).tolist()
    return [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in lengths]


def sampler_us(model: LlamaForPretraining) -> float:
    """The engine's sampling (set-up, chunk and merge kernels) on the last run's state, from
    a graph."""
    state = decoder_for(model).engine_state
    lay = state.layout
    logits = torch.randn(lay.batch, model.config.vocab_size, device=lay.device,
                         dtype=model.lm_head.weight.dtype)

    def sample() -> None:  # reads the state, writes only its own outputs
        window = kernel_launch.HistoryWindow(state.hist, state.hlen, state.ranges,
                                             lay.width) if lay.width else None
        kernel_launch.launch(logits, state.packed, window, state.step,
                             max_top_k=lay.max_top_k, draw_seeds=False,
                             nucleus_candidates=lay.nucleus, pow_table=state.pow)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sample()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sample()
    return cuda_median_us(lambda i: graph.replay(), 1, 50)


def roofline_s(model: LlamaForPretraining, prompts: list[list[int]], tokens: int,
               bandwidth_gbs: float) -> float:
    """Seconds per decode step if only the bytes that must be read were read, at copy speed."""
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if "embed_tokens" not in n)
    per_position = model.kv_bytes_per_position()
    mean_positions = sum(len(p) for p in prompts) + len(prompts) * (tokens - 1) / 2
    return (weights + per_position * mean_positions) / (bandwidth_gbs * 1e9)


def naive_tokens_per_s(model, prompt: list[int], tokens: int, device: str) -> float:
    """The article's loop: whole sequence each step, sampling on the host."""
    ids = torch.tensor([prompt], device=device)

    def run() -> None:
        article_loop(model, ids, tokens, TEMPERATURE, PENALTY, 10, TOP_K, eot=NO_EOT)

    return tokens / median_seconds(run, 2, device=device)[0]


def hf_runner(model, prompts, tokens: int, device: str, static: bool):
    """A closure running transformers' generate on ``model`` (a LlamaForCausalLM)."""
    from lmgen_fast.models.hf import left_pad  # transformers is optional

    ids, mask = (t.to(device) for t in left_pad(prompts))
    extra = {"cache_implementation": "static"} if static else {}

    def run() -> None:
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=tokens,
                           temperature=TEMPERATURE, top_k=TOP_K, repetition_penalty=PENALTY,
                           pad_token_id=0, **extra)

    return run


def _self_us(event, cuda: bool) -> float:
    if not cuda:
        return event.self_cpu_time_total
    return getattr(event, "self_device_time_total", None) or event.self_cuda_time_total


def step_profile(model, batch: int, device: str, steps: int = 8, top: int = 12) -> dict:
    """What one eager decode step runs: kernels per step (aten ops on the CPU) and the
    busiest ones, as the difference of a call of ``steps + 1`` tokens and one of 1 token,
    under the profiler (a graph replays the same kernels without the launch gaps)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    prompts = make_prompts(batch, model.config.vocab_size, seed=batch)
    rows = [replace(ROW, seed=i) for i in range(batch)]

    def totals(n: int) -> dict[str, tuple[int, float]]:
        generate_ids(decoder_for(model), prompts, rows, [n] * batch, NO_EOT, cuda_graph=False)
        sync(device)
        activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
        with profile(activities=[activity]) as prof:
            generate_ids(decoder_for(model), prompts, rows, [n] * batch, NO_EOT,
                         cuda_graph=False)
            sync(device)
        return {e.key: (e.count, _self_us(e, cuda)) for e in prof.key_averages()
                if _self_us(e, cuda) > 0}

    long, short = totals(steps + 1), totals(1)
    per_step = {}
    for name, (count, us) in long.items():
        c0, u0 = short.get(name, (0, 0.0))
        if count > c0:
            per_step[name] = ((count - c0) / steps, (us - u0) / steps)
    busiest = sorted(per_step.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "kernels_per_step": sum(c for c, _ in per_step.values()),
        "us_per_step": sum(u for _, u in per_step.values()),
        "top": [{"name": n[:80], "per_step": c, "us": u} for n, (c, u) in busiest],
    }


def make_payload(info: dict, model: LlamaForPretraining, *, tokens: int, naive_tokens: int,
                 repeats: int, bandwidth: float | None, batches: list[int], complete: bool,
                 results: list[dict], notes: list[str], profiles: dict) -> dict:
    """The JSON document (rewritten after every batch size): ``info`` from
    ``_common.run_info``, the model's dtype and configuration, the settings, and per batch
    size its row (``speedup`` recomputed here: rows gain columns after they are first
    written)."""
    for r in results:
        base = r["tok_s"]["lmgen-fast"]
        r["speedup"] = {k: base / v for k, v in r["tok_s"].items() if k != "lmgen-fast"}
    return {
        "kind": "bench_decode", **info, "dtype": str(model.lm_head.weight.dtype),
        "tokens": tokens, "naive_tokens": naive_tokens, "repeats": repeats,
        "copy_bandwidth_gbs": bandwidth, "config": model.config.to_dict(),
        "sampling": {"temperature": TEMPERATURE, "top_k": TOP_K,
                     "repetition_penalty": PENALTY, "scope": "all", "mode": "once"},
        "batches": batches, "complete": complete,
        "results": results, "notes": notes, "step_profile": profiles,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--naive-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="skip the optional comparisons once this much time has passed")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a small model, for a smoke run")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the per-kernel profile of a decode step (B = 1 and 64)")
    ap.add_argument("--json", default=None, help="where to write the JSON (default: "
                    "benchmarks/results/bench_decode[_cuda][_tiny].json)")
    args = ap.parse_args()
    start = time.perf_counter()
    cuda = args.device.startswith("cuda")
    model = build(args.device, args.tiny)
    vocab = model.config.vocab_size
    hf = None
    if not args.no_hf:
        try:
            hf = model.to_hf()
            hf.generation_config.eos_token_id = None  # no EOT: every row runs to its length
        except ImportError:
            print("transformers is not installed: no transformers rows", file=sys.stderr)
    bandwidth = copy_bandwidth_gbs() if cuda else None
    results, notes = [], []
    profiles: dict[int, dict] = {}
    name = "bench_decode" + ("_cuda" if cuda else "") + ("_tiny" if args.tiny else "")
    info = run_info(args.device)

    def save(complete: bool) -> Path:
        return write_json(args.json or name, make_payload(
            info, model, tokens=args.tokens, naive_tokens=args.naive_tokens,
            repeats=args.repeats, bandwidth=bandwidth, batches=args.batches,
            complete=complete, results=results, notes=notes, profiles=profiles))

    def over_budget() -> bool:
        return time.perf_counter() - start > args.budget_s

    # First, as it is cheap at a few dozen tokens and the B = 1 targets are stated against it.
    naive = None
    if 1 in args.batches:
        naive = naive_tokens_per_s(model, make_prompts(1, vocab, seed=1)[0], args.naive_tokens,
                                   args.device)
    for batch in args.batches:
        prompts = make_prompts(batch, vocab, seed=batch)
        rows = [replace(ROW, seed=i) for i in range(batch)]

        def ours(graphs: bool, n: int = args.tokens, prompts=prompts, rows=rows,
                 fused: bool = True):
            def run() -> None:
                dec = decoder_for(model)
                dec.allow_fused = fused  # False: eager model steps, the same Triton sampler
                try:
                    generate_ids(dec, prompts, rows, [n] * len(rows), NO_EOT,
                                 cuda_graph=graphs)
                finally:
                    dec.allow_fused = True
            return run

        r: dict = {"batch": batch, "tok_s": {}}
        made = batch * args.tokens
        t_graph = median_seconds(ours(True), args.repeats, device=args.device)[0]
        r["tok_s"]["lmgen-fast"] = made / t_graph
        if cuda:
            r["sampler_us"] = sampler_us(model)
            t_one = median_seconds(ours(True, 1), args.repeats, device=args.device)[0]
            step = (t_graph - t_one) / (args.tokens - 1)
            r["step_us"] = step * 1e6
            r["sampler_share"] = r["sampler_us"] / r["step_us"]
            r["roofline_ratio"] = step / roofline_s(model, prompts, args.tokens, bandwidth)
            t_eager = median_seconds(ours(False), args.repeats, device=args.device)[0]
            r["tok_s"]["lmgen-fast, no graphs"] = made / t_eager
            # The fused decode step against the eager model step, both graphed, one run.
            t_unfused = median_seconds(ours(True, fused=False), args.repeats,
                                       device=args.device)[0]
            r["tok_s"]["lmgen-fast, eager model"] = made / t_unfused
        if hf is not None and not over_budget():
            t_hf = median_seconds(hf_runner(hf, prompts, args.tokens, args.device, False),
                                  args.repeats, device=args.device)[0]
            r["tok_s"]["transformers"] = made / t_hf
        elif hf is not None:
            notes.append(f"B={batch}: transformers skipped (budget)")
        if batch == 1 and naive is not None:
            r["tok_s"]["naive article loop"] = naive
        results.append(r)
        save(complete=False)
        # Progress on stderr, so that a run cut short still leaves its numbers behind.
        print(f"[{time.perf_counter() - start:.0f} s] B={batch}: "
              + ", ".join(f"{k} {v:.1f} tok/s" for k, v in r["tok_s"].items()),
              file=sys.stderr, flush=True)

    if hf is not None and cuda and not args.no_compile and 1 in args.batches:
        if time.perf_counter() - start < args.budget_s - 60:
            try:
                # transformers compiles the forward by itself for a static cache on CUDA
                # (since 4.48); older versions get it compiled here.
                if not hasattr(hf, "_valid_auto_compile_criteria"):
                    hf.forward = torch.compile(hf.forward, mode="reduce-overhead")
                prompts = make_prompts(1, vocab, seed=1)
                t_static = median_seconds(hf_runner(hf, prompts, args.tokens, args.device,
                                                    True), args.repeats, device=args.device)[0]
                results[args.batches.index(1)]["tok_s"]["transformers static+compile"] = \
                    args.tokens / t_static
            except Exception as exc:  # noqa: BLE001 - report what this version cannot do
                notes.append(f"transformers static cache + compile failed: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        else:
            notes.append("transformers static cache + compile skipped (budget)")

    save(complete=False)
    if not args.no_profile:
        for batch in (b for b in (1, 64) if b in args.batches):
            profiles[batch] = step_profile(model, batch, args.device)
            save(complete=False)
    path = save(complete=True)
    print(f"device: {device_name(args.device)}  torch {torch.__version__}  "
          f"dtype {model.lm_head.weight.dtype}  tokens {args.tokens}"
          + (f"  copy bandwidth {bandwidth:.0f} GB/s" if bandwidth else ""))
    for note in notes:
        print("note:", note)
    names = ["lmgen-fast", "lmgen-fast, eager model", "lmgen-fast, no graphs", "transformers",
             "transformers static+compile", "naive article loop"]
    print(f"{'B':>4} | " + " | ".join(f"{n:>27}" for n in names)
          + " | step us | sampler | roofline x")
    for r in results:
        cells = []
        for n in names:
            v = r["tok_s"].get(n)
            cells.append(f"{'-':>27}" if v is None else
                         f"{v:>16.1f}" + (f" ({r['speedup'][n]:>6.1f}x)" if n in r["speedup"]
                                          else " " * 10))
        extra = ""
        if "step_us" in r:
            extra = (f" | {r['step_us']:>7.1f} | {100 * r['sampler_share']:>6.1f}% "
                     f"| {r['roofline_ratio']:>10.2f}")
        print(f"{r['batch']:>4} | " + " | ".join(cells) + extra)
    print("tok/s (lmgen-fast's speed-up over it); step us = decode step, sampler = its share, "
          "roofline x = step time / memory roofline")
    unit = "kernels" if cuda else "aten ops"
    for batch, prof in profiles.items():
        print(f"B={batch}: one eager decode step runs {prof['kernels_per_step']:.0f} {unit} "
              f"({prof['us_per_step']:.0f} us busy); the busiest:")
        for k in prof["top"]:
            print(f"    {k['us']:>8.1f} us  x{k['per_step']:<5.1f} {k['name']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
