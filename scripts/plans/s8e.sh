# Session 8, call E: RoPE + q/k norm + cache write in the attention kernel (decode_attention(rope=...),
# one launch per layer fewer). GPU kernel tests, numerics tests, then A/B: graph replays of the step
# (benchmarks/l2_prefetch_sweep.py "0" = fused vs "0:rope-kernel"), braid-bench end to end.
export PYTHONPATH=$PWD:${PYTHONPATH:-}
sw() {
  timeout $3 python3 benchmarks/l2_prefetch_sweep.py $1 --batch $2 --variants "0:rope-kernel 0 0:rope-kernel 0" \
    --out "$WORK/rope-$1-b$2.json" > "$WORK/rope-$1-b$2.log" 2>&1; tail -n 5 "$WORK/rope-$1-b$2.log"
}
ab() {
  BRAID_FUSED_ROPE=0 gc STAGES=bench BENCH_MODELS="$1:braid" NEW=128 WARMUP=1 TAG=-rope-kernel BENCH_TIMEOUT=$2 \
     BENCH_ARGS="--chat none --check none --no-agreement"
  gc STAGES=bench BENCH_MODELS="$1:braid" NEW=128 WARMUP=1 TAG=-rope-fused BENCH_TIMEOUT=$2 \
     BENCH_ARGS="--chat none --check none --no-agreement"
}
# two lanes (only nvidia-h100-x2 was lent for this call)
lane0() { gc STAGES=env; BRAID_GPU_TESTS=1 TRITON_INTERPRET=0 timeout 150 python3 -m pytest -q tests/test_kernel_rope_cache.py \
            tests/test_kernel_attention.py > "$WORK/tests-rope-attn.log" 2>&1; tail -n 3 "$WORK/tests-rope-attn.log"
          sw qwen2.5-0.5b 1 60; sw qwen3-0.6b 1 60; sw llama-3.2-1b 1 60; sw smollm2-135m 1 60; ab qwen2.5-0.5b:1 70; }
lane1() { gc STAGES="env test-gpu" TESTS_K="bf16_error or graph_fast_loop or no_host_sync or seeded" TESTS_TIMEOUT=170
          gc STAGES="test-families" TESTS_TIMEOUT=200; sw gemma-2-2b 1 70; sw qwen2.5-1.5b 1 50; }
