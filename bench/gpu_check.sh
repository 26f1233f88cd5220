#!/usr/bin/env bash
# One command that proves the GPU path on a GPU host: each section runs its GPU tests and
# benchmarks and leaves logs/JSON under $OUT (default ./gpu-check-out). Sections do not stop
# each other: a failure is reported in $OUT/summary.txt and the script goes on.
#   OUT=/path PYTHON=python3 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

# ==== issue 3: KvikIO reader (gpu tests) + profile-io in kvikio mode =========================
# Writes $OUT/io.log (versions, test output, profile table), $OUT/io-profile.json and
# $OUT/io-profile.png. Needs kvikio-cu13, nvidia-ml-py and crc32c in the image (or wheels in
# .whl/). Budget: tests 120 s + profile 150 s (typically under a minute together).
PY=${PY:-${PYTHON:-python3}}
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
io_log="$OUT/io.log"
mkdir -p "${ENDOR_PROFILE_DIR:-/tmp/endor-profile-io}"
if ! "$PY" -c "import kvikio, crc32c" >/dev/null 2>&1 && [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --find-links .whl kvikio-cu13 crc32c >>"$io_log" 2>&1
fi
{
    echo "== versions"
    nvidia-smi -L 2>&1
    "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" 2>&1
    "$PY" -c "import kvikio; print('kvikio', kvikio.__version__)" 2>&1
    "$PY" -c "import cupy; print('cupy', cupy.__version__)" 2>&1
    echo "== pytest -m gpu tests/test_kvikio.py"
} >>"$io_log" 2>&1
timeout --kill-after=10 120 "$PY" -m pytest -q -m gpu tests/test_kvikio.py >>"$io_log" 2>&1
io_tests=$?
echo "== profile-io (kvikio, posix-direct; cold cache)" >>"$io_log"
timeout --kill-after=10 150 "$PY" -m endor_gds.cli profile-io \
    "${ENDOR_PROFILE_DIR:-/tmp/endor-profile-io}" --size 2GiB --modes kvikio,posix-direct --threads 1,4,8 --chunk 4MiB,16MiB --repeats 3 \
    --json "$OUT/io-profile.json" --plot "$OUT/io-profile.png" >>"$io_log" 2>&1
io_profile=$?
echo "io: test_kvikio.py exit $io_tests, profile-io exit $io_profile (details in io.log)" \
    | tee -a "$OUT/summary.txt"
# ==== end of issue 3 section =================================================================

# ==== issue 4: decode kernel (gpu tests) + bench_decode ======================================
# Writes $OUT/decode.log (build, GPU decode tests, benchmark report) and $OUT/decode.json.
# Budget: install 120 s + tests 150 s + benchmark 210 s (typically about half of that).
decode_log="$OUT/decode.log"
{
    echo "== build the CPU decoder extension (pip install --no-deps -e .)"
    # --no-build-isolation: the GPU host has no network; its setuptools builds csrc/endor_cpu.c.
    timeout --kill-after=10 120 "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1
    echo "build exit $?"
    echo "== pytest -m gpu tests/test_gpu_decode.py bench/test_bench_micro.py"
} >>"$decode_log" 2>&1
timeout --kill-after=10 150 "$PY" -m pytest -q -m gpu tests/test_gpu_decode.py \
    bench/test_bench_micro.py --benchmark-disable >>"$decode_log" 2>&1
decode_tests=$?
# bf16 weights, both codecs (format v1 raw and v2 expdict rows for every case); 50 and 70 % keep
# the input generation (numpy, ~10 s for a 70B MLP matrix) inside the budget.
echo "== bench_decode.py (Llama-7B/70B shapes, 50/70 %, BF16, codecs raw + expdict)" >>"$decode_log"
timeout --kill-after=10 210 "$PY" bench/bench_decode.py --json --repeats 5 --warmup 1 \
    --dtype BF16 --codecs raw,expdict --sparsity 0.5,0.7 \
    --storage-dir "${ENDOR_BENCH_DIR:-$PWD}" >"$OUT/decode.json" 2>>"$decode_log"
decode_bench=$?
echo "decode: gpu tests exit $decode_tests, bench_decode exit $decode_bench (details in decode.log," \
    "figures in decode.json)" | tee -a "$OUT/summary.txt"
# ==== end of issue 4 section =================================================================
