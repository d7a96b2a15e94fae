"""Kernels per decode step, by component (issue: "A decode step of at most 130 kernels").

    python benchmarks/bench_launches.py [--device cuda] [--backends reference triton]
                                        [--batches 1 64] [--contexts 16 512] [--tiny]
                                        [--measure] [--predict h200] [--out PATH]

Counts what one engine decode step (``Stepper.advance``: what a CUDA graph captures) launches,
for the article's configuration by default (hidden 768, 12 layers, 12 heads, 3 key/value
heads, vocabulary 50000; random weights, bfloat16 on CUDA, float32 on the CPU), split into
the model's layers (reported per layer), the rest of the model (embedding, final norm,
``lm_head``, the position update), the sampler and the engine's bookkeeping. Backend
"reference" is the eager path (``forward_cached`` and the reference sampler), "triton" the
fused decode step and the Triton sampler. ``--contexts``: prompt lengths, the slots the
attention reads (one split of the attention at 16, several at 512, each a launch more).

Counted on any device, without running on a GPU: every aten op that is not a view or an
allocation (each one kernel on CUDA), seen by a ``TorchDispatchMode``, plus every Triton
launch (``kernel[grid](...)`` of every kernel in ``lmgen_fast.kernels``; the aten ops the
interpreter runs inside a launch are not counted). An op whose schema may alias
(``aten::to``, ``reshape``) counts when its output is new memory: a ``.to(dtype)`` copy.
Each launch is recorded by kind: "cublas" (aten mm, addmm, bmm, linear...), "aten" (any
other op), "triton" (by kernel name). On CUDA also the profiler's count of device kernels
per step, and with ``--measure`` each kernel's time per step on replayed CUDA graphs.
``--predict h200``: each kernel's predicted time at the real shapes of the article's model
and Llama-3.2-1B (``launch_model.py`` says how; alone, it counts nothing else: about 10 s on
the CPU). On the CPU the Triton backend runs in the interpreter (``TRITON_INTERPRET=1`` is
set here before triton is imported). Prints tables and writes JSON (kind
``bench_launches``) under ``benchmarks/results/``.
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
import launch_model  # noqa: E402

from lmgen_fast.core.params import SamplingParams  # noqa: E402
from lmgen_fast.engine import generate as engine  # noqa: E402
from lmgen_fast.engine.stepper import Stepper  # noqa: E402
from lmgen_fast.models import LlamaConfig, LlamaForPretraining  # noqa: E402
from lmgen_fast.models.decoder import CachedLlamaDecoder, wrap  # noqa: E402
from lmgen_fast.models.fused_ops import plan_attention  # noqa: E402
from lmgen_fast.models.fused_step import FusedLlamaStep  # noqa: E402
from lmgen_fast.sampling import kernel as kernel_sampler  # noqa: E402
from lmgen_fast.sampling import reference  # noqa: E402

from _common import run_info, sync, write_json  # noqa: E402

# bench_decode's sampling: temperature 0.8, top-k 50, repetition penalty 1.1 once per token.
ROW = SamplingParams(temperature=0.8, top_k=50, repetition_penalty=1.1,
                     repetition_penalty_range=0, penalty_scope="all", penalty_mode="once")
NO_EOT = -1
ARTICLE = LlamaConfig()  # hidden 768, 12 layers, 12 heads, 3 key/value heads
# The predictions' small model: the fused step's kernels per layer, each matrix width
# distinct (launch_model.real_dim maps them to the real model's), 2 layers.
STRUCTURE = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512)
# Ops that allocate or alias without launching anything on CUDA.
_FREE = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
         "aten::new_empty_strided", "aten::lift_fresh", "aten::set_", "aten::resize_"}
# The aten ops that run as cuBLAS calls on CUDA (F.linear reaches aten as mm or addmm).
CUBLAS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear",
          "aten::matmul", "aten::mv", "aten::addmv", "aten::addbmm", "aten::_addmm_activation"}
COMPONENTS = ("model.layers", "model.other", "sampler", "bookkeeping")


class LaunchCounter(TorchDispatchMode):
    """Counts kernels by the label in force while counting is on.

    ``counts[label]``: aten ops (non-view, non-allocating) plus Triton launches;
    ``triton[label]``: the Triton launches alone; ``events``: every counted launch in
    order, a dict of ``component`` (the label), ``kind`` ("cublas", "aten" or "triton"),
    ``name`` (the aten op, e.g. ``aten::_to_copy`` for a ``.to(dtype)``, or the Triton
    kernel), ``bytes`` (of the distinct tensors it was given and returned) and, for a
    matmul, ``mm`` (its ``[K, N]``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.label = "bookkeeping"
        self.active = False
        self.paused = 0  # inside a Triton launch (the interpreter's own torch ops)
        self.counts: Counter[str] = Counter()
        self.triton: Counter[str] = Counter()
        self.events: list[dict] = []
        self.step_starts: list[int] = []
        self.steps = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        # An op whose schema may alias (aten::to, reshape, contiguous) launched a copy when
        # its output is new memory: `.to(dtype)` reaches the mode as aten::to, a "view" by
        # its schema, and the aten::_to_copy inside it is not dispatched to the mode again.
        view = func.is_view and _aliases(out, (args, kwargs))
        if self.active and not self.paused and not view and name not in _FREE:
            self.counts[self.label] += 1
            kind = "cublas" if name in CUBLAS else "aten"
            event = dict(component=self.label, kind=kind, name=name,
                         bytes=_tensor_bytes((args, kwargs, out)))
            mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
            if kind == "cublas" and len(mats) >= 2:  # (input, weight): the weight's [K, N]
                weight = mats[1] if name == "aten::linear" else mats[-1]
                shape = weight.shape[-2:]  # linear's weight is [N, K]; mm's operand [K, N]
                event["mm"] = list(shape[::-1] if name == "aten::linear" else shape)
            self.events.append(event)
        return out

    @contextlib.contextmanager
    def labelled(self, label: str) -> Iterator[None]:
        before, self.label = self.label, label
        try:
            yield
        finally:
            self.label = before

    def launch(self, name: str, args: tuple) -> None:
        if self.active:
            self.counts[self.label] += 1
            self.triton[self.label] += 1
            self.events.append(dict(component=self.label, kind="triton", name=name,
                                    bytes=_tensor_bytes(args)))


def _tensors(tree) -> list[torch.Tensor]:
    """The tensors in ``tree`` (nested tuples, lists, dicts)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for x in tree for t in _tensors(x)]
    if isinstance(tree, dict):
        return [t for x in tree.values() for t in _tensors(x)]
    return []


def _aliases(out, inputs) -> bool:
    """Whether every tensor ``out`` holds lives in the memory of a tensor of ``inputs``."""
    ptrs = {t.untyped_storage().data_ptr() for t in _tensors(inputs)}
    outs = _tensors(out)
    return all(t.untyped_storage().data_ptr() in ptrs for t in outs)


def _tensor_bytes(tree) -> int:
    """Bytes of the distinct tensors in ``tree`` (nested tuples, lists, dicts), each once."""
    seen = {(t.data_ptr(), t.dtype, tuple(t.shape)): t.numel() * t.element_size()
            for t in _tensors(tree)}
    return sum(seen.values())


def _proxy_class(kernel, name: str) -> type:
    """A stand-in for a Triton kernel object that counts its launches. It carries the
    kernel's class name: kernel_sampler.check_device tells the interpreter's kernels from
    compiled ones by that name."""

    class Proxy:
        def __init__(self, fn, counter: LaunchCounter):
            self._fn, self._counter = fn, counter

        def __getitem__(self, grid):
            launcher = self._fn[grid]

            def run(*args, **kwargs):
                self._counter.launch(name, args)
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
                    counter.step_starts.append(len(counter.events))
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
                    proxy = _proxy_class(obj, name)
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
               tokens: int = 3, events: bool = False, measure: bool = False) -> dict:
    """Kernels per decode step of ``generate_ids`` on ``model`` (``tokens - 1`` steps) after
    prompts of ``prompt_len`` tokens (the context the attention reads).

    Returns
    -------
    dict
        ``per_layer``, ``model_other``, ``model``, ``sampler``, ``bookkeeping``, ``total``
        (per step, floats), ``triton`` (Triton launches per step by component), ``fused``
        (whether the fused decode step ran), ``kv_len``, ``context``, ``by_kind`` (launches
        per step: cublas, aten, triton), ``kernels`` (launches per step by aten op or Triton
        kernel name), ``step_events`` (with ``events``: the last step's launches, see
        :class:`LaunchCounter`), ``profiler_kernels`` (CUDA only) and ``measured`` (with
        ``measure``, CUDA only: see :func:`measure_kernels`).
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
        "context": prompt_len,
        "by_kind": {k: sum(e["kind"] == k for e in counter.events) / steps
                    for k in ("cublas", "aten", "triton")},
        "kernels": {k: v / steps for k, v in Counter(e["name"] for e in counter.events).items()},
    }
    if events:
        out["step_events"] = counter.events[counter.step_starts[-1]:]
    if device.startswith("cuda"):
        out["profiler_kernels"] = _profiler_kernels(model, prompts, rows, backend, tokens)
        if measure:
            out["measured"] = measure_kernels(model, prompts, rows, backend)
    return out


def measure_kernels(model, prompts, rows, backend: str, tokens: int = 17) -> dict:
    """Device time per decode step of each kernel, on replayed CUDA graphs (torch.profiler).

    Each run goes twice on one decoder, the second (profiled) replaying the graphs the first
    captured; a run of ``tokens`` minus a run of one, over ``tokens - 1`` steps.

    Returns
    -------
    dict
        ``{kernel name: {"kind", "launches", "us"}}``, launches and microseconds per step;
        ``kind`` "triton" (ours), "cublas" or "aten" (:func:`launch_model.measured_kind`).
    """
    from torch.profiler import ProfilerActivity, profile

    triton_names = {n for mod in kernel_modules() for n in vars(mod) if n.endswith("_kernel")}

    def kernels(n: int) -> dict[str, list]:
        dec = wrap(model)
        for profiled in (False, True):
            with profile(activities=[ProfilerActivity.CUDA]) if profiled \
                    else contextlib.nullcontext() as prof:
                engine.generate_ids(dec, prompts, rows, [n] * len(prompts), NO_EOT,
                                    backend=backend, cuda_graph=True)
                sync("cuda")
        agg: dict[str, list] = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA \
                    and "Memcpy" not in e.name and "Memset" not in e.name:
                a = agg.setdefault(e.name, [0, 0.0])
                a[0] += 1
                a[1] += e.time_range.elapsed_us()
        return agg

    long, short = kernels(tokens), kernels(1)
    steps = tokens - 1
    out = {}
    for name, (n, us) in long.items():
        n0, us0 = short.get(name, (0, 0.0))
        if n > n0:
            out[name] = dict(kind=launch_model.measured_kind(name, triton_names),
                             launches=(n - n0) / steps, us=max(us - us0, 0.0) / steps)
    return out


def predict(gpu: str, device: str, batches: tuple[int, ...] = (1, 64),
            context: int = 512) -> list[dict]:
    """Predicted per-kernel times of a decode step (:mod:`launch_model`) of the article's
    model and Llama-3.2-1B, at each batch and ``context``.

    Which kernels run is counted once per batch size, on :data:`STRUCTURE`, a small model
    with the same kernels per layer (under the interpreter off CUDA: seconds, not minutes),
    one step after a 16-token prompt: the batch picks the MLP's launches (one fused launch
    up to ``fused_mlp.use_fused_mlp`` rows, cuBLAS and SwiGLU above), the context changes
    only the attention's splits (the sampler's plan depends on the vocabulary and top-k),
    which :func:`launch_model.predict_step` takes from the real shapes' plan (bfloat16, as
    on a GPU). The bytes come from each real model's shapes.
    """
    config = LlamaConfig.from_dict(dict(ARTICLE.to_dict(), **STRUCTURE))
    small = launch_model.Shapes.of(config.to_dict())
    model = build(config, device)
    out = []
    for batch in batches:
        counted = count_step(model, batch, "triton", prompt_len=16, tokens=2, events=True)
        if not counted["fused"]:
            raise RuntimeError("the small model did not run the fused decode step")
        for name, real in launch_model.MODELS.items():
            splits = plan_attention(batch, real.kv_heads, real.heads // real.kv_heads,
                                    real.head_dim, context, torch.bfloat16).n_splits
            step = launch_model.predict_step(counted["step_events"], small, real, batch,
                                             context, splits, gpu)
            out.append(dict(model=name, gpu=gpu, batch=batch, context=context,
                            splits=splits, shapes=vars(real), **step))
    return out


def prediction_table(predicted: list[dict]) -> str:
    """Per kernel and per step, each model and batch (the RESULTS.md section's layout)."""
    lines = []
    for p in predicted:
        lines.append(f"{p['model']}  B={p['batch']}  context {p['context']}  "
                     f"({p['splits']} attention split{'s' if p['splits'] > 1 else ''}): "
                     f"{p['launches']} launches, {p['bytes'] / 1e6:.1f} MB, predicted "
                     f"{p['predicted_us']:.0f} us/step, HBM roofline {p['roofline_us']:.0f} us "
                     f"= {100 * p['roofline_share']:.0f}%")
        for k in p["kernels"]:
            lines.append(f"    {k['name']:<24} {k['kind']:<7} x{k['launches']:<4} "
                         f"{k['bytes'] / 1e6:>9.3f} MB {k['predicted_us']:>8.1f} us  "
                         f"({k['rule']})")
    return "\n".join(lines)


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
    ap.add_argument("--batches", nargs="+", type=int, default=None, help="default 1")
    ap.add_argument("--contexts", nargs="+", type=int, default=None,
                    help="prompt lengths, the slots the attention reads (default --prompt-len)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model for a smoke run")
    ap.add_argument("--layers", type=int, help="override num_hidden_layers")
    ap.add_argument("--qk-norm", action="store_true",
                    help="Qwen3's per-head q/k RMSNorm on every layer")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=3, help="tokens per row (steps + 1)")
    ap.add_argument("--predict", choices=sorted(launch_model.BANDWIDTH),
                    help="predicted per-kernel times on this GPU (alone: nothing counted on "
                    "the configured model)")
    ap.add_argument("--measure", action="store_true",
                    help="CUDA: each kernel's time per step on replayed graphs (triton)")
    ap.add_argument("--out", default="bench_launches",
                    help="result name under benchmarks/results/, or a .json path")
    args = ap.parse_args(argv)
    fields = dict(ARTICLE.to_dict(), **(TINY if args.tiny else {}))
    if args.layers:
        fields["num_hidden_layers"] = args.layers
    if args.qk_norm:
        fields["qk_norm"] = True
    config = LlamaConfig.from_dict(fields)
    count = not args.predict or args.measure or args.batches or args.contexts
    results = []
    if count:
        model = build(config, args.device)
        for context in args.contexts or [args.prompt_len]:
            for batch in args.batches or [1]:
                for backend in args.backends:
                    results.append(count_step(
                        model, batch, backend, prompt_len=context, tokens=args.tokens,
                        measure=args.measure and backend == "triton"))
        print(table(results))
    payload = {
        "kind": "bench_launches", **run_info(args.device), "config": config.to_dict(),
        "dtype": "torch.bfloat16" if args.device.startswith("cuda") else "torch.float32",
        "prompt_len": args.prompt_len, "tokens": args.tokens, "results": results,
        "notes": ["kernels per decode step: aten ops (non-view, non-allocating) plus Triton "
                  "launches, counted per component; profiler_kernels: CUDA kernels per step "
                  "by torch.profiler (None off CUDA); measured: microseconds per step of each "
                  "kernel on replayed CUDA graphs"],
    }
    if args.predict:
        payload["predicted"] = predict(args.predict, args.device)
        payload["notes"].append(
            f"predicted, not measured on a GPU: per kernel max(bytes / "
            f"{launch_model.BANDWIDTH[args.predict]:.1e} B/s, floor {launch_model.FLOOR_US}) "
            "(benchmarks/launch_model.py)")
        print(prediction_table(payload["predicted"]))
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    return payload

if __name__ == "__main__":
    main()
