#!/usr/bin/env bash
# The one GPU run: GPU tests, kernel microbenchmarks and A/B benchmarks, then a short table.
#   bash scripts/gpu_check.sh                 # everything
#   STAGES="tests bench" bash scripts/gpu_check.sh
# Results land in $OUT (the device tool's output folder) or ./gpu-out: one tarball of everything
# plus summary.txt, so that the device tool's 8-file limit is never hit.
set -u
OUT=${OUT:-$PWD/gpu-out}
WORK=$(mktemp -d /tmp/braid-gpu.XXXX)
mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-} BRAID_GPU_TESTS=1 PYTHONUNBUFFERED=1
STAGES=${STAGES:-"env tests kernels bench"}
BENCH_MODELS=${BENCH_MODELS:-"qwen2.5-0.5b:1,16 qwen3-0.6b:1 llama-3.2-1b:1"}
VARIANTS=${VARIANTS:-stock,hf-static,braid-eager,braid}
t0=$(date +%s)
stage() { echo; echo "=== $1 ($(( $(date +%s) - t0 ))s)"; }

for s in $STAGES; do
  case $s in
  env)
    stage env
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      python3 -c "import torch,transformers,triton;print('torch',torch.__version__,'transformers',transformers.__version__,'triton',triton.__version__)"
      date -u +%FT%TZ; } 2>&1 | tee "$WORK/env.txt" ;;
  tests)
    stage tests
    BRAID_GPU_JSON=$WORK/gpu_errors.json timeout ${TESTS_TIMEOUT:-420} python3 -m pytest -q -rA \
      ${TESTS:-tests/test_gpu.py} -p no:cacheprovider 2>&1 | tee "$WORK/tests.log" | grep -E "passed|failed|PASS|FAIL|Error|error" | tail -n 40 ;;
  kernels)
    stage kernels
    timeout 150 python3 benchmarks/kernels/bench_gemv.py --out "$WORK/gemv.json" --budget ${GEMV_BUDGET:-40} 2>&1 | tee "$WORK/gemv.log" | tail -n 25
    timeout 120 python3 benchmarks/kernels/bench_attention.py --out "$WORK/attention.json" 2>&1 | tee "$WORK/attention.log" | tail -n 20 ;;
  bench)
    for mb in $BENCH_MODELS; do
      m=${mb%%:*}; b=${mb#*:}
      stage "bench $m batch $b"
      timeout ${BENCH_TIMEOUT:-600} python3 -m braid_backend.bench -m "$m" -b "$b" --variants "$VARIANTS" \
        -p 128 -n 256 --reps 3 --warmup 2 --timeout 400 -o "$WORK/bench-$m" 2>&1 | tee "$WORK/bench-$m.log" | tail -n 12
    done ;;
  esac
done

stage summary
python3 scripts/summarize_gpu.py "$WORK" 2>&1 | tee "$WORK/summary.txt"
tar -czf "$OUT/gpu-results.tgz" -C "$WORK" .
cp "$WORK/summary.txt" "$OUT/summary.txt"
echo "done in $(( $(date +%s) - t0 ))s"
