"""Nothing inside the region the engine captures as a CUDA graph waits for the GPU.

A host sync inside a capture (``.item()``, ``bool(t)``, ``nonzero``, a copy to the CPU) makes
the capture fail on a GPU, or, worse, bakes one step's values into every replay. Without a
GPU this is checked on the ``meta`` device: the model, its cache and the engine's state live
there, the engine's step runs exactly as it would be captured, and a dispatch mode records
every op that would need the host to wait, and every tensor made on the CPU. The Triton
launches themselves are replaced by no-ops (they cannot run on ``meta``); every torch op
around them, the launcher's set-up included, runs and is checked.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmgen_fast import SamplingParams
from lmgen_fast.core.params import PackedParams
from lmgen_fast.engine.plan import RunOptions
from lmgen_fast.engine.slots import open_slots
from lmgen_fast.engine.state import DeviceState
from lmgen_fast.engine.static import StaticRun
from lmgen_fast.models import fused_step
from lmgen_fast.models.decoder import wrap
from lmgen_fast.runtime import graphs, reset_failure
from lmgen_fast.sampling import kernel as kernel_sampler
from lmgen_fast.sampling import reference

from conftest import StandInGraph, random_model, require_kernel_runtime

aten = torch.ops.aten
# Ops that wait for the device, or whose output shape depends on the data.
SYNCING = {
    aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
    aten.nonzero.default, aten.masked_select.default, aten.unique_dim.default,
    aten._unique.default, aten._unique2.default, aten.unique_consecutive.default,
    aten.argwhere.default, aten.item.default, aten.bincount.default,
    aten.nonzero_numpy.default,
}
# Ops that sync only for some arguments: a boolean index (its shape is its count of True)
# and repeat_interleave without output_size.
BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                aten._index_put_impl_.default}
REPEATS = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}


def waits(func, args, kwargs) -> bool:
    """Whether ``func`` on these arguments would make the host wait for the device."""
    if func in SYNCING:
        return True
    if func in BOOL_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in indices)
    if func in REPEATS:
        return kwargs.get("output_size") is None
    return False


class HostWaits(TorchDispatchMode):
    """Records each op that would make the host wait for the device, and each op whose
    output lands on the CPU (a copy back, or a tensor made on the host)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if waits(func, args, kwargs):
            self.found.append(f"{func} (waits for the device)")
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                self.found.append(f"{func} -> CPU tensor {tuple(o.shape)}")
        return out


class CheckedCapture(StandInGraph):
    """A stand-in CUDA graph: the warm-up runs the step, the capture runs it again under
    :class:`HostWaits`."""

    found: list[str] = []
    captures = 0

    def capture(self, fn):
        with HostWaits() as mode:
            fn()
        CheckedCapture.found += mode.found
        CheckedCapture.captures += 1

    def replay(self):
        pass  # the step was checked when it was captured


def kernel_modules() -> list:
    """Every module of ``lmgen_fast.kernels``."""
    import lmgen_fast.kernels as pkg

    return [importlib.import_module(f"{pkg.__name__}.{m.name}")
            for m in pkgutil.iter_modules(pkg.__path__)]


class NoLaunch:
    """A Triton kernel that launches nothing (meta tensors hold no data)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


LAYOUTS = {
    "plain": [SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0.0, seed=2)],
    "penalties": [SamplingParams(temperature=0.9, top_k=5, repetition_penalty=1.3,
                                 repetition_penalty_range=4, seed=3),
                  SamplingParams(frequency_penalty=0.4, presence_penalty=0.2,
                                 penalty_mode="once", seed=4)],
    "top-p and min-p": [SamplingParams(top_k=0, top_p=0.8, seed=5),
                        SamplingParams(top_k=10, top_p=0.9, min_p=0.05, seed=6)],
    "unseeded": [SamplingParams(temperature=1.1), SamplingParams(top_k=3)],
    # A batch of one: the reference's CPU path would call torch.multinomial here.
    "one unseeded row": [SamplingParams(temperature=0.7, top_p=0.9, min_p=0.02)],
}


@pytest.fixture
def meta_engine(monkeypatch):
    monkeypatch.setattr(graphs, "graph_backend", lambda device: CheckedCapture)
    CheckedCapture.found, CheckedCapture.captures = [], 0
    reset_failure()
    return CheckedCapture


def _no_kernel_launches(monkeypatch) -> set[str]:
    """Every Triton kernel of the package launches nothing (meta tensors): the sampler's
    set-up, chunk and merge, the fused decode step's, the bookkeeping. Returns their names."""
    require_kernel_runtime()  # the launcher checks it runs where the tensors are
    monkeypatch.setattr(kernel_sampler, "check_device", lambda logits: None)
    monkeypatch.setattr(fused_step, "_triton_runs_on", lambda device: True)
    stubbed = set()
    for mod in kernel_modules():
        for name in dir(mod):
            if name.endswith("_kernel"):
                monkeypatch.setattr(mod, name, NoLaunch())
                stubbed.add(name)
    return stubbed


@pytest.mark.parametrize("logprobs", [False, True], ids=["tokens", "logprobs"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_the_captured_step_never_waits_for_the_device(meta_engine, monkeypatch, backend,
                                                      layout, logprobs):
    if backend == "triton":
        stubbed = _no_kernel_launches(monkeypatch)
        assert {"setup_kernel", "chunk_kernel", "merge_kernel", "bookkeeping_kernel",
                "add_rmsnorm_kernel"} <= stubbed
    model = random_model(64, seed=1).to("meta")
    decoder = wrap(model)
    decoder.kv_block = 4  # a new KV bucket, hence a capture, every few steps
    rows = LAYOUTS[layout]
    prompts = [[1, 2, 3], [4, 5]][: len(rows)]
    run = StaticRun(decoder, prompts, rows, [12] * len(rows),
                    RunOptions(2, backend, return_logprobs=logprobs))
    assert run.state.layout.kernel == (backend == "triton")
    assert getattr(decoder, "fused", False) == (backend == "triton")  # the fused step, checked
    assert run.stepper.graph_cls is CheckedCapture
    run.state.sample(run.first_logits, run.width(0))
    for step in range(1, 10):
        run.advance(step)
    assert meta_engine.captures >= 2
    assert getattr(decoder, "fused", False) == (backend == "triton")  # it did not fall back
    assert meta_engine.found == []


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_steps_between_slot_refills_never_wait_for_the_device(meta_engine, monkeypatch,
                                                              backend):
    """Continuous batching: rows admitted into some slots and others parked (host work at a
    check), then captured steps over the mixed slots stay sync-free."""
    if backend == "triton":
        _no_kernel_launches(monkeypatch)
    decoder = wrap(random_model(64, seed=1).to("meta"))
    decoder.kv_block = 4
    rows = LAYOUTS[sorted(LAYOUTS)[-1]] * 3
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]] * 2
    run = open_slots(decoder, prompts[: len(rows)], rows, [12] * len(rows),
                     RunOptions(2, backend), 2)
    seat = run.seating
    assert run.stepper.graph_cls is CheckedCapture
    seat.refill(run.state, [0, 1], 0)  # a check's admission (host side, not captured)
    for step in range(0, 5):
        run.advance(step)
    seat.occupant[1] = None  # as a harvest leaves it (reading its tokens needs data)
    seat.refill(run.state, [1], 5)
    for step in range(5, 10):
        run.advance(step)
    captures = meta_engine.captures
    assert captures >= 2
    # The tail: no prompt waits and one row lives, so the batch compacts to it; the steps
    # of the smaller layout, captured anew, stay sync-free too.
    seat.queue.clear()
    seat.occupant[1] = None
    run.state = seat.compact(run.state)
    assert run.state.layout.batch == 1 and run.state is not decoder.engine_state
    seat.refill(run.state, [], 10)
    for step in range(10, 13):
        run.advance(step)
    assert meta_engine.captures > captures
    assert meta_engine.found == []


def test_the_check_finds_a_host_sync(meta_engine, monkeypatch):
    """The mode is not blind: a step that reads a value on the host is caught."""
    original = DeviceState.sample

    def syncing(self, logits, width):
        original(self, logits, width)
        if bool(self.done.any()):  # a host decision inside the step
            pass

    monkeypatch.setattr(DeviceState, "sample", syncing)
    model = random_model(64, seed=1).to("meta")
    decoder = wrap(model)
    run = StaticRun(decoder, [[1, 2]], [SamplingParams(seed=1)], [6],
                    RunOptions(2, "reference"))
    with pytest.raises(RuntimeError, match="meta"):  # no values to read, even warming up
        run.advance(1)
    mode = HostWaits()
    with mode, pytest.raises(RuntimeError, match="meta"):
        syncing(run.state, run.first_logits, 0)
    assert any("_local_scalar_dense" in f or "is_nonzero" in f for f in mode.found)


def meta_inputs(batch: int, vocab: int, width: int):
    logits = torch.empty(batch, vocab, device="meta")
    window = torch.empty(batch, width, dtype=torch.int64, device="meta")
    steps = torch.empty(batch, dtype=torch.int64, device="meta")
    rows = [SamplingParams(seed=1, top_k=5, top_p=0.9, repetition_penalty=1.2, logprobs=3),
            SamplingParams(temperature=0.0, frequency_penalty=0.5),
            SamplingParams(top_k=0, min_p=0.1)]
    packed = PackedParams.from_rows(rows[:batch], "cpu").to("meta")
    return logits, packed, window, steps


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("width", [0, 4])
def test_reference_sample_off_the_cpu_never_waits(batch, width):
    """The public entry point picks the device path for tensors off the CPU; unchecked, it
    waits for nothing, top alternatives included (the engine does not capture those yet)."""
    logits, packed, window, steps = meta_inputs(batch, 64, width)
    with HostWaits() as mode:
        res = reference.sample(logits, packed, window, step=steps, return_logprobs=True,
                               check=False)
    assert mode.found == []
    assert res.tokens.shape == (batch,) and res.tokens.device.type == "meta"
    assert res.status.dtype == torch.int32
    assert res.logprobs.top_ids.shape == (batch, 3)


def test_the_cpu_path_on_the_same_inputs_is_flagged():
    """The mode flags the host decisions of the CPU path (which is why the device path
    exists): forced onto meta tensors it stops at its first one."""
    logits, packed, window, steps = meta_inputs(3, 64, 4)
    mode = HostWaits()
    with mode, pytest.raises((RuntimeError, NotImplementedError)):
        reference.sample(logits, packed, window, step=steps, check=False, on_device=False)
    assert mode.found and "waits for the device" in mode.found[0]


@pytest.mark.parametrize("op", ["bool index", "repeat_interleave", "copy to cpu", "item"])
def test_the_mode_flags_each_kind_of_host_wait(op):
    x = torch.empty(4, 6, device="meta")
    mode = HostWaits()
    with mode, contextlib.suppress(RuntimeError, NotImplementedError):
        if op == "bool index":
            x[x > 0]
        elif op == "repeat_interleave":
            torch.repeat_interleave(torch.ones(3, dtype=torch.int64, device="meta"))
        elif op == "copy to cpu":
            torch.empty(4, 6).copy_(x)
        else:
            x.sum().item()
    assert mode.found, op
    with HostWaits() as fine:  # the fixed-shape forms pass
        torch.where(x > 0, x, 0.0)
        torch.repeat_interleave(torch.ones(3, dtype=torch.int64, device="meta"),
                                output_size=3)
    assert fine.found == []
