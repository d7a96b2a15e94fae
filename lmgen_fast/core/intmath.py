"""Integer helpers for sizing launches and buffers (host ints, never tensors)."""


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b > 0``."""
    return -(-a // b)


def round_up(n: int, m: int) -> int:
    """The smallest multiple of ``m`` that is ``>= n``."""
    return cdiv(n, m) * m


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 << max(n - 1, 0).bit_length()
