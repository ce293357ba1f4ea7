#!/usr/bin/env bash
# The one GPU run: GPU tests, kernel microbenchmarks and A/B benchmarks, then a short table.
#   bash scripts/gpu_check.sh                 # everything
#   STAGES="tests bench" bash scripts/gpu_check.sh
#   STAGES="env test-reliability breakdown bench test-kernel" BENCH_MODELS="qwen2.5-0.5b:1:braid" bash scripts/gpu_check.sh
#   STAGES=bench BENCH_MODELS="llama-3.1-8b:1,16:stock,braid,braid-fp8,braid-int4" bash scripts/gpu_check.sh  # issue #24
#   STAGES=bench BENCH_MODELS="mixtral-8x7b:1,16:stock,braid" BENCH_ARGS="--check none" bash scripts/gpu_check.sh  # #23
#   BENCH_ARGS="--ttft-prompts 128,2048" PROMPT=8000 NEW=64 TAG=-8k: extra braid-bench flags, lengths, a
#   suffix for the result folder (stage cold: scripts/cold_start_gpu.sh)
# Results land in $OUT (the device tool's output folder) or ./gpu-out: one tarball of everything
# plus summary.txt, so that the device tool's 8-file limit is never hit.
set -u
OUT=${OUT:-$PWD/gpu-out}
# WORK: reuse one folder across invocations (scripts/lanes_gpu.sh), so every publish has all of it
WORK=${WORK:-$(mktemp -d /tmp/braid-gpu.XXXX)}
mkdir -p "$OUT" "$WORK"
# TRITON_INTERPRET=0 wins over the test files' setdefault("TRITON_INTERPRET", "1") for CPU runs
export PYTHONPATH=$PWD:${PYTHONPATH:-} BRAID_GPU_TESTS=1 PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
STAGES=${STAGES:-"env tests kernels breakdown bench"}
# model:batches[:variants] entries
BENCH_MODELS=${BENCH_MODELS:-"qwen2.5-0.5b:1,16 qwen3-0.6b:1 llama-3.2-1b:1"}
VARIANTS=${VARIANTS:-stock,hf-static,braid-eager,braid}
t0=$(date +%s)
stage() { echo; echo "=== $1 ($(( $(date +%s) - t0 ))s)"; }
# after every stage: everything so far goes to $OUT, so a run cut off by its time limit still reports
publish() {
  python3 scripts/summarize_gpu.py "$WORK" > "$WORK/summary.txt" 2>&1
  tar -czf "$OUT/gpu-results.tgz" -C "$WORK" . && cp "$WORK/summary.txt" "$OUT/summary.txt"
}

for s in $STAGES; do
  case $s in
  env)
    stage env
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      python3 -c "import torch,transformers,triton;print('torch',torch.__version__,'transformers',transformers.__version__,'triton',triton.__version__)"
      date -u +%FT%TZ; } 2>&1 | tee "$WORK/env.txt" ;;
  tests|test-*)
    # one pytest per group, each with its own time limit and log, published as soon as it ends;
    # stage "test-<group>" runs one group (so groups can interleave with other stages)
    groups=${TEST_GROUPS:-kernel reliability gpu families moe quant optimum}
    [ "${s#test-}" != "$s" ] && groups=${s#test-}
    for grp in $groups; do
      stage "tests $grp"
      case $grp in
        kernel) files="tests/test_kernel_gemv.py tests/test_kernel_rmsnorm.py tests/test_kernel_rope_cache.py tests/test_kernel_attention.py tests/test_kernel_attention_sinks.py tests/test_kernel_greedy_select.py tests/test_kernel_moe.py tests/test_kernel_quant_gemv.py"; sel="" ;;
        moe) files=tests/test_moe_families.py; sel="-m gpu" ;;
        quant) files=tests/test_quant_models.py; sel="-m gpu" ;;
        reliability) files=tests/test_gpu_reliability.py; sel="-m gpu" ;;
        gpu) files=tests/test_gpu.py; sel="-m gpu" ;;
        families) files=tests/test_families.py; sel="-m gpu" ;;
        optimum) files=tests/test_optimum.py; sel="-m gpu" ;;
        # a file path: kernel test files hold no gpu-marked tests (they run on the GPU as they are)
        */test_kernel_*) files=$grp; sel="" ;;
        *) files=$grp; sel="-m gpu" ;;
      esac
      tlog=$WORK/tests-$(basename "$grp" .py).log   # a group may be a test file path
      BRAID_GPU_JSON=$WORK/gpu_errors.json BRAID_RELIABILITY_JSON=$WORK/reliability.json \
        timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -rA --durations=8 $files $sel ${TESTS_K:+-k "$TESTS_K"} \
        -p no:cacheprovider > "$tlog" 2>&1
      echo "exit $?" >> "$tlog"
      grep -E "^(FAILED|ERROR)|passed|failed|^exit" "$tlog" | tail -n 12
      publish
    done ;;
  kernels)
    stage kernels
    timeout 150 python3 benchmarks/kernels/bench_gemv.py --out "$WORK/gemv.json" --budget ${GEMV_BUDGET:-40} > "$WORK/gemv.log" 2>&1
    timeout 120 python3 benchmarks/kernels/bench_attention.py --out "$WORK/attention.json" > "$WORK/attention.log" 2>&1
    tail -n 3 "$WORK/gemv.log" "$WORK/attention.log" ;;
  cold)
    # cold start (issue #13): fresh processes, empty vs kept Triton cache, BRAID_PRECOMPILE=1/0
    stage cold
    OUT=$WORK/cold CASE_TIMEOUT=${COLD_TIMEOUT:-150} timeout 500 bash scripts/cold_start_gpu.sh 2>&1 | tail -n 12 ;;
  kvbw)
    # long-context attention: KV read bandwidth per kernel (benchmarks/kv_bandwidth.py)
    for m in ${KV_MODELS:-qwen2.5-0.5b}; do
      stage "kvbw $m"
      timeout ${KV_TIMEOUT:-300} python3 benchmarks/kv_bandwidth.py "$m" --batch ${KV_BATCH:-1,8} --ctx ${KV_CTX:-8192,32768} \
        --out "$WORK/kvbw-$m.json" > "$WORK/kvbw-$m.log" 2>&1
      tail -n 6 "$WORK/kvbw-$m.log"
      publish
    done ;;
  breakdown)
    stage breakdown
    timeout ${BREAKDOWN_TIMEOUT:-200} python3 benchmarks/step_breakdown.py qwen2.5-0.5b --out "$WORK/breakdown.json" > "$WORK/breakdown.log" 2>&1
    grep -vE "^    \(" "$WORK/breakdown.log" | tail -n 20 ;;
  bench)
    for mb in $BENCH_MODELS; do
      m=${mb%%:*}; rest=${mb#*:}; b=${rest%%:*}; v=${rest#*:}; [ "$v" = "$rest" ] && v=$VARIANTS
      stage "bench $m batch $b ($v)"
      timeout ${BENCH_TIMEOUT:-600} python3 -m braid_backend.bench -m "$m" -b "$b" --variants "$v" \
        -p ${PROMPT:-128} -n ${NEW:-256} --reps ${REPS:-3} --warmup ${WARMUP:-2} --timeout ${VARIANT_TIMEOUT:-400} \
        ${BENCH_ARGS:-} -o "$WORK/bench-$m-b${b//,/_}${TAG:-}" > "$WORK/bench-$m-b${b//,/_}${TAG:-}.log" 2>&1
      tail -n 8 "$WORK/bench-$m-b${b//,/_}${TAG:-}.log"
      publish
    done ;;
  esac
  publish
done

stage summary
publish
cat "$WORK/summary.txt"
echo "done in $(( $(date +%s) - t0 ))s"
