# Session 8, call A: L2 weight streaming (model/l2stream.py). GPU tests of the prefetch (kernel + step
# bit-identity), then A/B per preset at batch 1: BRAID_L2_PREFETCH_MB=0 (off) vs the default (40% of L2),
# each pair on one card, one after the other.
export PYTHONPATH=$PWD:${PYTHONPATH:-}
ab() {  # ab MODEL:BATCH NEW TIMEOUT [MB values...]
  local mb=$1 new=$2 to=$3; shift 3
  for v in "$@"; do
    if [ "$v" = def ]; then
      gc STAGES=bench BENCH_MODELS="$mb:braid" NEW=$new WARMUP=1 TAG=-pf-def BENCH_TIMEOUT=$to \
         BENCH_ARGS="--chat none --check none --no-agreement"
    else
      BRAID_L2_PREFETCH_MB=$v gc STAGES=bench BENCH_MODELS="$mb:braid" NEW=$new WARMUP=1 TAG=-pf-$v \
         BENCH_TIMEOUT=$to BENCH_ARGS="--chat none --check none --no-agreement"
    fi
  done
}
lane0() {
  gc STAGES=env
  BRAID_GPU_TESTS=1 TRITON_INTERPRET=0 timeout 120 python3 -m pytest -q tests/test_kernel_gemv.py -k "l2_prefetch" \
    > "$WORK/tests-pf-kernel.log" 2>&1; tail -n 3 "$WORK/tests-pf-kernel.log"; cp "$WORK/tests-pf-kernel.log" "$OUT/"
  BRAID_GPU_TESTS=1 TRITON_INTERPRET=0 timeout 120 python3 -m pytest -q tests/test_gpu.py -k "l2_weight" \
    > "$WORK/tests-pf-step.log" 2>&1; tail -n 3 "$WORK/tests-pf-step.log"; cp "$WORK/tests-pf-step.log" "$OUT/"
  ab qwen2.5-0.5b:1 128 80 0 def 12 32
}
lane1() { gc STAGES=env; ab qwen3-0.6b:1 128 90 0 def; ab llama-3.2-1b:1 128 90 0 def; ab qwen2.5-0.5b:1 128 80 0 def; }
lane2() { gc STAGES=env; ab smollm2-135m:1 128 80 0 def; ab qwen2.5-1.5b:1 128 90 0 def; ab qwen2.5-0.5b:16 128 90 0 def; }
lane3() { gc STAGES=env; ab gemma-2-2b:1 128 120 0 def; ab llama-3.1-8b:1 64 150 0 def; }
