# Session 7, call B: split-K tiles (GPU tests, sweep, end to end), the one-step precompile dry run and
# triton_key join (warm first call), prefill-graph cap 8192 (TTFT), row-chunked prefill (8B 32k batch 8).
export PYTHONPATH=$PWD:${PYTHONPATH:-}
lane0() {  # split-K kernel on the GPU (memory ordering of the last-arriver sum), then the sweep
  gc STAGES="env test-tests/test_kernel_gemv.py" TESTS_TIMEOUT=200
  timeout 260 python3 benchmarks/kernels/bench_gemv.py --batches 4,8,16 --split --budget 200 \
    --out "$WORK/gemv-split.json" > "$WORK/gemv-split.log" 2>&1; tail -n 40 "$WORK/gemv-split.log"
  gc STAGES=env
}
lane1() {  # Qwen2.5-0.5B batch 1-16 with split-K (default) next to HF static; then split-K off (A/B)
  gc STAGES="env bench" BENCH_MODELS="qwen2.5-0.5b:1,2,4,8,16:hf-static,braid" NEW=128 WARMUP=1 \
     BENCH_TIMEOUT=330 VARIANT_TIMEOUT=300 BENCH_ARGS="--chat none --check all"
  BRAID_SPLIT_K=0 gc STAGES=bench BENCH_MODELS="qwen2.5-0.5b:4,8,16:braid" NEW=128 WARMUP=1 TAG=-nosplit \
     BENCH_TIMEOUT=150 BENCH_ARGS="--chat none --check none --no-agreement"
}
lane2() {  # warm / cold first call (one-step dry run), TTFT at 128 / 2048 / 8192 and the chat call
  PROFILE_WARM=1 gc STAGES="env cold" COLD_TIMEOUT=100
  gc STAGES=bench BENCH_MODELS="qwen2.5-0.5b:1:stock,braid" NEW=64 TAG=-ttft BENCH_TIMEOUT=240 \
     BENCH_ARGS="--ttft-prompts 128,2048,8192"
}
lane3() {  # prefill tests on the GPU; Llama-3.1-8B batch 8 at 32k with the row-chunked prefill
  gc STAGES="env test-gpu" TESTS_K="prefill or realloc" TESTS_TIMEOUT=150
  gc STAGES=bench BENCH_MODELS="llama-3.1-8b:8:braid" PROMPT=32768 NEW=32 REPS=2 WARMUP=1 TAG=-32k \
     BENCH_TIMEOUT=330 VARIANT_TIMEOUT=300 BENCH_ARGS="--chat none --check none --no-agreement"
}
