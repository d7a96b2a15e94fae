"""Markdown for benchmarks/RESULTS.md from the benchmarks' JSON results.

    python benchmarks/render_results.py [FILE.json ...] [--command TEXT] [--plot FILE.png]

Without files: every ``benchmarks/results/*.json``. Known kinds (the ``kind`` field, or the
shape of files written before the scripts named it): ``bench_sampler`` and ``sampler_tune``
(bench_sampler.py), ``bench_decode`` (bench_decode.py), ``bench_launches``
(bench_launches.py). Files of another kind, or not
readable, are skipped with a note at the end, so that a new script's results never stop
the others' tables. Each section is headed with the device, torch and triton versions, the
date and the command of its run. Needs neither torch nor a GPU. ``--plot`` also draws the
bench_decode results (tokens/s against batch size, under the memory roofline): that needs
torch, lmgen-fast and its plot extra.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DECODE_COLUMNS = ("lmgen-fast", "lmgen-fast, eager model", "lmgen-fast, no graphs",
                  "transformers",
                  "transformers static+compile", "naive article loop")


def kind_of(payload: object) -> str | None:
    """The result kind of a decoded JSON document, or None when it is not one we know."""
    if not isinstance(payload, dict):
        return None
    if isinstance(payload.get("kind"), str):
        return payload["kind"]
    results, rows = payload.get("results"), payload.get("rows")
    if isinstance(results, list) and results and isinstance(results[0], dict) \
            and "tok_s" in results[0]:
        return "bench_decode"  # written before bench_decode.py named its kind
    if isinstance(rows, list) and rows and isinstance(rows[0], dict) and "kernel_us" in rows[0]:
        return "bench_sampler"
    return None


def _num(value: object, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _pct(share: object) -> str:
    """A share in percent: one decimal below 10% (a sampler's share of a step is a few %)."""
    if share is None:
        return "-"
    pct = 100 * float(share)
    return f"{pct:.1f}%" if abs(pct) < 10 else f"{pct:.0f}%"


def _cell(text: object) -> str:
    """A table cell: pipes escaped (kernel names hold them), no line breaks."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def run_line(payload: dict, path: Path | None) -> str:
    """Device, versions, date and command of one file's run."""
    date = payload.get("date")
    if not date and path is not None and path.exists():
        date = time.strftime("%Y-%m-%d", time.localtime(path.stat().st_mtime)) + " (file date)"
    parts = [f"**{payload.get('device', 'unknown device')}**",
             f"torch {payload.get('torch', '?')}", f"triton {payload.get('triton') or '?'}",
             str(date or "date unknown")]
    line = ", ".join(parts)
    if payload.get("command"):
        line += f"; `{payload['command']}`"
    if path is not None:
        line += f" (JSON: `{path.name}`)"
    return line


def _cut_short(payload: dict, what: str) -> list[str]:
    if payload.get("complete", True):
        return []
    missing = payload.get("not_run") or []
    more = f": not run {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "") \
        if missing else ""
    return [f"_Cut short (budget or timeout): {len(payload.get('rows', []))} of "
            f"{payload.get('configs', '?')} {what} measured{more}._", ""]


def _notes(payload: dict) -> list[str]:
    notes = list(payload.get("notes") or [])
    notes += [f"**{r['bad_rows']} of {r['B']} rows returned an error status** at B={r['B']} "
              f"V={r['V']} {r['dtype']} {r['filter']}: that row's time is of a wrong launch"
              for r in payload.get("rows", []) if r.get("bad_rows")]
    return [f"- note: {n}" for n in notes] + ([""] if notes else [])


def render_sampler(payload: dict) -> list[str]:
    rows = payload.get("rows", [])
    out = [f"Copy bandwidth {_num(payload.get('copy_gbs'), '{:.0f}')} GB/s (read + write of a "
           "1 GiB copy); kernel = the two sampler kernels replayed from a CUDA graph, L2 "
           "flushed before each call; GB/s = one read of the logits; `slow` = rows that "
           "re-read their logits; x = reference (or HF chain, torch.compile) time over the "
           "kernel's. Medians.", ""]
    out += _cut_short(payload, "configurations")

    def ratio(r: dict, key: str) -> str:
        v = r.get(key)
        return "-" if not v or not r.get("kernel_us") else f"{v / r['kernel_us']:.1f}x"

    out += table(
        ("B", "V", "dtype", "filter", "chunk/warps", "kernel µs", "GB/s", "% copy", "slow",
         "launch eager µs", "reference µs", "torch.compile µs", "HF chain µs",
         "x reference", "x HF", "x compile"),
        ((r["B"], r["V"], r["dtype"], r["filter"], f"{r.get('chunk')}/{r.get('chunk_warps')}",
          _num(r["kernel_us"]), _num(r.get("kernel_gbs"), "{:.0f}"), _pct(r.get("copy_share")),
          r.get("slow_rows", "-"), _num(r.get("kernel_eager_us")), _num(r.get("eager_us")),
          _num(r.get("compile_us")) if "compile_error" not in r else "failed",
          _num(r.get("hf_us")), ratio(r, "eager_us"), ratio(r, "hf_us"),
          ratio(r, "compile_us")) for r in rows))
    return out + [""] + _notes(payload)


def best_per_batch(rows: Sequence[dict]) -> dict[int, dict]:
    """The fastest row (lowest median kernel time) per batch size, among rows whose tokens
    matched the first launch's and had no error status (a launch that changes tokens is
    wrong, not fast)."""
    best: dict[int, dict] = {}
    for r in rows:
        if r.get("tokens_match") is False or r.get("bad_rows"):
            continue
        if r["B"] not in best or r["kernel_us"] < best[r["B"]]["kernel_us"]:
            best[r["B"]] = r
    return best


def render_tune(payload: dict) -> list[str]:
    rows = payload.get("rows", [])
    default = payload.get("default_launch") or {}
    is_default = (default.get("chunk"), default.get("chunk_warps"))
    best = best_per_batch(rows)
    out = [f"V = {rows[0]['V'] if rows else '?'}, {rows[0]['dtype'] if rows else '?'}, "
           f"{rows[0]['filter'] if rows else '?'}: the chunk kernel's launch (chunk = logits "
           "per program, warps per program) against the copy bandwidth "
           f"({_num(payload.get('copy_gbs'), '{:.0f}')} GB/s); sampler time replayed from a "
           "CUDA graph, L2 flushed before each call, medians; same tokens = the launch drew "
           "the tokens of the first launch at that B.", ""]
    out += _cut_short(payload, "launches")

    def mark(r: dict) -> str:
        tags = []
        if (r.get("chunk"), r.get("chunk_warps")) == is_default:
            tags.append("default")
        if best.get(r["B"]) is r:
            tags.append("**best**")
        return ", ".join(tags)

    def same(r: dict) -> str:
        match = r.get("tokens_match")
        return "(first)" if match is None else "yes" if match else "**NO**"

    out += table(("B", "chunk", "warps", "kernel µs", "GB/s", "% copy", "same tokens", ""),
                 ((r["B"], r.get("chunk"), r.get("chunk_warps"), _num(r["kernel_us"]),
                   _num(r.get("kernel_gbs"), "{:.0f}"), _pct(r.get("copy_share")), same(r),
                   mark(r)) for r in rows))
    out.append("")
    for b, r in sorted(best.items()):
        line = (f"Best at B = {b}: chunk {r.get('chunk')}, {r.get('chunk_warps')} warps, "
                f"{r['kernel_us']:.1f} µs ({_pct(r.get('copy_share'))} of copy)")
        dflt = [d for d in rows if d["B"] == b
                and (d.get("chunk"), d.get("chunk_warps")) == is_default]
        if dflt and dflt[0] is not r:
            line += (f"; the default {is_default[0]}/{is_default[1]} takes "
                     f"{dflt[0]['kernel_us']:.1f} µs")
        out.append(f"- {line}.")
    return out + [""] + _notes(payload)


def _model_line(cfg: dict) -> str:
    return ", ".join(f"{k.replace('num_', '').replace('_', ' ')} {cfg[k]}" for k in
                     ("hidden_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "vocab_size") if k in cfg)


def render_decode(payload: dict) -> list[str]:
    results = payload.get("results", [])
    model = _model_line(payload.get("config") or {})
    samp = payload.get("sampling") or {}
    out = [f"Model: {model or '?'}, random weights, {payload.get('dtype', '?')}; "
           f"{payload.get('tokens', '?')} new tokens per row (the article loop "
           f"{payload.get('naive_tokens', '?')}), temperature {samp.get('temperature', '?')}, "
           f"top-k {samp.get('top_k', '?')}, repetition penalty "
           f"{samp.get('repetition_penalty', '?')}; tokens/s over whole calls, medians of "
           f"{payload.get('repeats', '?')}"
           + (f"; copy bandwidth {payload['copy_bandwidth_gbs']:.0f} GB/s"
              if payload.get("copy_bandwidth_gbs") else "") + ".", ""]
    if not payload.get("complete", True):
        done = [r["batch"] for r in results]
        wanted = payload.get("batches")
        what = "the step profile did not finish" if wanted and done == wanted else \
            f"batch sizes {done} of {wanted or '?'} measured"
        out += [f"_Cut short (budget or timeout): {what}._", ""]
    names = [n for n in DECODE_COLUMNS if any(n in r.get("tok_s", {}) for r in results)]
    names += sorted({n for r in results for n in r.get("tok_s", {})} - set(names))
    gpu = any("step_us" in r for r in results)
    header = ["B", *names] + (["step µs", "sampler share", "roofline x"] if gpu else [])

    def cells(r: dict) -> list[str]:
        tok, up = r.get("tok_s", {}), r.get("speedup", {})
        row = [str(r["batch"])]
        for n in names:
            if n not in tok:
                row.append("-")
            elif n in up:
                row.append(f"{tok[n]:.1f} (lmgen-fast {up[n]:.1f}x)")
            else:
                row.append(f"{tok[n]:.1f}")
        if gpu:
            row += [_num(r.get("step_us")), _pct(r.get("sampler_share")),
                    _num(r.get("roofline_ratio"), "{:.2f}")]
        return row

    out += table(header, (cells(r) for r in results))
    out.append("")
    if gpu:
        out += ["step µs = decode step ((t(tokens) - t(1)) / (tokens - 1)); sampler share = "
                "the fused sampler's share of it; roofline x = step time over the memory "
                "roofline (weights + KV cache read once per step at copy speed).", ""]
    out += _notes(payload)
    unit = "kernels" if gpu or str(payload.get("device", "")).startswith("NVIDIA") else "ops"
    for batch, prof in sorted((payload.get("step_profile") or {}).items(),
                              key=lambda kv: int(kv[0])):
        out += [f"B = {batch}: one eager decode step runs {prof['kernels_per_step']:.0f} "
                f"{unit} ({prof['us_per_step']:.0f} µs busy); the busiest:", ""]
        out += table(("µs per step", "calls per step", "kernel"),
                     ((f"{k['us']:.1f}", f"{k['per_step']:.1f}", f"`{k['name']}`")
                      for k in prof.get("top", [])))
        out.append("")
    return out


def render_launches(payload: dict) -> list[str]:
    results = payload.get("results", [])
    if not results:  # a --predict run alone
        return render_predicted(payload) + _notes(payload)
    out = [f"Model: {_model_line(payload.get('config') or {}) or '?'}, random weights, "
           f"{payload.get('dtype', '?')}; prompts of {payload.get('prompt_len', '?')} "
           f"tokens. Kernels per decode step, counted: every aten op that is not a view or "
           f"an allocation, plus every Triton launch (in brackets, the Triton launches "
           f"alone); profiler = the CUDA kernels torch.profiler saw per step.", ""]
    header = ["backend", "B", "fused", "per layer", "model other", "model", "sampler",
              "bookkeeping", "total", "profiler"]

    def counted(r: dict, key: str, part: str | None) -> str:
        triton = (r.get("triton") or {}).get(part) if part else None
        return _num(r.get(key)) + (f" ({triton:.0f})" if triton else "")

    out += table(header, ([r.get("backend", "?"), r.get("batch", "?"),
                           "yes" if r.get("fused") else "no",
                           counted(r, "per_layer", None), counted(r, "model_other", None),
                           counted(r, "model", None), counted(r, "sampler", "sampler"),
                           counted(r, "bookkeeping", "bookkeeping"), counted(r, "total", None),
                           _num(r.get("profiler_kernels"))] for r in results))
    return out + [""] + render_launch_kinds(results) + render_predicted(payload) \
        + _notes(payload)


def render_launch_kinds(results: Sequence[dict]) -> list[str]:
    """Launches per step by kind (cuBLAS matmuls, other aten ops, Triton kernels) and by
    context, for the rows that recorded them."""
    rows = [r for r in results if r.get("by_kind")]
    if not rows:
        return []
    out = ["Launches per step by kind (cuBLAS: aten mm/addmm/bmm/linear; aten: every other "
           "op, dtype copies included; Triton: our kernels), by context (the prompt length):",
           ""]
    out += table(["backend", "B", "context", "cuBLAS", "aten", "Triton", "total"],
                 ([r.get("backend", "?"), r.get("batch", "?"), r.get("context", "?"),
                   *(_num(r["by_kind"].get(k)) for k in ("cublas", "aten", "triton")),
                   _num(r.get("total"))] for r in rows))
    return out + [""]


def _measured_for(payload: dict, p: dict) -> dict | None:
    """The measured kernels of the triton row at the prediction's batch and context, when
    the run's model has the prediction's shapes."""
    cfg, shapes = payload.get("config") or {}, p.get("shapes") or {}
    if (cfg.get("hidden_size"), cfg.get("num_hidden_layers"), cfg.get("vocab_size")) != (
            shapes.get("hidden"), shapes.get("layers"), shapes.get("vocab")):
        return None
    for r in payload.get("results", []):
        if r.get("measured") and r.get("backend") == "triton" and r.get("batch") == \
                p.get("batch") and r.get("context") == p.get("context"):
            return r["measured"]
    return None


def render_predicted(payload: dict) -> list[str]:
    """The predicted per-kernel times of a decode step (``--predict``), with the measured
    ones beside them where this run measured the same model, batch and context."""
    predicted = payload.get("predicted") or []
    if not predicted:
        return []
    out = ["Predicted, not measured on a GPU (`--predict`): per kernel max(bytes / HBM "
           "bandwidth, floor); the roofline share is bytes / bandwidth over the predicted "
           "step (benchmarks/launch_model.py).", ""]
    out += table(["model", "B", "context", "splits", "launches", "MB", "predicted us",
                  "roofline us", "roofline share", "measured us"],
                 ([p["model"], p["batch"], p["context"], p["splits"], p["launches"],
                   _num(p["bytes"] / 1e6), _num(p["predicted_us"]), _num(p["roofline_us"]),
                   _pct(p["roofline_share"]),
                   _num(sum(k["us"] for k in m.values())) if (m := _measured_for(payload, p))
                   else "-"] for p in predicted))
    for p in predicted:
        measured = _measured_for(payload, p) or {}
        out += ["", f"{p['model']}, B={p['batch']}, context {p['context']}: per kernel "
                "(measured: on replayed CUDA graphs, per step; cuBLAS and aten kernels "
                "only as a sum by kind)", ""]
        rows = [[k["name"], k["kind"], k["launches"], _num(k["bytes"] / 1e6, "{:.3f}"),
                 _num(k["predicted_us"]),
                 _num(measured[k["name"]]["us"]) if k["name"] in measured else "-"]
                for k in p["kernels"]]
        for kind in ("cublas", "aten"):
            mine = [k for k in p["kernels"] if k["kind"] == kind]
            theirs = [m for m in measured.values() if m["kind"] == kind]
            rows.append([f"all {kind}", kind, sum(k["launches"] for k in mine),
                         _num(sum(k["bytes"] for k in mine) / 1e6, "{:.3f}"),
                         _num(sum(k["predicted_us"] for k in mine)),
                         _num(sum(m["us"] for m in theirs)) if theirs else "-"])
        out += table(["kernel", "kind", "launches", "MB", "predicted us", "measured us"],
                     rows)
    return out + [""]


TITLES = {
    "sampler_tune": "The chunk kernel's launch",
    "bench_sampler": "One sampling step",
    "bench_decode": "The decode engine",
    "bench_launches": "Kernels per decode step",
}
RENDERERS: dict[str, Callable[[dict], list[str]]] = {
    "sampler_tune": render_tune,
    "bench_sampler": render_sampler,
    "bench_decode": render_decode,
    "bench_launches": render_launches,
}


def render_payload(payload: dict, path: Path | None = None) -> str:
    """One result file's section: heading, run line, table(s)."""
    kind = kind_of(payload)
    if kind not in RENDERERS:
        raise ValueError(f"no renderer for kind {kind!r}")
    script = (payload.get("command") or "").split(" ")[1:2]
    title = TITLES[kind] + (f" (`{script[0]}`)" if script else "")
    return "\n".join([f"### {title}", "", run_line(payload, path), "",
                      *RENDERERS[kind](payload)]).rstrip() + "\n"


def render_files(paths: Sequence[Path], command: str | None = None) -> str:
    """Every file's section, known kinds in a fixed order, under one heading naming the
    devices and versions; notes for the files skipped."""
    loaded: list[tuple[str, Path, dict]] = []
    skipped: list[str] = []
    for path in paths:
        try:
            payload = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            skipped.append(f"`{path}`: not readable JSON ({type(exc).__name__})")
            continue
        kind = kind_of(payload)
        if kind not in RENDERERS:
            skipped.append(f"`{path}`: kind {kind!r} has no renderer yet")
            continue
        loaded.append((kind, Path(path), payload))
    order = list(RENDERERS)
    loaded.sort(key=lambda t: (order.index(t[0]), t[1].name))
    runs = sorted({(p.get("device", "?"), p.get("torch", "?"), p.get("triton") or "?")
                   for _, _, p in loaded})
    dates = sorted(str(p.get("date", ""))[:10] for _, _, p in loaded if p.get("date"))
    heading = "; ".join(f"{d}, torch {t}, triton {tr}" for d, t, tr in runs) or "no results"
    lines = [f"## {heading}" + (f" ({dates[-1]})" if dates else ""), ""]
    if command:
        lines += [f"Recorded by `{command}`.", ""]
    for _, path, payload in loaded:
        lines += [render_payload(payload, path)]
    for note in skipped:
        lines.append(f"_Skipped {note}._")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- --plot

# bench_decode.py's prompts are 8 to 40 tokens, uniformly drawn: 24 on average.
DECODE_PROMPT_MEAN = 24


def decode_series(payload: dict) -> dict[str, tuple[list[int], list[float]]]:
    """A bench_decode file's tokens/s by batch size, one series per side it measured
    (lmgen-fast's variants, transformers' generate, the article loop), in the order the file
    first names them."""
    results = payload.get("results", [])
    names = dict.fromkeys(n for r in results for n in r.get("tok_s", {}))
    return {n: ([r["batch"] for r in results if n in r.get("tok_s", {})],
                [r["tok_s"][n] for r in results if n in r.get("tok_s", {})]) for n in names}


def decode_roofline_of(payload: dict, bandwidth: float | None = None):
    """``(Roofline or None, why not)`` of a bench_decode file: its model (built on the meta
    device from the file's configuration and dtype, so no memory and no weights), its
    device's datasheet bandwidth or ``bandwidth``, at the mean context of its calls."""
    import torch

    from lmgen_fast.cli.bench_plot import decode_roofline
    from lmgen_fast.models import LlamaConfig, LlamaForPretraining

    dtype = getattr(torch, str(payload.get("dtype", "torch.float32")).split(".")[-1])
    with torch.device("meta"):
        model = LlamaForPretraining(LlamaConfig.from_dict(payload["config"])).to(dtype)
    context = DECODE_PROMPT_MEAN + (int(payload.get("tokens", 1)) - 1) / 2
    return decode_roofline(model, str(payload.get("device", "?")), context, bandwidth)


def plot_decode(paths: Sequence[Path], out: Path, bandwidth: float | None = None) -> Path:
    """One panel per bench_decode file among ``paths``: tokens/s against batch size of
    every side it measured, under its device's memory roofline; written to ``out``.

    Needs torch and lmgen-fast (the models, for the roofline's bytes) and matplotlib (the
    plot extra). Raises ValueError when no file is a bench_decode result.
    """
    from lmgen_fast.core.plot import pyplot, save_png, throughput_figure

    decode = []
    for path in paths:
        try:
            payload = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        if kind_of(payload) == "bench_decode" and payload.get("results"):
            decode.append((Path(path), payload))
    if not decode:
        raise ValueError("--plot: no bench_decode result among the files "
                         "(python benchmarks/bench_decode.py writes one)")
    fig, axes = pyplot().subplots(len(decode), 1, figsize=(8, 5.5 * len(decode)),
                                  squeeze=False)
    for ax, (path, payload) in zip(axes[:, 0], decode, strict=True):
        roofline, why_not = decode_roofline_of(payload, bandwidth)
        title = (f"{payload.get('device', '?')}: {_model_line(payload.get('config') or {})}, "
                 f"{payload.get('dtype', '?')}, {payload.get('tokens', '?')} new tokens per row")
        caption = f"{payload.get('command') or '?'}  (JSON: {path.name})"
        throughput_figure(decode_series(payload), title, caption, roofline, why_not, ax=ax)
    fig.subplots_adjust(hspace=0.45)
    return save_png(fig, out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path,
                    help="result files (default: benchmarks/results/*.json)")
    ap.add_argument("--command", default=None, help="the command that recorded them, for the "
                    "heading (device_check.sh passes itself)")
    ap.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                    help="also draw tokens/s against batch size of the bench_decode results, "
                         "under the memory roofline, to FILE.png (needs lmgen-fast's plot "
                         "extra, matplotlib)")
    ap.add_argument("--bandwidth", type=float, default=None, metavar="BYTES_PER_S",
                    help="memory bandwidth for --plot's roofline (default: the datasheet "
                         "figure of an H100 or H200; none, so no roofline, elsewhere)")
    args = ap.parse_args(argv)
    paths = args.files or sorted(RESULTS.glob("*.json"))
    print(render_files(paths, args.command), end="")
    if args.plot is not None:
        try:
            print(f"wrote {plot_decode(paths, args.plot, args.bandwidth)}", file=sys.stderr)
        except (ValueError, ImportError) as err:  # no decode results; no plot extra
            print(f"render_results.py: error: {err}", file=sys.stderr)
            return 1
    return 0 if paths else 1


if __name__ == "__main__":
    sys.exit(main())
