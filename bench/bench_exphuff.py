#!/usr/bin/env python3
"""Bits per element of the value codecs on TinyLlama-1.1B weight shapes (issue 22).

    python bench/bench_exphuff.py                          # bf16 and fp16, unpruned and 50 %, 2 layers
    python bench/bench_exphuff.py --layers 22 --dtypes BF16 --sparsity 0,0.5

Weights: N(0, 0.02) as transformers initialises them (the issue's random-weight rows), in each
dtype, magnitude-pruned per output row for sparsity > 0. Per layer the seven linear weights of
TinyLlama (q/o 2048x2048, k/v 256x2048, gate/up 5632x2048, down 2048x5632). For each codec, the
bytes a file holds for those tensors, every segment padded to a page, per element:

* ``v1``: bitmap + raw values, or dense (format v1's rule);
* ``v2``: the packer's choice (``packing.policy.choose_storage``, codec auto: dense, raw or
  expdict, dictionaries counted);
* ``exphuff``: entropy-coded exponents (``codec/exphuff.py``, no decoder outside numpy yet): the
  smaller of every element coded without a bitmap (a zero is just exponent 0) and bitmap +
  non-zeros;
* ``bound``: ``1 + mantissa + H(exponent)`` bits per stored value (H over the whole set), plus
  one bitmap bit per element when pruned (the bitmap uncompressed), as the issue states it.

The exphuff size is the one :func:`exphuff.stored_nbytes` computes from the exponent histogram,
which tests/codec/test_exphuff.py checks against what the encoder writes.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from endor_gds.codec import exphuff
from endor_gds.codec.bitmap import DTYPES, stored_nbytes
from endor_gds.codec.expdict import LAYOUTS, exponent_histogram
from endor_gds.packing.policy import choose_storage
from endor_gds.packing.prune import magnitude_prune

SHAPES = [(2048, 2048), (256, 2048), (256, 2048), (2048, 2048), (5632, 2048), (5632, 2048), (2048, 5632)]
TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def tensor_sizes(bits: np.ndarray, shape, dtype: str) -> dict:
    """Stored bytes of one weight (bit patterns ``bits``) in each codec, and its exponent counts."""
    d, layout, n = DTYPES[dtype], LAYOUTS[dtype], bits.size
    nnz = int(np.count_nonzero(bits))
    v1 = choose_storage(d, shape, bits, "raw")
    v2 = choose_storage(d, shape, bits, "auto")
    sizes = {"v1": stored_nbytes(v1.encoding, n, nnz, d.itemsize),
             "v2": stored_nbytes(v2.encoding, n, nnz, d.itemsize, v2.expdict)
             + (len(v2.expdict.exponents) if v2.expdict is not None else 0)}
    # the smaller of every element coded (a zero is exponent 0: no bitmap) and bitmap + non-zeros
    dense_hist, hist = exponent_histogram(bits, layout), exponent_histogram(bits[bits != 0], layout)
    sizes["exphuff"] = min(exphuff.stored_nbytes(exphuff.best_exphuff(dense_hist, layout), dense_hist, n, bitmap=False),
                           exphuff.stored_nbytes(exphuff.best_exphuff(hist, layout), hist, n, bitmap=True))
    return {"sizes": sizes, "hist": hist, "n": n, "nnz": nnz}


def run(dtype: str, sparsity: float, layers: int, seed: int) -> dict:
    layout, gen = LAYOUTS[dtype], torch.Generator().manual_seed(seed)
    totals = {"v1": 0, "v2": 0, "exphuff": 0}
    hist, n, nnz = np.zeros(1 << layout.exp_bits, dtype=np.int64), 0, 0
    for _ in range(layers):
        for shape in SHAPES:
            w = (torch.randn(shape, generator=gen) * 0.02).to(TORCH[dtype])
            if sparsity > 0:
                w = magnitude_prune(w, sparsity)
            bits = w.view(torch.int16 if layout.itemsize == 2 else torch.int32).numpy() \
                .view(layout.bits).reshape(-1)
            t = tensor_sizes(bits, shape, dtype)
            for k in totals:
                totals[k] += t["sizes"][k]
            hist += t["hist"]
            n, nnz = n + t["n"], nnz + t["nnz"]
    p = hist[hist > 0] / hist.sum()
    entropy = float(-(p * np.log2(p)).sum())
    bound = (nnz * (layout.residual_bits + entropy) + (n if sparsity > 0 else 0)) / n
    out = {k: 8 * v / n for k, v in totals.items()}
    return {"dtype": dtype, "sparsity": sparsity, "layers": layers, "elements": n,
            "exponent_entropy": entropy, "bits_per_element": out, "bound": bound}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="BF16,F16", help="comma list of BF16, F16, F32")
    ap.add_argument("--sparsity", default="0,0.5", help="comma list of fractions pruned (0: unpruned)")
    ap.add_argument("--layers", type=int, default=2, help="TinyLlama layers (22 in the model; default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    print(f"{'dtype':>5} {'pruned':>6} {'H(exp)':>6} {'v1':>6} {'v2':>6} {'exphuff':>7} {'bound':>6}  "
          f"bits per element, {args.layers} TinyLlama layers", file=sys.stderr)
    for dtype in args.dtypes.split(","):
        for sparsity in (float(s) for s in args.sparsity.split(",")):
            r = run(dtype.strip(), sparsity, args.layers, args.seed)
            b = r["bits_per_element"]
            print(f"{dtype:>5} {sparsity:>6.0%} {r['exponent_entropy']:>6.3f} {b['v1']:>6.3f} {b['v2']:>6.3f} "
                  f"{b['exphuff']:>7.3f} {r['bound']:>6.3f}", file=sys.stderr)
            rows.append(r)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
