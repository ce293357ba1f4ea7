# Session 8, call C: issue #10's presets at batch 1 as the issue measures them (prompt 128, 256 new
# tokens), braid next to HF static (and stock where time allows) on one card per model; the L2 streaming
# "next small weight" policy swept on four presets; per-layer times of both backends; the CuPy GPU tests.
export PYTHONPATH=$PWD:${PYTHONPATH:-}
B="--chat none --check first --no-agreement"
lane0() {
  gc STAGES="env bench" BENCH_MODELS="qwen2.5-0.5b:1:stock,hf-static,braid" NEW=256 WARMUP=1 BENCH_TIMEOUT=270 BENCH_ARGS="$B"
  gc STAGES=bench BENCH_MODELS="qwen3-0.6b:1:hf-static,braid" NEW=256 WARMUP=1 BENCH_TIMEOUT=250 BENCH_ARGS="$B"
}
lane1() {
  gc STAGES="env bench" BENCH_MODELS="llama-3.2-1b:1:stock,hf-static,braid" NEW=256 WARMUP=1 BENCH_TIMEOUT=270 BENCH_ARGS="$B"
  gc STAGES=bench BENCH_MODELS="smollm2-135m:1:hf-static,braid" NEW=256 WARMUP=1 BENCH_TIMEOUT=250 BENCH_ARGS="$B"
}
lane2() {
  gc STAGES="env bench" BENCH_MODELS="qwen2.5-1.5b:1:hf-static,braid" NEW=256 WARMUP=1 BENCH_TIMEOUT=280 BENCH_ARGS="$B"
  gc STAGES=bench BENCH_MODELS="gemma-2-2b:1:stock,braid" NEW=256 WARMUP=1 BENCH_TIMEOUT=230 BENCH_ARGS="$B"
}
sw() {
  timeout $3 python3 benchmarks/l2_prefetch_sweep.py $1 --batch $2 --variants "$4" --out "$OUT/sweep-$1-b$2.json" \
    > "$OUT/sweep-$1-b$2.log" 2>&1; tail -n 8 "$OUT/sweep-$1-b$2.log"
}
lane3() {
  V="0 2:next 4:next 8:next 2 0"
  sw qwen2.5-0.5b 1 70 "$V"; sw llama-3.2-1b 1 70 "$V"; sw smollm2-135m 1 70 "$V"; sw qwen2.5-1.5b 1 70 "$V"
  timeout 150 python3 benchmarks/cupy_phases.py --models qwen2.5-0.5b llama-3.2-1b --buckets 1 --ctx 128 \
    --budget 100 --out "$OUT/cupy-phases.json" > "$OUT/cupy-phases.log" 2>&1; tail -n 25 "$OUT/cupy-phases.log"
  BRAID_GPU_TESTS=1 TRITON_INTERPRET=0 timeout 100 python3 -m pytest -q -m gpu tests/test_gpu_cupy.py tests/test_gpu.py \
    -k "cupy or l2_weight" > "$OUT/tests-cupy.log" 2>&1; tail -n 3 "$OUT/tests-cupy.log"
}
