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


def weight_bits(rng, n: int, dtype: str, density: float, outliers: bool = False) -> np.ndarray:
    """Bit patterns of ``n`` weights as transformers initialises them (N(0, 0.02)) in ``dtype``
    (``"BF16"``, ``"F16"``, ``"F32"``), the smallest ``1 - density`` of them zeroed (magnitude
    pruning). ``outliers``: about 1 in 300 survivors get an exponent far from the rest (x 2^+-12)
    and every :data:`SPECIALS` pattern appears, so an exponent dictionary needs escapes."""
    import torch  # noqa: PLC0415

    w = torch.from_numpy(rng.standard_normal(n, dtype=np.float32) * 0.02)
    if n and density < 1:
        k = int(round(n * (1 - density)))
        w[torch.argsort(w.abs(), stable=True)[:k]] = 0
    if outliers and n:
        live = torch.nonzero(w).reshape(-1)
        pick = live[torch.from_numpy(rng.integers(0, max(live.numel(), 1), max(1, n // 300)))] \
            if live.numel() else live
        w[pick] *= torch.from_numpy(np.float32(2.0) ** rng.choice([-12, 12], pick.numel()).astype(np.float32))
    t = w.to({"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype])
    bits = t.view(torch.int16 if t.element_size() == 2 else torch.int32).numpy()
    bits = bits.view("<u2" if t.element_size() == 2 else "<u4").copy()
    if outliers and n:
        live = np.flatnonzero(bits)
        if live.size:
            specials = SPECIALS[bits.itemsize]
            bits[rng.choice(live, min(live.size, specials.size), replace=False)] = \
                specials[: min(live.size, specials.size)]
    return bits


def random_file(folder, nbytes: int, seed: int):
    """``(path, data)``: a file of ``nbytes`` random bytes in ``folder`` (reader tests)."""
    path = folder / "data.bin"
    data = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    return path, data
