# Session 6, call B (issue #13): long contexts, the TTFT-at-8192 diagnosis, the 8B batch GEMM sweep.
LC="--chat none --check none --no-agreement"
lane0() {  # TTFT 8192 diagnosis; Qwen2.5-0.5B decode at 8k and 32k contexts
  gc STAGES=env
  timeout 150 python3 benchmarks/prefill_diag.py qwen2.5-0.5b --len 8192 > "$WORK/prefill-diag.log" 2>&1
  tail -n 5 "$WORK/prefill-diag.log"
  gc STAGES=bench BENCH_MODELS="qwen2.5-0.5b:1,8:stock,hf-static,braid" PROMPT=8192 NEW=64 WARMUP=1 TAG=-ctx8k \
     BENCH_TIMEOUT=180 VARIANT_TIMEOUT=170 BENCH_ARGS="$LC"
  gc STAGES=bench BENCH_MODELS="qwen2.5-0.5b:1,8:stock,hf-static,braid" PROMPT=32000 NEW=64 WARMUP=1 TAG=-ctx32k \
     BENCH_TIMEOUT=200 VARIANT_TIMEOUT=190 BENCH_ARGS="$LC"
}
lane1() {  # Llama-3.1-8B projections at batch 4/8/16: the tensor-core path's configs
  gc STAGES=env
  timeout 420 python3 benchmarks/kernels/bench_gemv.py --shapes llama-3.1-8b --batches 4,8,16 --wide --budget 330 \
    --out "$WORK/gemv-llama8b.json" > "$WORK/gemv-llama8b.log" 2>&1
  tail -n 40 "$WORK/gemv-llama8b.log"
  gc STAGES=kvbw KV_MODELS="qwen2.5-0.5b" KV_TIMEOUT=90
}
lane2() {  # Llama-3.2-1B at 8k and 32k contexts
  gc STAGES="env bench" BENCH_MODELS="llama-3.2-1b:1,8:stock,hf-static,braid" PROMPT=8192 NEW=64 WARMUP=1 TAG=-ctx8k \
     BENCH_TIMEOUT=220 VARIANT_TIMEOUT=200 BENCH_ARGS="$LC"
  gc STAGES=bench BENCH_MODELS="llama-3.2-1b:1,8:stock,hf-static,braid" PROMPT=32000 NEW=64 WARMUP=1 TAG=-ctx32k \
     BENCH_TIMEOUT=240 VARIANT_TIMEOUT=220 BENCH_ARGS="$LC"
}
lane3() {  # Llama-3.1-8B at 8k and 32k contexts; KV read bandwidth per kernel
  gc STAGES="env kvbw" KV_MODELS="llama-3.1-8b llama-3.2-1b" KV_TIMEOUT=110
  gc STAGES=bench BENCH_MODELS="llama-3.1-8b:1,8:stock,hf-static,braid" PROMPT=8192 NEW=32 WARMUP=1 REPS=2 TAG=-ctx8k \
     BENCH_TIMEOUT=200 VARIANT_TIMEOUT=190 BENCH_ARGS="$LC"
  gc STAGES=bench BENCH_MODELS="llama-3.1-8b:1:stock,hf-static,braid" PROMPT=32000 NEW=32 WARMUP=1 REPS=2 TAG=-ctx32k \
     BENCH_TIMEOUT=150 VARIANT_TIMEOUT=140 BENCH_ARGS="$LC"
}
