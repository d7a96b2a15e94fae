"""Kernels per decode step, by component (issue: "A decode step of at most 130 kernels").

    python benchmarks/bench_launches.py [--device cuda] [--backends reference triton]
                                        [--batches 1] [--tiny] [--out PATH]

Counts what one engine decode step (``Stepper.advance``: what a CUDA graph captures) launches,
for the article's configuration by default (hidden 768, 12 layers, 12 heads, 3 key/value
heads, vocabulary 50000; random weights, bfloat16 on CUDA, float32 on the CPU), split into
the model's layers (reported per layer), the rest of the model (embedding, final norm,
``lm_head``, the position update), the sampler and the engine's bookkeeping. Backend
"reference" is the eager path (``forward_cached`` and the reference sampler), "triton" the
fused decode step and the Triton sampler.

Counted on any device, without running on a GPU: every aten op that is not a view or an
allocation (each one kernel on CUDA), seen by a ``TorchDispatchMode``, plus every Triton
launch (``kernel[grid](...)`` of every kernel in ``lmgen_fast.kernels``; the aten ops the
interpreter runs inside a launch are not counted). On CUDA also the profiler's count of
device kernels per step. On the CPU the Triton backend runs in the
interpreter (``TRITON_INTERPRET=1`` is set here before triton is imported). Prints a table
and writes JSON (kind ``bench_launches``) under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch


def _device_from_argv(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--device="):
            return a.split("=", 1)[1]
    return "cuda" if torch.cuda.is_available() else "cpu"


if not _device_from_argv(sys.argv).startswith("cuda"):
    # The interpreter must be chosen before triton is first imported (kernels defined).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from lmgen_fast.core.params import SamplingParams  # noqa: E402
from lmgen_fast.engine import generate as engine  # noqa: E402
from lmgen_fast.engine.stepper import Stepper  # noqa: E402
from lmgen_fast.models import LlamaConfig, LlamaForPretraining  # noqa: E402
from lmgen_fast.models.decoder import CachedLlamaDecoder, wrap  # noqa: E402
from lmgen_fast.models.fused_step import FusedLlamaStep  # noqa: E402
from lmgen_fast.sampling import kernel as kernel_sampler  # noqa: E402
from lmgen_fast.sampling import reference  # noqa: E402

from _common import run_info, sync, write_json  # noqa: E402

# bench_decode's sampling: temperature 0.8, top-k 50, repetition penalty 1.1 once per token.
ROW = SamplingParams(temperature=0.8, top_k=50, repetition_penalty=1.1,
                     repetition_penalty_range=0, penalty_scope="all", penalty_mode="once")
NO_EOT = -1
ARTICLE = LlamaConfig()  # hidden 768, 12 layers, 12 heads, 3 key/value heads
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256)
# Ops that allocate or alias without launching anything on CUDA.
_FREE = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
         "aten::new_empty_strided", "aten::lift_fresh", "aten::set_", "aten::resize_"}
COMPONENTS = ("model.layers", "model.other", "sampler", "bookkeeping")


class LaunchCounter(TorchDispatchMode):
    """Counts kernels by the label in force while counting is on.

    ``counts[label]``: aten ops (non-view, non-allocating) plus Triton launches;
    ``triton[label]``: the Triton launches alone.
    """

    def __init__(self) -> None:
        super().__init__()
        self.label = "bookkeeping"
        self.active = False
        self.paused = 0  # inside a Triton launch (the interpreter's own torch ops)
        self.counts: Counter[str] = Counter()
        self.triton: Counter[str] = Counter()
        self.steps = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active and not self.paused and not func.is_view \
                and func._schema.name not in _FREE:
            self.counts[self.label] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def labelled(self, label: str) -> Iterator[None]:
        before, self.label = self.label, label
        try:
            yield
        finally:
            self.label = before

    def launch(self) -> None:
        if self.active:
            self.counts[self.label] += 1
            self.triton[self.label] += 1


def _proxy_class(kernel) -> type:
    """A stand-in for a Triton kernel object that counts its launches. It carries the
    kernel's class name: kernel_sampler.check_device tells the interpreter's kernels from
    compiled ones by that name."""

    class Proxy:
        def __init__(self, fn, counter: LaunchCounter):
            self._fn, self._counter = fn, counter

        def __getitem__(self, grid):
            launcher = self._fn[grid]

            def run(*args, **kwargs):
                self._counter.launch()
                self._counter.paused += 1
                try:
                    return launcher(*args, **kwargs)
                finally:
                    self._counter.paused -= 1

            return run

        def __getattr__(self, name):
            return getattr(self._fn, name)

    Proxy.__name__ = Proxy.__qualname__ = type(kernel).__name__
    return Proxy


def _wrap_with(stack: contextlib.ExitStack, owner, name: str, make: Callable) -> None:
    """Replace ``owner.name`` by ``make(original)`` until ``stack`` closes."""
    original = getattr(owner, name)
    setattr(owner, name, make(original))
    stack.callback(setattr, owner, name, original)


def kernel_modules() -> list:
    """Every module of ``lmgen_fast.kernels`` (each defines Triton kernels)."""
    import importlib
    import pkgutil

    import lmgen_fast.kernels as pkg

    return [importlib.import_module(f"{pkg.__name__}.{m.name}")
            for m in pkgutil.iter_modules(pkg.__path__)]


@contextlib.contextmanager
def counting(counter: LaunchCounter, model: LlamaForPretraining) -> Iterator[None]:
    """Instrument the engine, the decoder, the model's layers and the kernels for
    ``counter``; everything is restored on exit."""
    def labelled(label: str, on: bool = False):
        def make(fn):
            def wrapped(*args, **kwargs):
                before = counter.active
                if on:
                    counter.active = True
                    counter.steps += 1
                try:
                    with counter.labelled(label):
                        return fn(*args, **kwargs)
                finally:
                    counter.active = before
            return wrapped
        return make

    with contextlib.ExitStack() as stack:
        for mod in kernel_modules():
            for name, obj in list(vars(mod).items()):
                # Launched kernels end in _kernel; the @triton.jit helpers they call
                # (sampling_common's) must stay plain functions inside a kernel.
                if type(obj).__name__ in ("JITFunction", "InterpretedFunction") \
                        and name.endswith("_kernel"):
                    proxy = _proxy_class(obj)
                    _wrap_with(stack, mod, name, lambda fn, p=proxy: p(fn, counter))
        _wrap_with(stack, Stepper, "advance", labelled("bookkeeping", on=True))
        _wrap_with(stack, CachedLlamaDecoder, "step", labelled("model.other"))
        _wrap_with(stack, FusedLlamaStep, "_layer", labelled("model.layers"))
        for owner, name in ((kernel_sampler, "guarded_launch"), (reference, "sample"),
                            (reference, "sample_on_device"),
                            (kernel_sampler, "logprobs_from_launch")):
            _wrap_with(stack, owner, name, labelled("sampler"))
        for layer in model.base_model.layers:  # the eager path's layers
            ctx: list = []

            def pre(module, args, ctx=ctx):
                ctx.append(counter.labelled("model.layers"))
                ctx[-1].__enter__()

            def post(module, args, out, ctx=ctx):
                ctx.pop().__exit__(None, None, None)

            stack.callback(layer.register_forward_pre_hook(pre).remove)
            stack.callback(layer.register_forward_hook(post).remove)
        with counter:
            yield


def build(config: LlamaConfig, device: str) -> LlamaForPretraining:
    torch.manual_seed(0)
    model = LlamaForPretraining(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return model.to(device, dtype).eval()


def make_prompts(batch: int, vocab: int, prompt_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]


def _profiler_kernels(model, prompts, rows, backend: str, tokens: int) -> float:
    """Device kernels per step by the profiler: a run of ``tokens`` minus a run of one."""
    from torch.profiler import ProfilerActivity, profile

    def kernels(n: int) -> int:
        dec = wrap(model)
        engine.generate_ids(dec, prompts, rows, [n] * len(prompts), NO_EOT, backend=backend,
                            cuda_graph=False)  # warm-up: compiles, allocates
        sync("cuda")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.generate_ids(dec, prompts, rows, [n] * len(prompts), NO_EOT,
                                backend=backend, cuda_graph=False)
            sync("cuda")
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "Memcpy" not in e.name and "Memset" not in e.name)

    return (kernels(tokens) - kernels(1)) / (tokens - 1)


def count_step(model: LlamaForPretraining, batch: int, backend: str, *, prompt_len: int = 16,
               tokens: int = 3) -> dict:
    """Kernels per decode step of ``generate_ids`` on ``model`` (``tokens - 1`` steps).

    Returns
    -------
    dict
        ``per_layer``, ``model_other``, ``model``, ``sampler``, ``bookkeeping``, ``total``
        (per step, floats), ``triton`` (Triton launches per step by component), ``fused``
        (whether the fused decode step ran), ``kv_len``, ``profiler_kernels`` (CUDA only).
    """
    device = str(model.lm_head.weight.device)
    prompts = make_prompts(batch, model.config.vocab_size, prompt_len)
    rows = [replace(ROW, seed=i) for i in range(batch)]
    dec = wrap(model)
    counter = LaunchCounter()
    with counting(counter, dec.model):
        engine.generate_ids(dec, prompts, rows, [tokens] * batch, NO_EOT, backend=backend,
                            cuda_graph=False)
    steps = max(counter.steps, 1)
    per = {k: counter.counts[k] / steps for k in COMPONENTS}
    layers = model.config.num_hidden_layers
    out = {
        "backend": backend, "batch": batch, "fused": bool(getattr(dec, "fused", False)),
        "steps": counter.steps, "kv_len": dec.round_len(dec.kv_len),
        "per_layer": per["model.layers"] / layers, "model_other": per["model.other"],
        "model": per["model.layers"] + per["model.other"], "sampler": per["sampler"],
        "bookkeeping": per["bookkeeping"], "total": sum(per.values()),
        "triton": {k: counter.triton[k] / steps for k in COMPONENTS},
    }
    if device.startswith("cuda"):
        out["profiler_kernels"] = _profiler_kernels(model, prompts, rows, backend, tokens)
    return out


def table(results: list[dict]) -> str:
    head = (f"{'backend':<10} {'B':>4} {'fused':>5} {'per layer':>9} {'model other':>11} "
            f"{'model':>7} {'sampler':>7} {'bookkeep':>8} {'total':>7} {'profiler':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        prof = r.get("profiler_kernels")
        lines.append(
            f"{r['backend']:<10} {r['batch']:>4} {'yes' if r['fused'] else 'no':>5} "
            f"{r['per_layer']:>9.1f} {r['model_other']:>11.1f} {r['model']:>7.1f} "
            f"{r['sampler']:>7.1f} {r['bookkeeping']:>8.1f} {r['total']:>7.1f} "
            f"{'-' if prof is None else f'{prof:.1f}':>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", nargs="+", default=["reference", "triton"],
                    choices=["reference", "triton"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model for a smoke run")
    ap.add_argument("--layers", type=int, help="override num_hidden_layers")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=3, help="tokens per row (steps + 1)")
    ap.add_argument("--out", default="bench_launches",
                    help="result name under benchmarks/results/, or a .json path")
    args = ap.parse_args(argv)
    fields = dict(ARTICLE.to_dict(), **(TINY if args.tiny else {}))
    if args.layers:
        fields["num_hidden_layers"] = args.layers
    config = LlamaConfig.from_dict(fields)
    model = build(config, args.device)
    results = []
    for batch in args.batches:
        for backend in args.backends:
            results.append(count_step(model, batch, backend, prompt_len=args.prompt_len,
                                      tokens=args.tokens))
    print(table(results))
    payload = {
        "kind": "bench_launches", **run_info(args.device), "config": config.to_dict(),
        "dtype": str(model.lm_head.weight.dtype), "prompt_len": args.prompt_len,
        "tokens": args.tokens, "results": results,
        "notes": ["kernels per decode step: aten ops (non-view, non-allocating) plus Triton "
                  "launches, counted per component; profiler_kernels: CUDA kernels per step "
                  "by torch.profiler (None off CUDA)"],
    }
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
