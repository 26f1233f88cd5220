#!/usr/bin/env python3
"""What checked reads (the default) cost per token: the same file streamed with ``verify_reads``
on and off, alternating in one process, medians over rounds.

The end-to-end comparison (``endor-gds bench --unchecked``) measures the same thing cold from the
drive; on a virtual disk whose speed drifts by 2x between minutes its ratios are noise. Here the
reads can come from the page cache (``--io posix-buffered``, warm), so the step costs only read
copies, decode and compute: the check's share of the step is then at its largest, and the ratio
is an upper bound on what it costs against real storage.

    python bench/bench_checked_reads.py FILE.endor [FILE2.endor ...] --rounds 5 --tokens 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

import endor_gds
from endor_gds.benchmarks.system import header_line


def per_token_s(path: str, verify: bool, tokens: int, io: str, tier: str) -> float:
    model = endor_gds.from_pretrained(path, device="cpu", verify_reads=verify, io=io, tier=tier)
    try:
        with torch.no_grad():
            model.generate(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), max_new_tokens=tokens, do_sample=False,
                           pad_token_id=0)
        return model.endor.summary()["per_token"]["s"]
    finally:
        model.endor.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--io", default="posix-buffered", help="reader mode (posix-buffered: page cache, warm)")
    ap.add_argument("--tier", default="ssd")
    ap.add_argument("--json", default=None, metavar="OUT")
    args = ap.parse_args(argv)
    print(header_line("bench_checked_reads") + f"; io {args.io}, tier {args.tier}, {args.tokens} tokens, "
          f"{args.rounds} rounds alternating on/off")
    rows = []
    print(f"{'file':<52} {'s/token checked':>16} {'unchecked':>10} {'ratio':>7} {'ratio min-max':>14}")
    for path in args.files:
        per_token_s(path, True, 1, args.io, args.tier)  # warm-up: page cache, allocator, threads
        on, off = [], []
        for r in range(args.rounds):
            for verify in (True, False) if r % 2 == 0 else (False, True):
                (on if verify else off).append(per_token_s(path, verify, args.tokens, args.io, args.tier))
        ratios = [a / b for a, b in zip(on, off)]
        row = {"file": path, "checked_s": statistics.median(on), "unchecked_s": statistics.median(off),
               "ratio": statistics.median(on) / statistics.median(off), "ratios": ratios}
        rows.append(row)
        print(f"{path[-52:]:<52} {row['checked_s']:>16.3f} {row['unchecked_s']:>10.3f} {row['ratio']:>7.3f} "
              f"{min(ratios):>6.2f}-{max(ratios):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
