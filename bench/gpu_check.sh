#!/usr/bin/env bash
# Everything only a GPU host can prove, in one command under 8 minutes:
#   OUT=/path bash bench/gpu_check.sh [SECTION ...]   (default: all sections, in this order)
#
#   setup   KvikIO + crc32c from .whl/ when missing (pip --target, nothing else touched), the C
#           decoder built in place, versions of the card and the stack
#   tests   every GPU test (pytest -m gpu): decode kernel vs the numpy reference, KvikIO reader,
#           streaming runtime on cuda vs the in-memory model, budgets, corrupted extents
#   decode  bench_decode.py: kernel GB/s vs a device-to-device copy, CPU decoder vs storage
#   crc     bench_crc_gpu.py: the GPU check (CRC-32C of a staged extent, one Llama-70B layer ~1 GB,
#           aligned and odd segment offsets) GB/s vs a device-to-device copy of the same bytes
#   io      profile-io in kvikio and posix-direct modes, cold cache
#   e2e     bench_e2e.py on cuda, both tiers: Accelerate vs endor_gds dense vs 50 %-pruned (v1, v2),
#           and the unpruned model in format v3 (exphuff) vs v1 dense; then a tiny mixture of
#           experts (tiny-moe), routed experts vs every expert, through the CUDA expert cache
#   serve   (only when named) bench_serve.py on cuda: tokens/s at 1..32 concurrent clients (target:
#           16 >= 10x one); needs fastapi, uvicorn and openai: their wheels in .whl/, e.g.
#           pip download --only-binary :all: --python-version 3.12 -d .whl fastapi uvicorn openai
#
# The TinyLlama checkpoint e2e needs is built and packed in the background while the tests run.
# Narrower or other runs: DECODE_ARGS (bench_decode shapes/sparsity), DECODE_COMPARE (a kernel
# file to time beside this one), CRC_ARGS (bench_crc_gpu), E2E_DTYPE, E2E_ARGS.
# Sections do not stop each other: each one's exit status and seconds go to $OUT/summary.txt,
# all output to $OUT/gpu_check.log, figures to $OUT/{decode,crc,io-profile,e2e}.json (+ PNGs).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-${PYTHON:-python3}}
OUT=${OUT:-$PWD/gpu-check-out}
SITE=${ENDOR_SITE:-/tmp/endor-site}
SCRATCH=${ENDOR_SCRATCH:-/tmp/endor-gpu-check}
export ENDOR_CACHE_DIR=${ENDOR_CACHE_DIR:-$SCRATCH/cache}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" "$SCRATCH"
LOG="$OUT/gpu_check.log"
SECTIONS=${*:-setup tests decode crc io e2e}

# run NAME LIMIT_S CMD...: one step, its output in the log, its status in the summary
run() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "==== $name: $*" >>"$LOG"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "$name: exit $rc in $(( $(date +%s) - start )) s (limit $limit s)" | tee -a "$OUT/summary.txt" >>"$LOG"
    return $rc
}

has() { [[ " $SECTIONS " == *" $1 "* ]]; }

if has setup; then
    if ! "$PY" -c "import kvikio, crc32c" >/dev/null 2>&1 && [ -d .whl ] || \
       { has serve && ! "$PY" -c "import fastapi, uvicorn, openai" >/dev/null 2>&1 && [ -d .whl ]; }; then
        run install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" .whl/*.whl
    fi
    # setup.py first; a plain compiler call where that host's setuptools is too old for pyproject.toml
    run build 60 bash -c "$PY setup.py -q build_ext --inplace || gcc -O3 -std=c11 -Wall -shared -fPIC \
        -I\$($PY -c 'import sysconfig; print(sysconfig.get_paths()[\"include\"])') csrc/endor_cpu.c \
        -o endor_gds/decode/_endor_cpu\$($PY -c 'import sysconfig; print(sysconfig.get_config_var(\"EXT_SUFFIX\"))')"
    run versions 60 bash -c "nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv; nproc; df -h $SCRATCH; \
        $PY -c 'import torch, cupy, kvikio, transformers, accelerate; print(\"torch\", torch.__version__, torch.cuda.get_device_name(0)); print(\"cupy\", cupy.__version__, \"kvikio\", kvikio.__version__, \"transformers\", transformers.__version__, \"accelerate\", accelerate.__version__); import endor_gds.read.readers as io; r = io.open_reader(\"setup.py\", device=\"cuda\"); print(\"reader mode for cuda:\", r.mode); r.close()'"
fi

prep_pid=""
if has e2e; then  # CPU and disk work only: overlaps the GPU tests
    echo "==== prep (background): build + pack tinyllama-1.1b" >>"$LOG"
    timeout 300 "$PY" -c "from endor_gds.benchmarks import e2e; c = e2e.build_checkpoint('tinyllama-1.1b', '${E2E_DTYPE:-float16}', progress=False); print(e2e.packed_variants(c, 0.5, progress=False, kinds=tuple(e2e.VARIANTS)))" \
        >"$SCRATCH/prep.log" 2>&1 &
    prep_pid=$!
fi

if has tests; then
    run tests 270 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests -rs --durations=12
    run bench-smoke 45 "$PY" -m pytest -q -p no:cacheprovider tests/benchmarks/test_bench_decode.py
fi

if [ -n "$prep_pid" ]; then
    start=$(date +%s)
    wait "$prep_pid"
    rc=$?
    cat "$SCRATCH/prep.log" >>"$LOG"
    echo "prep: exit $rc, waited $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt" >>"$LOG"
fi

if has decode; then
    # bf16, every codec (format v1 raw, v2 expdict, v3 exphuff rows for every case; unpruned: exphuff
    # without a bitmap); DECODE_ARGS narrows it.
    # DECODE_COMPARE=old.cu (another version of the kernel file, e.g. git show REV:cuda/endor_decode.cu
    # into a carried, git-ignored folder) also times that kernel in the same runs.
    run decode 180 bash -c "$PY bench/bench_decode.py --json --repeats 5 --warmup 1 --storage-bytes 1GiB \
        --dtype BF16 --codecs raw,expdict,exphuff ${DECODE_ARGS:---sparsity 0,0.5} --storage-dir $SCRATCH \
        ${DECODE_COMPARE:+--compare-source $DECODE_COMPARE} >$OUT/decode.json"
fi

if has crc; then
    # CRC_ARGS: other extents, e.g. --segment-bytes 4KiB,1MiB,64MiB --nbytes 512MiB
    run crc 60 bash -c "$PY bench/bench_crc_gpu.py --json --repeats 9 --warmup 2 ${CRC_ARGS:-} >$OUT/crc.json"
fi

if has io; then
    mkdir -p "$SCRATCH/profile"
    run io 60 "$PY" -m endor_gds profile-io "$SCRATCH/profile" --size 2GiB --modes kvikio,posix-direct \
        --threads 4,8,16 --chunk 4MiB,16MiB --repeats 2 --json "$OUT/io-profile.json" --plot "$OUT/io-profile.png"
fi

if has e2e; then
    run e2e 200 "$PY" bench/bench_e2e.py --device cuda --dtype "${E2E_DTYPE:-float16}" \
        ${E2E_ARGS:---tiers ssd,ram --tokens 6 --rounds 2 --v3} --quiet \
        --json "$OUT/e2e.json" --plot "$OUT/e2e.png"
    # mixtures of experts on the GPU: the expert cache's CUDA backend, routed vs every expert (seconds)
    run e2e-moe 60 "$PY" bench/bench_e2e.py --device cuda --config tiny-moe --dtype bfloat16 --tokens 4 \
        --all-experts --no-v2 --quiet --json "$OUT/e2e-moe.json"
fi
if has serve; then
    run serve 240 "$PY" bench/bench_serve.py --device cuda --levels 1,2,4,8,16,32 \
        --json "$OUT/serve.json" --plot "$OUT/serve.png"
fi
echo "done: $(date -u)" >>"$OUT/summary.txt"
