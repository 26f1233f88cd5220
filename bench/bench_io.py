"""Storage bandwidth benchmark: the reader modes against fio on the same file (cold cache).

A thin alias of ``endor-gds profile-io`` so the benchmarks folder has one entry point per layer
of the stack (bench_io, bench_decode, bench_e2e); the arguments and the ``--json`` report are the
profiler's::

    python bench/bench_io.py /mnt/nvme --size 4GiB --threads 1,4,8 --chunk 4MiB,16MiB \\
        --json io.json --plot io.png
    python bench/bench_io.py /mnt/nvme --modes kvikio,posix-direct      # on a GPU host

Prints a header (machine, CPU, GPU, file system, modes and why, cache state), a table of GB/s
medians with min/max over ``--repeats`` runs, and each mode's best over fio's best.
"""

from __future__ import annotations

import sys

from endor_gds.benchmarks.profile_io import main

if __name__ == "__main__":
    sys.exit(main())
