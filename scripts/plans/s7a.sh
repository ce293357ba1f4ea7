# Session 7, call A (issues #13, #10): 4 lanes. See scripts/lanes_gpu.sh.
export PYTHONPATH=$PWD:${PYTHONPATH:-}
lane0() {  # TTFT: the maskless captured prefill at 8192 (cap raised for the run) and 4096; warm first call
           # under cProfile; small-matrix GEMV tiles at batch 4-16 (Qwen2.5-0.5B shapes)
  gc STAGES=env
  timeout 200 python3 benchmarks/prefill_diag.py qwen2.5-0.5b --len 8192 --cap 8192 > "$WORK/prefill-diag-8192.log" 2>&1
  timeout 120 python3 benchmarks/prefill_diag.py qwen2.5-0.5b --len 4096 > "$WORK/prefill-diag-4096.log" 2>&1
  tail -n 30 "$WORK"/prefill-diag-*.log
  PROFILE_WARM=1 gc STAGES=cold COLD_TIMEOUT=100
  timeout 200 python3 benchmarks/kernels/bench_gemv.py --batches 4,8,16 --budget 150 --out "$WORK/gemv-b4-16.json" \
    > "$WORK/gemv-b4-16.log" 2>&1; tail -n 40 "$WORK/gemv-b4-16.log"
  gc STAGES=env
}
lane1() {  # 7B presets at batch 1 next to stock and HF static + compile (same card)
  gc STAGES="env bench" BENCH_MODELS="qwen2.5-7b:1:stock,hf-static,braid mistral-7b-v0.3:1:stock,hf-static,braid" \
     NEW=64 WARMUP=1 BENCH_TIMEOUT=270 VARIANT_TIMEOUT=240 BENCH_ARGS="--chat none --check none --no-agreement"
}
lane2() {  # Gemma-2-9B batch 1 next to stock and HF static + compile
  gc STAGES="env bench" BENCH_MODELS="gemma-2-9b:1:stock,hf-static,braid" \
     NEW=64 WARMUP=1 BENCH_TIMEOUT=520 VARIANT_TIMEOUT=330 BENCH_ARGS="--chat none --check none --no-agreement"
}
lane3() {  # Llama-3.1-8B at context 32k, batch 8: stock, HF static and braid (speed and peak memory)
  gc STAGES="env bench" BENCH_MODELS="llama-3.1-8b:8:braid,stock,hf-static" PROMPT=32768 NEW=32 REPS=2 WARMUP=1 \
     TAG=-32k BENCH_TIMEOUT=540 VARIANT_TIMEOUT=300 BENCH_ARGS="--chat none --check none --no-agreement"
}
