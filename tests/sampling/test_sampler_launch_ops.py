"""The Triton sampler's launch path runs no torch op of its own per step: on parameters packed
by ``PackedParams.from_rows`` (what the engine keeps), with the penalty powers kept by the
caller, a launch allocates its buffers and launches its kernels, nothing else (no copy
kernel before the kernels on CUDA, nothing to capture in a graph but the kernels).

The kernels are stubbed out (they are counted, not run): the tokens they draw are tested
against the reference in test_kernel*.py and test_sampler_setup.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmgen_fast import SamplingParams
from lmgen_fast.core.params import PackedParams
from lmgen_fast.sampling import kernel_launch

# Ops that allocate without launching anything on a device (views are told by is_view).
ALLOCATIONS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
               "aten::new_empty_strided", "aten::lift_fresh"}


class OpLog(TorchDispatchMode):
    """The aten ops run under it that neither allocate nor view (each a kernel on CUDA)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func._schema.name not in ALLOCATIONS:
            self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def launched(monkeypatch) -> list[tuple[str, tuple]]:
    """Stands in for the sampler's kernels: each launch is recorded (name, arguments)."""
    calls: list[tuple[str, tuple]] = []

    class Stub:
        def __init__(self, name: str):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append((self.name, args))

    monkeypatch.setattr(kernel_launch, "kernel", Stub)
    return calls


ROWS = [
    SamplingParams(temperature=0.8, top_k=50, repetition_penalty=1.1, penalty_mode="once",
                   seed=1),
    SamplingParams(temperature=1.0, top_k=0, top_p=0.9, min_p=0.05, frequency_penalty=0.3,
                   presence_penalty=0.1, logprobs_mode="processed", seed=2),
    SamplingParams(temperature=0.0, seed=3),
]


def engine_args(width: int, history: bool):
    gen = torch.Generator().manual_seed(width)
    batch, vocab = len(ROWS), 5000
    packed = PackedParams.from_rows(ROWS, "cpu")
    logits = torch.randn(batch, vocab, generator=gen)
    steps = torch.randint(0, 100, (batch,), generator=gen)
    hist = torch.randint(0, vocab, (batch, 32), generator=gen)
    hlen = torch.tensor([5, 32, 0])
    ranges = torch.tensor([0, 8, 4])
    if width == 0:
        window = None
    elif history:
        window = kernel_launch.HistoryWindow(hist, hlen, ranges, width)
    else:
        window = hist[:, :width].contiguous()
    pow_table = kernel_launch.penalty_powers(packed.penalty, width)
    return logits, packed, window, steps, pow_table


@pytest.mark.parametrize("width,history", [(0, False), (16, True), (7, False)])
@pytest.mark.parametrize("logprobs", [False, True])
def test_a_launch_on_packed_params_runs_no_torch_op(launched, width, history, logprobs):
    logits, packed, window, steps, pow_table = engine_args(width, history)
    out = torch.empty(logits.shape[0], kernel_launch.LOGPROB_COLUMNS) if logprobs else None
    with OpLog() as log:
        kernel_launch.launch(logits, packed, window, steps, max_top_k=50, draw_seeds=False,
                             nucleus_candidates=64, logprob_out=out, pow_table=pow_table)
    assert log.ops == []
    assert [name for name, _ in launched] == ["setup_kernel", "chunk_kernel", "merge_kernel"]
    # The kernels read the packed tensors themselves, not copies of them.
    for name, args in launched[1:]:
        for field in ("temperature", "top_k", "once", "top_p", "min_p_log",
                      "frequency_penalty", "presence_penalty", "processed"):
            assert any(a is getattr(packed, field) for a in args), (name, field)


def test_parameters_packed_in_other_dtypes_are_converted_once_each(launched):
    """The log sees copies where there are some: parameters in other dtypes are converted,
    one op each, and the kernels get the dtypes they take."""
    logits, packed, window, steps, pow_table = engine_args(7, False)
    other = replace(packed, top_p=packed.top_p.float(), processed=packed.processed.to(torch.int8))
    with OpLog() as log:
        kernel_launch.launch(logits, other, window, steps, max_top_k=50, draw_seeds=False,
                             pow_table=pow_table)
    assert log.ops == ["aten::_to_copy"] * 2
    want = dict(kernel_launch.KERNEL_PARAMS)
    got = kernel_launch.kernel_params(other, logits.device)
    assert [t.dtype for t in got] == list(want.values())
    assert torch.equal(got[3], packed.top_p.float().double())
    assert torch.equal(got[7], packed.processed)


def test_a_launch_with_bias_masks_and_a_bitmask_runs_no_torch_op(launched):
    """SPEC section 7's constraints (engine-packed, a grammar row among them) are read by
    the kernels from the packed tensors and the caller's bitmask: still no op per step."""
    rows = [replace(ROWS[0], logit_bias={7: 1.0, 4000: -2.0}), replace(ROWS[1], min_tokens=3),
            replace(ROWS[2], allowed_token_ids=[1, 2, 3]), SamplingParams(regex="a+", seed=4)]
    packed = PackedParams.from_rows(rows, "cpu", end_ids=(2,), vocab_size=5000)
    logits = torch.randn(len(rows), 5000)
    bitmask = torch.full((len(rows), 157), -1, dtype=torch.int32)
    steps = torch.zeros(len(rows), dtype=torch.int64)
    with OpLog() as log:
        kernel_launch.launch(logits, packed, None, steps, max_top_k=50, draw_seeds=False,
                             token_bitmask=bitmask)
    assert log.ops == []
    for name, args in launched[1:]:
        for t in (packed.constraints, packed.min_tokens, packed.bias_ids, packed.bias_vals,
                  packed.allowed, packed.stop_ids, bitmask):
            assert any(a is t for a in args), name
