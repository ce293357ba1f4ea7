# Session 6, call C: CuPy backend on the GPU (issue #10); 8B batch GEMM tiles, attention sweep, TTFT
# diagnosis, KV bandwidth without PDL overlap (issue #13).
export PYTHONPATH=$PWD:${PYTHONPATH:-}
lane0() {  # CuPy persistent layer kernel: GPU tests, then Triton vs CuPy end to end
  gc STAGES="env test-tests/test_gpu_cupy.py" TESTS_TIMEOUT=240
  gc STAGES=bench BENCH_MODELS="qwen2.5-0.5b:1,4:braid-triton,braid-cupy llama-3.2-1b:1:braid-triton,braid-cupy" \
     NEW=128 BENCH_TIMEOUT=150 VARIANT_TIMEOUT=140 BENCH_ARGS="--chat none --check first --no-agreement"
}
lane1() {  # Llama-3.1-8B batch sweep with the new tiles, HF static at 4 and 16 on the same card
  gc STAGES="env bench" BENCH_MODELS="llama-3.1-8b:1,2,4,8,16,32,64:braid-triton" NEW=64 WARMUP=1 \
     BENCH_TIMEOUT=200 VARIANT_TIMEOUT=190 BENCH_ARGS="--chat none --check none --no-agreement" TAG=-tiles
  gc STAGES=bench BENCH_MODELS="llama-3.1-8b:4,16:hf-static" NEW=64 WARMUP=1 \
     BENCH_TIMEOUT=200 VARIANT_TIMEOUT=190 BENCH_ARGS="--chat none --check none --no-agreement" TAG=-same-card
}
lane2() {  # attention: split count x tiles at 8k/32k; KV bandwidth per kernel without PDL overlap
  gc STAGES="env test-kernel" TESTS_K="big_model or heuristic or attention" TESTS_TIMEOUT=150
  BRAID_PDL=0 timeout 330 python3 benchmarks/kernels/attn_sweep.py --budget 280 --out "$WORK/attn-sweep.json" \
    > "$WORK/attn-sweep.log" 2>&1
  tail -n 8 "$WORK/attn-sweep.log"
  BRAID_PDL=0 gc STAGES=kvbw KV_MODELS="qwen2.5-0.5b llama-3.1-8b" KV_TIMEOUT=100
}
lane3() {  # TTFT at 8192: why braid's prefill is slower than stock's; Qwen2.5-0.5B sweep after the attention change
  gc STAGES=env
  timeout 150 python3 benchmarks/prefill_diag.py qwen2.5-0.5b --len 8192 > "$WORK/prefill-diag.log" 2>&1
  grep -v Warning "$WORK/prefill-diag.log" | tail -n 30
  gc STAGES=bench BENCH_MODELS="qwen2.5-0.5b:1,2,4,8,16,32,64:braid-triton" NEW=64 WARMUP=1 TAG=-s6c \
     BENCH_TIMEOUT=200 VARIANT_TIMEOUT=190 BENCH_ARGS="--chat none --check first --no-agreement --ttft-prompts 128,2048,8192"
}
