# Session 7, call C: kernel tests on the GPU (split-K included), the tuned split heuristic end to end next
# to HF static, issue #10's presets at batch 1, TTFT on the issue's other models, the 8B batch-1 GEMV sweep.
export PYTHONPATH=$PWD:${PYTHONPATH:-}
lane0() {  # every kernel test on the GPU; then TTFT on the models of issue #13's table
  gc STAGES="env test-kernel" TESTS_TIMEOUT=240
  gc STAGES=bench BENCH_MODELS="qwen2.5-1.5b:1:stock,braid qwen3-0.6b:1:stock,braid smollm2-135m:1:stock,braid" \
     NEW=32 TAG=-ttft BENCH_TIMEOUT=150 BENCH_ARGS="--ttft-prompts 128,2048,8192 --chat none --check none --no-agreement"
}
lane1() {  # Qwen2.5-0.5B batch 1-16 with the tuned split heuristic, next to HF static (same card)
  gc STAGES="env bench" BENCH_MODELS="qwen2.5-0.5b:1,4,8,16:hf-static,braid" NEW=128 WARMUP=1 \
     BENCH_TIMEOUT=300 VARIANT_TIMEOUT=280 BENCH_ARGS="--chat none --check all"
}
lane2() {  # issue #10's presets, batch 1, braid vs stock (decode tok/s; the bandwidth limit in the same run)
  gc STAGES="env bench" BENCH_MODELS="qwen3-0.6b:1:stock,braid llama-3.2-1b:1:stock,braid smollm2-135m:1:stock,braid qwen2.5-1.5b:1:stock,braid gemma-2-2b:1:stock,braid" \
     NEW=256 WARMUP=1 BENCH_TIMEOUT=110 BENCH_ARGS="--chat none --check first --no-agreement"
}
lane3() {  # Llama-3.1-8B projections at batch 1: the GEMV tiles, swept wide; then the 8B batch-1 step
  timeout 280 python3 benchmarks/kernels/bench_gemv.py --shapes llama-3.1-8b --batches 1 --wide --budget 220 \
    --out "$WORK/gemv-llama8b-b1.json" > "$WORK/gemv-llama8b-b1.log" 2>&1; tail -n 12 "$WORK/gemv-llama8b-b1.log"
  gc STAGES="env bench" BENCH_MODELS="llama-3.1-8b:1:braid" NEW=64 WARMUP=1 TAG=-b1 BENCH_TIMEOUT=120 \
     BENCH_ARGS="--chat none --check none --no-agreement"
}
