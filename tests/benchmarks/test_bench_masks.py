"""bench_masks.py: SPEC section 7's constraints add no launch, and the bytes it reports are
those the chunk kernel's arguments hold (counted on the ``meta`` device, no GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_masks  # noqa: E402

from lmgen_fast.core.params import PackedParams, SamplingParams  # noqa: E402
from lmgen_fast.sampling import kernel_launch  # noqa: E402


def test_constraints_add_no_launch_and_their_bytes_are_counted(capsys):
    for vocab in (4096, 128256):
        assert bench_masks.launches(vocab, True) == bench_masks.launches(vocab, False) == [
            "setup_kernel", "chunk_kernel", "merge_kernel"]
    # A bitmask is one int32 word per 32 tokens: the allowed set's tensor, as packed.
    packed = PackedParams.from_rows([SamplingParams(allowed_token_ids=[5])], "meta",
                                    vocab_size=128256)
    args, masks = kernel_launch.constraint_args(packed, None)
    assert masks and packed.allowed.numel() * 4 == 128256 // 8
    plain = bench_masks.extra_bytes(128256, 0, allowed=False, bitmask=False, masked=True)
    with_allowed = bench_masks.extra_bytes(128256, 0, allowed=True, bitmask=False, masked=True)
    assert with_allowed - plain == packed.allowed.numel() * packed.allowed.element_size()
    _, off = kernel_launch.constraint_args(
        PackedParams.from_rows([SamplingParams(top_p=0.5)] * 2, "meta"), None)
    _, on = kernel_launch.constraint_args(
        PackedParams.from_rows([SamplingParams(min_tokens=3), SamplingParams()], "meta"), None)
    assert on and not off  # rows without constraints compile no mask code in
    assert bench_masks.extra_bytes(128256, 0, allowed=False, bitmask=False,
                                   masked=False) == 0
    assert bench_masks.main(["--vocabs", "32000", "--bias", "16"]) == 0
    assert "| 32000 | token bitmask | 4192 | 64000 | 6.55% |" in capsys.readouterr().out
