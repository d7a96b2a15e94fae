"""The status bits of :mod:`lmgen_fast.core.errors` are the ones the Triton kernels write:
the kernels' module repeats them (JIT code reads no other module's globals), so the two
copies are held equal here."""

from __future__ import annotations

import pytest

from lmgen_fast.core import errors

NAMES = ("STATUS_EMPTY", "STATUS_OVERFLOW", "STATUS_INTERNAL", "STATUS_SLOW")


@pytest.mark.parametrize("name", NAMES)
def test_status_bits_match_the_kernels(name):
    pytest.importorskip("triton")
    from lmgen_fast.kernels import sampling_common

    assert getattr(errors, name) == getattr(sampling_common, name)
    assert type(getattr(sampling_common, name)) is int  # a plain int, as JIT code needs


def test_status_bits_are_distinct_single_bits():
    bits = [getattr(errors, name) for name in NAMES]
    assert all(b > 0 and b & (b - 1) == 0 for b in bits)
    assert len(set(bits)) == len(bits)
