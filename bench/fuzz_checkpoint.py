#!/usr/bin/env python3
"""Fuzz the packer with mutated source checkpoints, for long runs.

    python bench/fuzz_checkpoint.py --cases 20000 --seed 1
    python bench/fuzz_checkpoint.py --seed 1 --case 4711 --save /tmp/case   # replay one case

The engine and oracle are endor_gds/fuzz/ckptfuzz.py (safetensors headers, data and config.json mutated;
judged against the safetensors library and a load + forward of every successful pack). Cases
run one after another in this process (the packer is Python and numpy: nothing in it to crash
the interpreter); a case running past ``--case-timeout`` counts as an escape (``hang``). Prints
a system header, outcomes by op and every escape; exits 1 if there was any escape.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000, help="cases to run (default 10000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case-timeout", type=int, default=60,
                    help="seconds one case may take before it counts as a hang (default 60)")
    ap.add_argument("--bases", type=Path, default=None,
                    help="folder holding (or to receive) the base checkpoints; default: a temp folder")
    ap.add_argument("--case", type=int, default=None, help="replay this one case")
    ap.add_argument("--save", type=Path, default=None, help="with --case: copy the mutated folder here")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")
    args = ap.parse_args(argv)

    import transformers  # noqa: PLC0415

    import endor_gds  # noqa: PLC0415
    from endor_gds.benchmarks.models import build_model  # noqa: PLC0415
    from endor_gds.fuzz import ckptfuzz  # noqa: PLC0415 - heavy imports after argument parsing

    # Mutated configs make transformers log a warning per case (token ids outside a tiny vocab).
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    root = Path(tempfile.mkdtemp(prefix="endor-ckptfuzz-"))
    bases = ckptfuzz.build_bases(args.bases or root / "bases", build_model)
    folder, work = root / "case", root / "work"
    signal.signal(signal.SIGALRM, _alarm)

    def one(index):
        case = ckptfuzz.make_case(bases, args.seed, index, folder)
        signal.alarm(args.case_timeout)
        try:
            result = ckptfuzz.run_case(folder, work)
        except _Hang:
            result = ckptfuzz.Result("ESCAPE hang", f"no result in {args.case_timeout} s")
        finally:
            signal.alarm(0)
        return case, result

    if args.case is not None:
        case, r = one(args.case)
        print(f"case {args.case}: {case.op}: {case.detail}\noutcome: {r.outcome}")
        if r.escape:
            print(r.escape)
        if args.save:
            shutil.copytree(folder, args.save, dirs_exist_ok=True)
            print(f"mutated checkpoint copied to {args.save}")
        shutil.rmtree(root, ignore_errors=True)
        return 1 if r.escape else 0

    print(f"# fuzz_checkpoint: endor_gds {endor_gds.__version__}, Python {platform.python_version()}, "
          f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs\n"
          f"# seed={args.seed} cases={args.cases} case_timeout={args.case_timeout}s "
          f"bases: {', '.join(b.name for b in bases)}", flush=True)
    by_op = collections.defaultdict(collections.Counter)
    escapes = []
    t0 = last = time.perf_counter()
    for index in range(args.cases):
        case, r = one(index)
        by_op[case.op][r.outcome] += 1
        if r.escape:
            escapes.append({"case": index, "op": case.op, "detail": case.detail,
                            "outcome": r.outcome, "escape": r.escape})
            print(f"ESCAPE case {index} ({case.op}: {case.detail}): {r.escape}", flush=True)
        if time.perf_counter() - last > 30:
            last = time.perf_counter()
            print(f"# {index + 1} cases, {len(escapes)} escapes, "
                  f"{(index + 1) / (last - t0):.0f} cases/s", flush=True)
    seconds = time.perf_counter() - t0
    shutil.rmtree(root, ignore_errors=True)

    print(f"\n{args.cases} cases in {seconds:.0f} s ({args.cases / max(seconds, 1e-9):.0f} cases/s), "
          f"seed {args.seed}, {len(escapes)} escapes\n")
    print(f"{'op':<16} outcome")
    for op in sorted(by_op):
        for outcome, n in sorted(by_op[op].items(), key=lambda kv: -kv[1]):
            print(f"{op:<16} {outcome:<60} {n:>6}")
    if args.json:
        args.json.write_text(json.dumps({
            "seed": args.seed, "cases": args.cases, "seconds": seconds, "escapes": escapes,
            "by_op": {k: dict(v) for k, v in by_op.items()}}, indent=1))
    return 1 if escapes else 0


if __name__ == "__main__":
    sys.exit(main())
