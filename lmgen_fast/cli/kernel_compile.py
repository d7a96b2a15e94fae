"""Ahead-of-time compilation of the package's Triton kernels for a GPU, on any machine.

A kernel that only the interpreter accepts, or only a newer Triton, or that spills registers,
would otherwise first show itself on a user's GPU. This module compiles every kernel the
launchers can choose, as ``triton.compile`` would on an H100/H200 (``sm_90a``) or an A100
(``sm_80``), without a GPU: Triton ships ``ptxas``, whose ``-v`` report gives registers and
spills. The variants come from the launcher's own planning (:func:`~lmgen_fast.
sampling.launch_plan.plan_launch` and :func:`~lmgen_fast.sampling.kernel_launch.kernel_calls`,
run on ``meta`` tensors), so the compiled signatures are the ones a launch would build.

Run it as a script (the tests do, in a subprocess without ``TRITON_INTERPRET``, optionally
with another Triton first on ``PYTHONPATH``)::

    python -m lmgen_fast.cli.kernel_compile --arch 90 --json out.json

Each record: kernel, variant, arch, compile seconds, registers, spill bytes (stores and
loads), shared memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lmgen_fast.core.params import PackedParams, SamplingParams
from lmgen_fast.engine import bookkeeping as bk
from lmgen_fast.models import fused_mlp
from lmgen_fast.runtime.launch import KernelCall
from lmgen_fast.sampling import kernel_launch, launch_plan

# Vocabularies that cover the planner's regimes: the embedded model (one chunk), GPT-2 (a
# chunk count not a power of two), Llama-2 and Llama-3. Every top-k bound is scanned.
VOCABS = (4096, 50257, 32000, 128256)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_PTR_TYPES = {
    torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
    torch.float64: "*fp64", torch.int64: "*i64", torch.int32: "*i32", torch.int8: "*i8",
    torch.bool: "*i1",
}


@dataclass(frozen=True)
class Variant:
    """One specialisation of one kernel: what ``triton.compile`` is given."""

    kernel: str
    signature: tuple[tuple[str, str], ...]  # (argument, Triton type or "constexpr")
    constexprs: tuple[tuple[str, object], ...]
    divisible: tuple[int, ...]  # arguments specialised as divisible by 16
    options: tuple[tuple[str, object], ...]
    path: tuple  # the code path: the constexpr branches and the dtypes

    def label(self) -> str:
        c = dict(self.constexprs)
        keys = [self.path[1][0][1:]] + [f"{k}={c[k]}" for k in c]
        return f"{self.kernel}[{','.join(keys)},warps={dict(self.options)['num_warps']}]"


@dataclass
class Report:
    kernel: str
    variant: str
    arch: int
    seconds: float
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    path: str


def _arg_type(value) -> tuple[str, object | None]:
    """Triton's type for one launch argument as the JIT specialises it (ints equal to 1
    become constants), plus the constant value where there is one."""
    if isinstance(value, torch.Tensor):
        return _PTR_TYPES[value.dtype], None
    if isinstance(value, bool):
        return "i1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        return ("i32" if -2**31 <= value < 2**31 else "i64"), None
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _variant(fn, call: KernelCall) -> Variant:
    names = fn.arg_names
    sig, consts, div = [], dict(call.constexprs), []
    for i, (name, value) in enumerate(zip(names, call.args, strict=False)):
        ty, const = _arg_type(value)
        sig.append((name, ty))
        if const is not None:
            consts[name] = const
        elif isinstance(value, torch.Tensor) or (
                isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0):
            # torch allocations are 16-byte aligned, so a launch sees every pointer so.
            div.append(i)
    for name in call.constexprs:
        sig.append((name, "constexpr"))
    ptr_dtypes = tuple(ty for ty in (t for _, t in sig) if ty.startswith("*"))[:1]
    # Constexpr branches, and arguments the JIT turns into the constant 1 (one chunk).
    branches = tuple((k, v) for k, v in consts.items()
                     if isinstance(v, bool) or k not in call.constexprs)
    return Variant(call.name, tuple(sig), tuple(consts.items()), tuple(div),
                   tuple(sorted(call.options.items())), (call.name, ptr_dtypes, branches))


def launch_plans(vocab: int) -> dict[launch_plan.LaunchPlan, int]:
    """Every plan :func:`~lmgen_fast.sampling.launch_plan.plan_launch` makes on CUDA for
    ``vocab``, over every batch top-k bound and top-p/min-p on or off, with the first bound
    that yields it."""
    plans: dict[launch_plan.LaunchPlan, int] = {}
    for nucleus in (0, launch_plan.NUCLEUS_CANDIDATES):
        for top_k in range(vocab):
            lp = launch_plan.plan_launch(vocab, top_k, cuda=True, nucleus_candidates=nucleus)
            plans.setdefault(lp, top_k)
    return plans


def sampler_variants() -> list[Variant]:
    """Every distinct specialisation of the sampler kernels that :func:`~lmgen_fast.
    sampling.kernel_launch.launch` can choose on CUDA: each plan of :func:`launch_plans` for
    :data:`VOCABS`, each logits dtype of :data:`DTYPES`, log-probabilities on and off."""
    kernel_calls = kernel_launch.kernel_calls
    seen: dict[tuple, Variant] = {}
    batch = 2
    for vocab in VOCABS:
        for lp, top_k in launch_plans(vocab).items():
            for dtype in DTYPES:
                for logprobs in (False, True):
                    logits = torch.empty(batch, vocab, dtype=dtype, device="meta")
                    packed = PackedParams.from_rows([SamplingParams(top_k=top_k, seed=0)] * batch,
                                                    "meta")
                    window = torch.full((batch, 8), -1, dtype=torch.int64, device="meta")
                    steps = torch.zeros(batch, dtype=torch.int64, device="meta")
                    out = torch.empty(batch, 4, device="meta") if logprobs else None
                    calls, _, _ = kernel_calls(logits, packed, window, steps, packed.seed,
                                               lp, out, cuda=True)
                    # The set-up for the engine's window (read from the history) and for a
                    # given one, short and wide enough for its largest tiles.
                    for width in (16, 4096):
                        hist = torch.empty(batch, width, dtype=torch.int64, device="meta")
                        for win in (kernel_launch.HistoryWindow(hist, steps, steps, width),
                                    hist):
                            calls += kernel_calls(logits, packed, win, steps, packed.seed, lp,
                                                  out, cuda=True)[0][:1]
                    for call in calls:
                        v = _variant(kernel_launch.kernel(call.name), call)
                        seen.setdefault((v.kernel, v.signature, v.constexprs, v.options), v)
    for call in masked_calls(batch):
        v = _variant(kernel_launch.kernel(call.name), call)
        seen.setdefault((v.kernel, v.signature, v.constexprs, v.options), v)
    return list(seen.values())


def masked_calls(batch: int) -> list[KernelCall]:
    """The chunk and merge kernels with SPEC section 7's bias and masks compiled in
    (``MASKS``), in their heaviest branch (log-probabilities on), for the default plan
    (top-k 50) of the largest vocabulary, per logits dtype: the code a bias, an allowed set
    or a token bitmask adds, checked for registers and spills without doubling the list."""
    vocab = VOCABS[-1]
    lp = launch_plan.plan_launch(vocab, 50, cuda=True)
    rows = [SamplingParams(top_k=50, seed=0, logit_bias={1: 1.0, 2: 1.0},
                           allowed_token_ids=[1, 2], stop_token_ids=[3, 4])] * batch
    packed = PackedParams.from_rows(rows, "meta", vocab_size=vocab)
    steps = torch.zeros(batch, dtype=torch.int64, device="meta")
    window = torch.full((batch, 8), -1, dtype=torch.int64, device="meta")
    bitmask = torch.empty(batch, -(-vocab // 32), dtype=torch.int32, device="meta")
    out = torch.empty(batch, 4, device="meta")
    calls = []
    for dtype in DTYPES:
        logits = torch.empty(batch, vocab, dtype=dtype, device="meta")
        calls += kernel_launch.kernel_calls(logits, packed, window, steps, packed.seed, lp, out,
                                            cuda=True, token_bitmask=bitmask)[0][1:]
    return calls


def bookkeeping_variants() -> list[Variant]:
    """The bookkeeping kernel's specialisations (:mod:`lmgen_fast.engine.bookkeeping`): without
    log-probabilities, with them, and with top alternatives; each with the per-row stop ids
    the engine passes (one column: the end id alone)."""
    batch, cols, dev = 2, 64, "meta"

    def t(*shape, dtype=torch.int64):
        return torch.empty(batch, *shape, dtype=dtype, device=dev)

    seen: dict[tuple, Variant] = {}
    for logprobs, top_n in ((False, 0), (True, 0), (True, 5)):
        led = bk.Ledger(
            out=t(cols), token_lp=t(cols, dtype=torch.float32) if logprobs else None,
            top_ids=t(cols, top_n) if top_n else None,
            top_lp=t(cols, top_n, dtype=torch.float32) if top_n else None,
            hist=t(cols), hlen=t(), tokens=t(), step=t(), count=t(), max_tokens=t(),
            done=t(dtype=torch.bool), bad_step=t(), bad_bits=t(dtype=torch.int32))
        lp = t(3, dtype=torch.float32)
        call = bk.book_call(led, t(), t(dtype=torch.int32), t(1), lp[:, 0] if logprobs else None,
                            t(top_n) if top_n else None,
                            t(top_n, dtype=torch.float32) if top_n else None)
        v = _variant(_kernel_fn(call.name), call)
        seen.setdefault((v.kernel, v.signature, v.constexprs, v.options), v)
    return list(seen.values())


def _kernel_fn(name: str):
    """The JIT function ``name`` of whichever module of ``lmgen_fast.kernels`` holds it."""
    from lmgen_fast.kernels import bookkeeping as kb
    from lmgen_fast.kernels import decode as kd

    for mod in (kb, kd):
        if hasattr(mod, name):
            return getattr(mod, name)
    if name in fused_mlp.KERNELS:
        return fused_mlp.kernel(name)
    return kernel_launch.kernel(name)


def all_variants() -> list[Variant]:
    """Every kernel's variants: the sampler's, the decode step's, the bookkeeping's."""
    return sampler_variants() + decode_variants() + bookkeeping_variants()


def decode_variants() -> list[Variant]:
    """Every distinct specialisation of the decode-step kernels (:mod:`lmgen_fast.
    fused_ops`, :mod:`lmgen_fast.models.fused_mlp`) for the shapes of their
    ``compile_calls``.

    Their path also holds the head size; the other block shapes, the warps and the rotary
    tables' dtype (float32 or the model's) are not part of it:
    :func:`covering` keeps the heaviest shape of each path (most elements per thread), whose
    registers and spills bound the lighter ones' (the compile time of all 200-odd shapes
    would triple CI's).
    """
    from lmgen_fast.models import fused_ops

    seen: dict[tuple, Variant] = {}
    for call in fused_ops.compile_calls() + fused_mlp.compile_calls():
        v = _variant(_kernel_fn(call.name), call)
        v = Variant(v.kernel, v.signature, v.constexprs, v.divisible, v.options,
                    v.path + (dict(v.constexprs).get("HEAD_DIM"),))
        seen.setdefault((v.kernel, v.signature, v.constexprs, v.divisible, v.options), v)
    return list(seen.values())


def covering(variants: list[Variant]) -> list[Variant]:
    """One variant per code path (kernel, logits dtype, constexpr branches) and per launch
    shape ``(block sizes, warps)`` of the chunk kernel, the largest per thread first.

    Sizes that only change loop bounds or addressing compile to the same code shape; the
    per-thread work (block elements over threads) is what decides registers and spills, so
    the heaviest variant of each path stands for its group.
    """

    def weight(v: Variant) -> float:
        c = dict(v.constexprs)
        block = c.get("TILE", c.get("CHUNK", 1))
        if v.kernel == "setup_kernel":  # one-hot tiles of TB window slots by CPB buckets
            block = c["TB"] * c["CPB"]
        elif "TILE" not in c and "CHUNK" not in c:  # the decode kernels' tiles
            block = math.prod(x for k, x in c.items() if not isinstance(x, bool)
                              and (k.startswith("BLOCK") or k == "HEAD_DIM"))
        return block / dict(v.options)["num_warps"]

    groups: dict[tuple, Variant] = {}
    for v in variants:
        c = dict(v.constexprs)
        key = v.path
        if v.kernel == "chunk_kernel":
            key = key + (c["CHUNK"], dict(v.options)["num_warps"])
        if v.kernel == "setup_kernel":  # its one-hot tiles are [TB, CPB]
            key = key + (c["CPB"],)
        if v.kernel == "bookkeeping_kernel":  # the top alternatives' copy is a branch
            key = key + (c["TOP_N"] > 0,)
        if key not in groups or weight(v) > weight(groups[key]):
            groups[key] = v
    return list(groups.values())


def ptxas_path(arch: int) -> str:
    """The ``ptxas`` that Triton itself uses for ``sm_<arch>`` (it ships several)."""
    from triton.backends.nvidia import compiler as nvc

    try:
        return nvc.get_ptxas(arch).path
    except TypeError:  # Triton versions with one ptxas for every arch
        return nvc.get_ptxas().path


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_report(ptx: str, arch: int) -> tuple[int, int, int, int]:
    """``(registers, spill store bytes, spill load bytes, shared bytes)`` from ``ptxas -v``."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={gpu}", str(src),
                               "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, check=True)
    text = proc.stderr + proc.stdout
    regs, spill, smem = _REGS.search(text), _SPILL.search(text), _SMEM.search(text)
    return (int(regs.group(1)), int(spill.group(1)), int(spill.group(2)),
            int(smem.group(1)) if smem else 0)


def compile_variant(fn, v: Variant, arch: int) -> Report:
    """Compile ``v`` of JIT function ``fn`` for ``sm_<arch>`` and read its ``ptxas`` report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i in v.divisible}
    src = ASTSource(fn, dict(v.signature), dict(v.constexprs), attrs)
    t0 = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(v.options))
    seconds = time.perf_counter() - t0
    regs, st, ld, smem = ptxas_report(compiled.asm["ptx"], arch)
    return Report(v.kernel, v.label(), arch, round(seconds, 2), regs, st, ld, smem,
                  repr(v.path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90")
    ap.add_argument("--all", action="store_true", help="every variant, not one per code path")
    ap.add_argument("--list", action="store_true", help="print the variants, compile nothing")
    ap.add_argument("--json", help="write the reports here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    import triton

    variants = all_variants()
    chosen = variants if args.all else covering(variants)
    if args.list:
        for v in chosen:
            print(v.label())
        print(f"{len(chosen)} of {len(variants)} variants", file=sys.stderr)
        return 0
    reports = []
    for arch in args.arch or [90]:
        for v in chosen:
            r = compile_variant(_kernel_fn(v.kernel), v, arch)
            reports.append(asdict(r))
            print(f"sm_{arch} {r.variant}: {r.seconds:.1f} s, {r.registers} registers, "
                  f"spills {r.spill_stores}/{r.spill_loads} B", file=sys.stderr, flush=True)
    result = {"triton": triton.__version__, "variants": len(variants), "reports": reports}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    else:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
