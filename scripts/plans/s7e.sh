# Session 7, call E: the attention merge in the last split (one kernel per layer fewer): GPU kernel tests,
# A/B on Qwen2.5-0.5B batch 1 (BRAID_FUSED_COMBINE=0 = the combine kernel), the 7-9B and 1B batch-1 steps.
export PYTHONPATH=$PWD:${PYTHONPATH:-}
lane0() {
  gc STAGES=env
  BRAID_GPU_TESTS=1 TRITON_INTERPRET=0 timeout 150 python3 -m pytest -q tests/test_kernel_attention.py \
    > "$WORK/tests-attention.log" 2>&1; tail -n 3 "$WORK/tests-attention.log"
  BRAID_FUSED_COMBINE=0 gc STAGES=bench BENCH_MODELS="qwen2.5-0.5b:1:braid" NEW=128 WARMUP=1 TAG=-combine-kernel \
     BENCH_TIMEOUT=80 BENCH_ARGS="--chat none --check none --no-agreement"
  gc STAGES=bench BENCH_MODELS="qwen2.5-0.5b:1:braid" NEW=128 WARMUP=1 TAG=-fused-merge \
     BENCH_TIMEOUT=80 BENCH_ARGS="--chat none --check first --no-agreement"
}
lane1() { gc STAGES="env bench" BENCH_MODELS="llama-3.1-8b:1:braid" NEW=64 WARMUP=1 BENCH_TIMEOUT=150 \
            BENCH_ARGS="--chat none --check first --no-agreement"; }
lane2() { gc STAGES="env bench" BENCH_MODELS="qwen2.5-7b:1:braid mistral-7b-v0.3:1:braid" NEW=64 WARMUP=1 \
            BENCH_TIMEOUT=100 BENCH_ARGS="--chat none --check none --no-agreement"; }
lane3() { gc STAGES="env bench" BENCH_MODELS="llama-3.2-1b:1:braid qwen2.5-0.5b:8:braid" NEW=128 WARMUP=1 \
            BENCH_TIMEOUT=90 BENCH_ARGS="--chat none --check first --no-agreement"; }
