#!/usr/bin/env python3
"""Fuzz the .endor reader with mutated real files, for long runs (issue 7).

    python bench/fuzz_format.py --cases 10000 --seed 1
    python bench/fuzz_format.py --seed 1 --case 4711 --save /tmp/case   # replay one case
    python bench/fuzz_format.py --cases 2000 --bases exphuff --ops json.exphuff,segment.  # narrowed

Case ``i`` of seed ``S`` is a pure function of ``(S, i)`` and the corpus (endor_gds/fuzz/fuzzlib.py), so
any escape is replayed with ``--case i`` (and the same ``--bases`` and ``--ops``, if any). Cases
run in worker processes; a worker that dies (segfault in the C decoder, say) or outlives
``--case-timeout`` is replaced and its case is counted as an escape (``crash`` / ``hang``).
Prints a system header, the outcome histogram (by outcome, and by mutation op) and every escape;
exits 1 if there was any escape.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path


def _select(items, wanted, key):
    """The items whose ``key`` contains one of the comma-separated words of ``wanted`` (all: None)."""
    words = [w for w in (wanted or "").split(",") if w]
    chosen = [x for x in items if not words or any(w in key(x) for w in words)]
    if not chosen:
        raise SystemExit(f"nothing matches {wanted!r} among {', '.join(map(key, items))}")
    return chosen


def _worker(conn, corpus_paths, seed, case_timeout, workdir, ops):
    from endor_gds.decode.cpu import CpuDecoder  # noqa: PLC0415
    from endor_gds.fuzz import fuzzcheck, fuzzlib  # noqa: PLC0415 - heavy imports only in the worker

    bases = [fuzzlib.load_base(p) for p in corpus_paths]
    decoder = CpuDecoder(1)
    conn.send(("ready", None))
    while True:
        index = conn.recv()
        if index is None:
            return
        base, mutant = fuzzlib.make_case(bases, seed, index, ops)
        r = fuzzcheck.run_case(base, mutant, workdir, decoder, time_limit=case_timeout)
        conn.send(("done", (index, base.name, mutant.op, mutant.detail, r.outcome, r.escape,
                            r.peak_bytes, r.seconds)))


class Pool:
    """Worker processes handing out one case at a time, so a dead worker names its case."""

    def __init__(self, n, corpus, seed, case_timeout, root, ops):
        self.args = (corpus, seed, case_timeout)
        self.ops = ops
        self.ctx = mp.get_context("spawn")  # a fresh interpreter: no state shared with us
        self.root = root
        self.slots = [self._start(i) for i in range(n)]

    def _start(self, i):
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(child, *self.args, str(self.root / f"w{i}"), self.ops),
                                daemon=True)
        proc.start()
        child.close()
        kind, _ = parent.recv()  # wait until the corpus is loaded
        assert kind == "ready"
        return {"proc": proc, "conn": parent, "case": None, "since": 0.0}

    def restart(self, i):
        slot = self.slots[i]
        slot["proc"].kill()
        slot["proc"].join()
        self.slots[i] = self._start(i)

    def close(self):
        for slot in self.slots:
            try:
                slot["conn"].send(None)
            except (BrokenPipeError, OSError):
                pass
            slot["proc"].join(5)
            if slot["proc"].is_alive():
                slot["proc"].kill()


def system_header(args) -> str:
    import endor_gds  # noqa: PLC0415

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"# fuzz_format: endor_gds {endor_gds.__version__}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs\n"
            f"# seed={args.seed} cases={args.cases} workers={args.workers} "
            f"case_timeout={args.case_timeout}s time_limit={args.time_limit or 'none'}"
            f"{f' bases={args.bases}' if args.bases else ''}{f' ops={args.ops}' if args.ops else ''}")


def replay(args, corpus, ops) -> int:
    from endor_gds.decode.cpu import CpuDecoder  # noqa: PLC0415
    from endor_gds.fuzz import fuzzcheck, fuzzlib  # noqa: PLC0415 - heavy imports after argument parsing

    bases = [fuzzlib.load_base(p) for p in corpus]
    base, mutant = fuzzlib.make_case(bases, args.seed, args.case, ops)
    print(f"case {args.case}: {base.name} {mutant.op}: {mutant.detail} (hostile={mutant.hostile})")
    workdir = Path(tempfile.mkdtemp(prefix="endor-fuzz-replay-"))
    r = fuzzcheck.run_case(base, mutant, workdir, CpuDecoder(1), time_limit=args.case_timeout)
    print(f"outcome: {r.outcome}  peak {r.peak_bytes / 2**20:.1f} MiB  {r.seconds * 1e3:.1f} ms")
    if r.escape:
        print(r.escape)
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        out = Path(args.save) / f"case-{args.seed}-{args.case}.endor"
        out.write_bytes(mutant.data)
        print(f"mutated file written to {out}")
    return 1 if r.escape else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000, help="cases to run (default 10000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=0.0,
                    help="stop handing out cases after this many seconds (0: no limit)")
    ap.add_argument("--case-timeout", type=float, default=30.0,
                    help="seconds one case may take before it counts as a hang (default 30)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--corpus", type=Path, default=None,
                    help="folder holding (or to receive) the corpus files; default: a temp folder")
    ap.add_argument("--case", type=int, default=None, help="replay this one case in-process")
    ap.add_argument("--save", default=None, help="with --case: write the mutated file here")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")
    ap.add_argument("--bases", default=None,
                    help="only corpus files whose name contains one of these comma-separated words")
    ap.add_argument("--ops", default=None,
                    help="only mutation ops whose name contains one of these comma-separated words")
    args = ap.parse_args(argv)

    from endor_gds.fuzz import fuzzlib  # noqa: PLC0415

    def build_model(*a, **kw):  # endor_gds/benchmarks/models.py imports transformers: only when a file is missing
        from endor_gds.benchmarks.models import build_model as build  # noqa: PLC0415

        return build(*a, **kw)

    root = Path(tempfile.mkdtemp(prefix="endor-fuzz-"))
    corpus = [str(p) for p in fuzzlib.build_corpus(args.corpus or root / "corpus", build_model)]
    corpus = _select(corpus, args.bases, lambda p: Path(p).stem)
    ops = tuple(_select(list(fuzzlib.OPS), args.ops, str))
    if args.case is not None:
        return replay(args, corpus, ops)

    print(system_header(args), flush=True)
    t0 = time.perf_counter()
    pool = Pool(args.workers, corpus, args.seed, args.case_timeout, root, ops)
    print(f"# corpus: {', '.join(Path(p).stem for p in corpus)} ({time.perf_counter() - t0:.1f} s "
          f"to start {args.workers} workers)", flush=True)
    outcomes, by_op, escapes = collections.Counter(), collections.defaultdict(collections.Counter), []
    peak = 0
    next_case, done = 0, 0
    t_start = time.perf_counter()
    last_report = t_start
    hard_timeout = args.case_timeout + 30  # the in-worker alarm should fire first

    def record(index, base, op, detail, outcome, escape, peak_bytes):
        nonlocal done, peak
        done += 1
        peak = max(peak, peak_bytes)
        outcomes[outcome] += 1
        by_op[op][outcome.split(":")[0].split(" ")[0]] += 1
        if escape:
            escapes.append({"case": index, "base": base, "op": op, "detail": detail,
                            "outcome": outcome, "escape": escape})
            print(f"ESCAPE case {index} ({base}, {op}: {detail}): {escape[:2000]}", flush=True)

    def out_of_time():
        return args.time_limit and time.perf_counter() - t_start > args.time_limit

    try:
        while done < next_case or (next_case < args.cases and not out_of_time()):
            for slot in pool.slots:  # hand out work
                if slot["case"] is None and next_case < args.cases and not out_of_time():
                    slot["conn"].send(next_case)
                    slot["case"], slot["since"] = next_case, time.perf_counter()
                    next_case += 1
            busy = [s for s in pool.slots if s["case"] is not None]
            if not busy:
                break
            ready = wait([s["conn"] for s in busy] + [s["proc"].sentinel for s in busy], timeout=1.0)
            for i, slot in enumerate(pool.slots):
                if slot["case"] is None:
                    continue
                if slot["conn"] in ready:
                    try:
                        _, (index, base, op, detail, outcome, escape, pk, _s) = slot["conn"].recv()
                    except (EOFError, OSError):
                        ready.append(slot["proc"].sentinel)
                    else:
                        record(index, base, op, detail, outcome, escape, pk)
                        slot["case"] = None
                        continue
                dead = slot["proc"].sentinel in ready or not slot["proc"].is_alive()
                late = time.perf_counter() - slot["since"] > hard_timeout
                if dead or late:
                    index = slot["case"]
                    kind = "crash" if dead else "hang"
                    why = f"worker exit code {slot['proc'].exitcode}" if dead else \
                        f"no answer in {hard_timeout:.0f} s"
                    record(index, "?", "?", f"replay with --seed {args.seed} --case {index}",
                           f"ESCAPE {kind}", why, 0)
                    pool.restart(i)
            if time.perf_counter() - last_report > 30:
                last_report = time.perf_counter()
                rate = done / (last_report - t_start)
                print(f"# {done} cases, {len(escapes)} escapes, {rate:.0f} cases/s", flush=True)
    finally:
        pool.close()
    seconds = time.perf_counter() - t_start

    print(f"\n{done} cases in {seconds:.0f} s ({done / max(seconds, 1e-9):.0f} cases/s), seed "
          f"{args.seed}, {len(escapes)} escapes, peak traced allocation of one case "
          f"{peak / 2**20:.1f} MiB")
    print("\noutcome                                   cases")
    for outcome, n in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"{outcome:<40} {n:>7}")
    print("\nop                       " + " ".join(f"{k:>7}" for k in ("open", "read", "ok", "ESCAPE")))
    for op in sorted(by_op):
        c = by_op[op]
        print(f"{op:<24} " + " ".join(f"{c.get(k, 0):>7}" for k in ("open", "read", "ok", "ESCAPE")))
    if args.json:
        args.json.write_text(json.dumps({
            "seed": args.seed, "cases": done, "seconds": seconds, "escapes": escapes,
            "outcomes": dict(outcomes), "by_op": {k: dict(v) for k, v in by_op.items()},
            "peak_bytes": peak,
        }, indent=1))
    return 1 if escapes else 0


if __name__ == "__main__":
    sys.exit(main())
