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

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmgen_fast import SamplingParams, engine, fused_step, kernel_sampler
from lmgen_fast.decoder import wrap

from conftest import random_model, require_kernel_runtime

aten = torch.ops.aten
# Ops that wait for the device, or whose output shape depends on the data.
SYNCING = {
    aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
    aten.nonzero.default, aten.masked_select.default, aten.unique_dim.default,
    aten._unique2.default, aten.repeat_interleave.Tensor, aten.argwhere.default,
    aten.item.default,
}


class HostWaits(TorchDispatchMode):
    """Records each op that would make the host wait for the device, and each op whose
    output lands on the CPU (a copy back, or a tensor made on the host)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING:
            self.found.append(f"{func} (waits for the device)")
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                self.found.append(f"{func} -> CPU tensor {tuple(o.shape)}")
        return out


class CheckedCapture:
    """A stand-in CUDA graph: the warm-up runs the step, the capture runs it again under
    :class:`HostWaits`."""

    found: list[str] = []
    captures = 0

    def __init__(self, state):
        pass

    @staticmethod
    def warm(fn):
        fn()

    def capture(self, fn):
        with HostWaits() as mode:
            fn()
        CheckedCapture.found += mode.found
        CheckedCapture.captures += 1

    def replay(self):
        pass  # the step was checked when it was captured


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
}


@pytest.fixture
def meta_engine(monkeypatch):
    monkeypatch.setattr(engine, "_graph_backend", lambda device: CheckedCapture)
    CheckedCapture.found, CheckedCapture.captures = [], 0
    kernel_sampler.reset_failure()
    return CheckedCapture


@pytest.mark.parametrize("logprobs", [False, True], ids=["tokens", "logprobs"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_the_captured_step_never_waits_for_the_device(meta_engine, monkeypatch, backend,
                                                      layout, logprobs):
    if backend == "triton":
        require_kernel_runtime()  # the launcher checks it runs where the tensors are
        ks = kernel_sampler._kernels()
        monkeypatch.setattr(ks, "chunk_kernel", NoLaunch())
        monkeypatch.setattr(ks, "merge_kernel", NoLaunch())
        monkeypatch.setattr(kernel_sampler, "check_device", lambda logits: None)
        from lmgen_fast.kernels import decode as kd

        monkeypatch.setattr(fused_step, "_triton_runs_on", lambda device: True)

        for name in dir(kd):  # the fused decode step's kernels as well
            if name.endswith("_kernel"):
                monkeypatch.setattr(kd, name, NoLaunch())
    model = random_model(64, seed=1).to("meta")
    decoder = wrap(model)
    decoder.kv_block = 4  # a new KV bucket, hence a capture, every few steps
    rows = LAYOUTS[layout]
    run = engine._Run(decoder, [[1, 2, 3], [4, 5]], rows, [12, 12], 2, backend, None,
                      logprobs, True, None)
    assert run.state.layout.kernel == (backend == "triton")
    assert getattr(decoder, "fused", False) == (backend == "triton")  # the fused step, checked
    assert run.graph_cls is CheckedCapture
    run.state.sample(run.first_logits, 0, run.width(0))
    for step in range(1, 10):
        run.advance(step)
    assert meta_engine.captures >= 2
    assert getattr(decoder, "fused", False) == (backend == "triton")  # it did not fall back
    assert meta_engine.found == []


def test_the_check_finds_a_host_sync(meta_engine, monkeypatch):
    """The mode is not blind: a step that reads a value on the host is caught."""
    original = engine._State.sample

    def syncing(self, logits, step, width):
        original(self, logits, step, width)
        if bool(self.done.any()):  # a host decision inside the step
            pass

    monkeypatch.setattr(engine._State, "sample", syncing)
    model = random_model(64, seed=1).to("meta")
    decoder = wrap(model)
    run = engine._Run(decoder, [[1, 2]], [SamplingParams(seed=1)], [6], 2, "reference", None,
                      False, True, None)
    with pytest.raises(RuntimeError, match="meta"):  # no values to read, even warming up
        run.advance(1)
    mode = HostWaits()
    with mode, pytest.raises(RuntimeError, match="meta"):
        syncing(run.state, run.first_logits, None, 0)
    assert any("_local_scalar_dense" in f or "is_nonzero" in f for f in mode.found)
