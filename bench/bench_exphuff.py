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
* ``exphuff``: entropy-coded exponents (format v3, ``codec/exphuff.py``): the packer's choice
  with ``codec="exphuff"``, the smaller of every element coded without a bitmap (a zero is just
  exponent 0) and bitmap + non-zeros;
* ``bound``: ``1 + mantissa + H(exponent)`` bits per stored value (H over the whole set), plus
  one bitmap bit per element when pruned (the bitmap uncompressed), as the issue states it.

Sizes are the packer's own (``policy.Storage.nbytes``, from the exponent histograms), which
tests/codec/test_exphuff.py checks against what the encoder writes.

``--decode``: also the CPU decoders' speed on one layer's weights (dense bytes out per second, all
threads, inputs in RAM; v1 raw, v2 expdict and exphuff, each tensor decoded ``--repeats`` times,
medians summed), against a cold O_DIRECT read of a temporary file in ``--storage-dir`` measured in
the same run (bench_decode's): the issue's target is exphuff's rate >= 2 x storage for bf16.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from endor_gds.codec import exphuff
from endor_gds.codec.bitmap import DTYPES
from endor_gds.codec.expdict import LAYOUTS, exponent_histogram
from endor_gds.packing.policy import choose_storage
from endor_gds.packing.prune import magnitude_prune

SHAPES = [(2048, 2048), (256, 2048), (256, 2048), (2048, 2048), (5632, 2048), (5632, 2048), (2048, 5632)]


def tensor_sizes(bits: np.ndarray, shape, dtype: str) -> dict:
    """Stored bytes of one weight (bit patterns ``bits``) in each codec, and its exponent counts."""
    d, layout, n = DTYPES[dtype], LAYOUTS[dtype], bits.size
    nnz = int(np.count_nonzero(bits))
    # each codec as the packer sizes it (policy.Storage.nbytes: pages and parameters counted);
    # v2 is format v2's choice, the smaller of v1's and bitmap + expdict
    size = {c: choose_storage(d, shape, bits, c).nbytes(n, nnz, d.itemsize) for c in ("raw", "expdict", "exphuff")}
    sizes = {"v1": size["raw"], "v2": min(size["raw"], size["expdict"]), "exphuff": size["exphuff"]}
    hist = exponent_histogram(bits[bits != 0], layout)  # the non-zeros': the bound's entropy
    return {"sizes": sizes, "hist": hist, "n": n, "nnz": nnz}


def run(dtype: str, sparsity: float, layers: int, seed: int) -> dict:
    layout, gen = LAYOUTS[dtype], torch.Generator().manual_seed(seed)
    totals = {"v1": 0, "v2": 0, "exphuff": 0}
    hist, n, nnz = np.zeros(1 << layout.exp_bits, dtype=np.int64), 0, 0
    for _ in range(layers):
        for shape in SHAPES:
            w = (torch.randn(shape, generator=gen) * 0.02).to(DTYPES[dtype].torch)
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


def decode_rates(dtype: str, sparsity: float, repeats: int, seed: int) -> dict:
    """Dense GB/s of the CPU decoder per codec over one TinyLlama layer's seven weights."""
    import time  # noqa: PLC0415

    from bench_decode import codec_values  # noqa: PLC0415 - v2 encoded as bench_decode encodes it

    from endor_gds.codec.bitmap import encode_bitmap  # noqa: PLC0415
    from endor_gds.decode.cpu import CpuDecoder  # noqa: PLC0415

    layout, gen = LAYOUTS[dtype], torch.Generator().manual_seed(seed)
    seconds, dense = {"v1": 0.0, "v2": 0.0, "exphuff": 0.0}, 0
    with CpuDecoder() as dec:
        for shape in SHAPES:
            w = (torch.randn(shape, generator=gen) * 0.02).to(DTYPES[dtype].torch)
            if sparsity > 0:
                w = magnitude_prune(w, sparsity)
            bits = w.view(torch.int16 if layout.itemsize == 2 else torch.int32).numpy().view(layout.bits).reshape(-1)
            enc, out = encode_bitmap(bits), np.empty(bits.size, dtype=layout.bits)
            hist = exponent_histogram(enc.values, layout)
            items = {"v1": (enc.bitmap, enc.values, enc.tile_offsets, out),
                     "v2": (enc.bitmap, codec_values("expdict", enc.values, enc.tile_offsets, bits.size, dtype),
                            enc.tile_offsets, out)}
            if sparsity > 0:
                items["exphuff"] = (enc.bitmap, exphuff.encode_values(
                    enc.values, enc.tile_offsets, exphuff.best_exphuff(hist, layout)), enc.tile_offsets, out)
            else:  # no bitmap: every element a value
                offs = exphuff.dense_tile_offsets(bits.size)
                items["exphuff"] = (None, exphuff.encode_values(
                    bits, offs, exphuff.best_exphuff(exponent_histogram(bits, layout), layout)), None, out)
            for codec, item in items.items():
                prepared = dec.prepare([item])
                dec.run(prepared)
                if not np.array_equal(out, bits):
                    raise SystemExit(f"{codec} decoded {shape} wrongly: refusing to time it")
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    dec.run(prepared)
                    times.append(time.perf_counter() - t0)
                seconds[codec] += float(np.median(times))
            dense += out.nbytes
        threads = dec.threads
    return {"threads": threads, "dense_gbps": {k: dense / v / 1e9 for k, v in seconds.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="BF16,F16", help="comma list of BF16, F16, F32")
    ap.add_argument("--sparsity", default="0,0.5", help="comma list of fractions pruned (0: unpruned)")
    ap.add_argument("--layers", type=int, default=2, help="TinyLlama layers (22 in the model; default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--decode", action="store_true", help="also time the CPU decoders (one layer)")
    ap.add_argument("--repeats", type=int, default=5, help="decodes per tensor and codec (--decode)")
    ap.add_argument("--storage-dir", default=".", help="where the storage reference file goes (--decode)")
    ap.add_argument("--storage-bytes", default="512MiB", help="its size (--decode)")
    args = ap.parse_args(argv)
    rows = []
    storage = None
    if args.decode:
        from bench_decode import measure_storage  # noqa: PLC0415 - the same storage figure as bench_decode

        from endor_gds.defaults import parse_bytes  # noqa: PLC0415

        storage = measure_storage(args.storage_dir, parse_bytes(args.storage_bytes), 3, 1,
                                  lambda m: print(m, file=sys.stderr))
        print(f"storage: {storage['mode']} {storage['gbps']:.2f} GB/s", file=sys.stderr)
    print(f"{'dtype':>5} {'pruned':>6} {'H(exp)':>6} {'v1':>6} {'v2':>6} {'exphuff':>7} {'bound':>6}  "
          f"bits per element, {args.layers} TinyLlama layers", file=sys.stderr)
    for dtype in args.dtypes.split(","):
        for sparsity in (float(s) for s in args.sparsity.split(",")):
            r = run(dtype.strip(), sparsity, args.layers, args.seed)
            b = r["bits_per_element"]
            print(f"{dtype:>5} {sparsity:>6.0%} {r['exponent_entropy']:>6.3f} {b['v1']:>6.3f} {b['v2']:>6.3f} "
                  f"{b['exphuff']:>7.3f} {r['bound']:>6.3f}", file=sys.stderr)
            if storage is not None:
                r["decode"] = decode_rates(dtype.strip(), sparsity, args.repeats, args.seed)
                r["decode"]["storage_gbps"] = storage["gbps"]
                print("      decode, dense GB/s out (x storage): " + ", ".join(
                    f"{k} {v:.2f} ({v / storage['gbps']:.2f}x)" for k, v in r["decode"]["dense_gbps"].items())
                    + f"; {r['decode']['threads']} threads", file=sys.stderr)
            rows.append(r)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
