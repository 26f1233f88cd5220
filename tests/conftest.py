"""Shared fixtures: tiny random checkpoints per family/dtype, packed files, GPU skipping."""

from __future__ import annotations

import os

import pytest
import torch

from endor_gds.benchmarks.models import build_model


def _has_gpu() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no driver at all
        return False


HAS_GPU = _has_gpu()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def bit_identical_path(request):
    """The streaming tests assert bit-identity with the in-memory model, a promise of the decode
    path: the CPU fused product (on by default, within fp32 rounding) is turned off for them, and
    tested on its own by the tests marked ``fused`` (tests/stream/test_runtime_fused.py, tests/decode/)."""
    from endor_gds import defaults  # noqa: PLC0415

    with defaults.set(fused="fused" in request.keywords):
        yield


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """``model_dir(family, dtype=torch.float16, sharded=False, **config_overrides)`` → cached folder."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("models")

    def get(family="llama", dtype=torch.float16, sharded=False, **overrides):
        key = (family, dtype, sharded, tuple(sorted(overrides.items())))
        if key not in cache:
            name = f"{family}-{str(dtype).split('.')[-1]}-{'sharded' if sharded else 'single'}-{len(cache)}"
            cache[key] = build_model(root / name, family, dtype, sharded=sharded, **overrides)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def packed(model_dir, tmp_path_factory):
    """``packed(family, dtype, prune="magnitude", sparsity=0.5, sharded=False, codec="auto", tp=None)``
    → cached .endor path (``tp=N``: packed for N tensor-parallel ranks)."""
    import endor_gds  # noqa: PLC0415

    cache: dict = {}
    root = tmp_path_factory.mktemp("packed")

    def get(family="llama", dtype=torch.float16, prune="magnitude", sparsity=0.5, sharded=False,
            codec="auto", tp=None, **overrides):
        key = (family, dtype, prune, sparsity, sharded, codec, tp, tuple(sorted(overrides.items())))
        if key not in cache:
            src = model_dir(family, dtype, sharded, **overrides)
            dst = root / f"m{len(cache)}.endor"
            endor_gds.pack(src, dst, prune=prune, sparsity=sparsity, progress=False, codec=codec, tp=tp)
            cache[key] = dst
        return cache[key]

    return get


@pytest.fixture
def rng():
    import numpy as np  # noqa: PLC0415

    return np.random.default_rng(int(os.environ.get("ENDOR_TEST_SEED", "1234")))
