"""End-to-end benchmark: Accelerate disk offload vs endor_gds streaming, dense and 50 %-pruned.

Builds (and caches) a random-init model from a real config (TinyLlama-1.1B shape in fp16 by
default), packs it dense and pruned, measures fio's sequential O_DIRECT bandwidth of the same
disk, then generates with each variant in the same run, evicting the page cache of every file
involved before every step::

    python bench/bench_e2e.py --json e2e.json --plot e2e.png
    python bench/bench_e2e.py --config llama-2-7b --tokens 4          # when the disk allows
    python bench/bench_e2e.py --device cuda --tiers ssd,ram            # on a GPU host

Prints a header (machine, GPU, storage bandwidth, cache state), seconds per token (median,
min-max), bytes per token, effective GB/s and overlap per variant, then the ratios:
pruned/Accelerate, pruned/dense (against the byte ratio) and time over the I/O floor.
"""

from __future__ import annotations

import argparse
import sys

from endor_gds.benchmarks.e2e import add_arguments, run_from_args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
