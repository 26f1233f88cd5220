"""Random bit patterns for decoder tests, with the values that break naive float code."""

from __future__ import annotations

import numpy as np

# Per element width: -0.0, +inf, -inf, NaN payloads (quiet and signalling), smallest subnormals.
SPECIALS = {
    2: np.array([0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF, 0x0001, 0x8001, 0x7F81, 0xFF80],
                dtype="<u2"),
    4: np.array([0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF,
                 0x00000001, 0x80000001], dtype="<u4"),
}
SIZES = (1, 31, 32, 33, 4095, 4096, 4097, 8191, 12289)


def random_bits(rng, n: int, itemsize: int, density: float) -> np.ndarray:
    """``n`` bit patterns, about ``density`` of them non-zero, specials sprinkled in."""
    dt = np.dtype("<u2") if itemsize == 2 else np.dtype("<u4")
    hi = np.iinfo(dt).max
    bits = rng.integers(1, hi, size=n, endpoint=True, dtype=np.uint64).astype(dt)
    if n:
        k = max(1, n // 50)
        bits[rng.integers(0, n, k)] = rng.choice(SPECIALS[itemsize], k)
    bits[rng.random(n) >= density] = 0
    return bits
