"""``lmgen-fast bench --plot FILE.png``: decode throughput against batch size on the model
benchmarked, lmgen-fast's ``generate_batch`` against transformers' ``generate`` on an exact
copy of the same weights, under the device's memory roofline.

The figure itself is :func:`lmgen_fast.core.plot.throughput_figure`; this module measures the
series and works out the roofline of a model (:func:`decode_roofline`), which
``benchmarks/render_results.py --plot`` also uses for the models of its result files.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch

from lmgen_fast.api.generate import generate_batch
from lmgen_fast.api.tokenization import adapt_tokenizer
from lmgen_fast.cli.options import CLIError, device_name
from lmgen_fast.core.plot import (
    PlotExtraMissing,
    Roofline,
    datasheet_bandwidth,
    pyplot,
    save_png,
    throughput_figure,
)
from lmgen_fast.engine.memory import kv_bytes_per_position

Series = dict[str, tuple[list[int], list[float]]]
LMGEN = "lmgen-fast generate_batch"
HF = "transformers generate (same weights)"
# Never sampled in practice: as the stop token it makes every row run its full length.
NEVER = "[PAD]"


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads: every parameter but the embedding table,
    of which a step gathers one row per sequence (a tied ``lm_head`` counts: it is read
    whole). Shared parameters count once."""
    sizes = {id(p): p.numel() * p.element_size()
             for name, p in model.named_parameters(remove_duplicate=False)
             if not name.endswith("embed_tokens.weight")}
    return sum(sizes.values())


def decode_roofline(model: torch.nn.Module, device: str, context: float,
                    bandwidth: float | None = None) -> tuple[Roofline | None, str]:
    """The memory roofline of decoding ``model`` on the device named ``device``.

    Parameters
    ----------
    model : torch.nn.Module
        A Llama-style model in the dtype it was measured in (a meta-device copy will do:
        only shapes and dtypes are read).
    device : str
        The device's name (``NVIDIA H200``, a CPU model): where ``bandwidth`` is None, its
        datasheet bandwidth (:data:`lmgen_fast.core.plot.DATASHEET_BANDWIDTH`).
    context : float
        Positions per row read per step, averaged over the steps measured.
    bandwidth : float, optional
        Bytes/s, given by the user (``--bandwidth``); overrides the datasheet.

    Returns
    -------
    (Roofline or None, str)
        The roofline, or None and the sentence the figure prints instead.
    """
    value = bandwidth or datasheet_bandwidth(device)
    per_position = kv_bytes_per_position(model)
    if value is None or per_position is None:
        return None, (f"memory roofline not drawn: no datasheet bandwidth for {device} "
                      "(give one in bytes/s with --bandwidth)")
    return Roofline(value, weight_bytes_per_step(model), per_position, context,
                    "--bandwidth" if bandwidth else "datasheet"), ""


def _timed(fn: Callable[[], int], device: torch.device) -> tuple[int, float]:
    """``fn()``'s token count and wall seconds, the device's queue drained on both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    made = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return made, time.perf_counter() - start


def measure_batches(model, tokenizer, prompt: str, batches: Sequence[int], max_tokens: int,
                    device: torch.device) -> tuple[Series, list[str]]:
    """Tokens/s of lmgen-fast and of transformers' ``generate`` at each batch size.

    Every row continues ``prompt`` for ``max_tokens`` tokens with top-k 50 at temperature 1
    (the bench's settings), after a 4-token warm-up call at the same batch size (CUDA
    graphs are captured per batch size). Without transformers (the ``hf`` extra) its series
    is left out and a note says so.

    Returns
    -------
    (dict, list of str)
        Series name -> (batch sizes, tokens/s of all rows over the whole call, prefill
        included), and notes.
    """
    series: Series = {LMGEN: ([], [])}
    notes: list[str] = []
    try:
        hf = model.to_hf()
        hf.generation_config.eos_token_id = None  # every row runs to its length
        series[HF] = ([], [])
    except ImportError:
        hf = None
        notes.append("transformers is not installed (pip install 'lmgen-fast[hf]'): "
                     "no transformers line")
    ids = adapt_tokenizer(tokenizer).encode_prompt(prompt)

    def ours(batch: int, n: int) -> int:
        done = generate_batch(model, tokenizer, [prompt] * batch, max_tokens=n, top_k=50,
                              device=device, seed=0, eos_token=NEVER, return_details=True)
        return sum(len(d.token_ids) for d in done)

    def theirs(batch: int, n: int) -> int:
        inputs = torch.tensor([ids] * batch, device=device)
        with torch.inference_mode():
            out = hf.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=True,
                              top_k=50, temperature=1.0, max_new_tokens=n, pad_token_id=0)
        return batch * (out.shape[1] - inputs.shape[1])

    for batch in batches:
        for name, run in ((LMGEN, ours), (HF, theirs)):
            if name not in series:
                continue
            run(batch, 4)
            made, seconds = _timed(lambda b=batch, r=run: r(b, max_tokens), device)
            series[name][0].append(batch)
            series[name][1].append(made / seconds)
    return series, notes


def check_plot_arguments(args: argparse.Namespace) -> None:
    """Fail before any timing where ``bench --plot`` cannot finish: matplotlib missing,
    a batch size or bandwidth that is not positive.

    Raises
    ------
    CLIError
        Naming the option, and for matplotlib the extra that installs it.
    """
    try:
        pyplot()
    except PlotExtraMissing as err:
        raise CLIError(f"--plot: {err}") from None
    if min(args.batches) <= 0:
        raise CLIError(f"--batches must be > 0, got {args.batches}")
    if args.bandwidth is not None and not args.bandwidth > 0:
        raise CLIError(f"--bandwidth must be > 0 bytes/s, got {args.bandwidth}")


def bench_plot(args: argparse.Namespace, model, tokenizer, device: torch.device,
                article_rate: float, command: str) -> None:
    """The batch-size sweep of ``lmgen-fast bench --plot``: print its table, write its figure.

    ``args`` are the bench command's (``prompt``, ``max_tokens``, ``batches``,
    ``bandwidth``, ``plot``); ``article_rate`` is the article loop's tokens/s at B = 1 and
    ``command`` the command line, for the caption.
    """
    series, notes = measure_batches(model, tokenizer, args.prompt, args.batches,
                                    args.max_tokens, device)
    series["article loop (recompute, host sampling)"] = ([1], [article_rate])
    context = len(adapt_tokenizer(tokenizer).encode_prompt(args.prompt)) \
        + (args.max_tokens - 1) / 2
    name = device_name(device)
    roofline, no_roofline = decode_roofline(model, name, context, args.bandwidth)
    print(f"{'tokens/s by batch size':<42}" + "".join(f"{'B=' + str(b):>10}"
                                                     for b in args.batches))
    for label, (batches, rates) in series.items():
        cells = dict(zip(batches, rates, strict=True))
        print(f"{label:<42}" + "".join(f"{cells[b]:>10.1f}" if b in cells else f"{'-':>10}"
                                       for b in args.batches))
    if roofline is not None:
        print(f"{'memory roofline (' + roofline.source + ')':<42}"
              + "".join(f"{roofline.tokens_per_s(b):>10.1f}" for b in args.batches))
    for note in [*notes, no_roofline]:
        if note:
            print(f"note: {note}")
    fig = throughput_figure(
        series, f"{name} ({device}): embedded model, {args.max_tokens} new tokens per row",
        caption=command, roofline=roofline, no_roofline=no_roofline)
    print(f"wrote {save_png(fig, args.plot)}")
