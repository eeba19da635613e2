#!/usr/bin/env bash
# The GPU checks a backend change must pass before it is resolved, in one go: the CUDA tests, then the benchmarks
# it names. Usage, from the repository root on a CUDA machine (shared/ beside the repo for the golden cases):
#   benchmarks/gpu_verify.sh OUT_DIR [tests] [bench] [asset] [texturing] [pool]
# Each part writes its log (and JSON) into OUT_DIR and is capped in time, so one slow part cannot eat the others.
set -u
out="$1"; shift
mkdir -p "$out"
run() {  # name, seconds, command...
    local name="$1" limit="$2"; shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start))s"; tail -n 25 "$out/$name.log"
}
for part in "$@"; do
    case "$part" in
        tests) run cuda_tests 240 python -m pytest -q -rs tests/native tests/models/test_cuda_paths.py \
                   tests/models/test_decoders.py tests/asset/test_postprocess.py ;;
        bench) run bench_gpu 300 python -m backend bench --pipeline 512 1024_cascade 1536_cascade --structure figure \
                   --memory gpu --kernels auto --runs 2 --asset --json "$out/bench_gpu.json"
               run bench_offload 120 python -m backend bench --pipeline 1024_cascade --structure figure \
                   --memory offload --kernels auto --runs 1 --json "$out/bench_offload.json" ;;
        asset) run asset 150 python benchmarks/bench_postprocess.py "$out/asset" ;;
        texturing) run texturing 150 python benchmarks/bench_texturing.py --json "$out/texturing.json" ;;
        pool) run pool_one 200 python benchmarks/pool_throughput.py --setup "--gpus 0" --clients 4 --jobs 2 \
                  --out "$out/pool.json"
              run pool_overlap 200 python benchmarks/pool_throughput.py --setup "--gpus 0 --overlap" --clients 4 \
                  --jobs 2 --out "$out/pool.json" ;;
        *) echo "unknown part $part" ;;
    esac
done
