# Session 6, call D: verify the fixes of call C's findings (prefill layout, attention splits, the
# CuPy layer test) and measure the CuPy kernel's phases.
export PYTHONPATH=$PWD:${PYTHONPATH:-}
lane0() {  # CuPy: the fixed layer test, then the per-phase breakdown
  gc STAGES="env test-tests/test_gpu_cupy.py" TESTS_TIMEOUT=150
  [ -f benchmarks/cupy_phases.py ] && timeout 120 python3 benchmarks/cupy_phases.py --out "$WORK/cupy-phases.json" \
    > "$WORK/cupy-phases.log" 2>&1; tail -n 40 "$WORK/cupy-phases.log"
  gc STAGES=env
}
lane1() {  # TTFT at 128 / 2048 / 8192 and the chat call after the prefill-layout fix
  gc STAGES="env bench" BENCH_MODELS="qwen2.5-0.5b:1:stock,braid" NEW=64 TAG=-ttft BENCH_TIMEOUT=200 \
     BENCH_ARGS="--ttft-prompts 128,2048,8192"
}
lane2() {  # cold / warm first call with the default backend (auto); Llama-3.2-1B TTFT at 8192
  gc STAGES="env cold" COLD_TIMEOUT=100
  gc STAGES=bench BENCH_MODELS="llama-3.2-1b:1:stock,braid" NEW=32 TAG=-ttft BENCH_TIMEOUT=150 \
     BENCH_ARGS="--ttft-prompts 8192 --chat none --check none"
}
lane3() {  # prefill graph tests; KV bandwidth with the new split counts (PDL off: kernel time alone)
  gc STAGES="env test-gpu" TESTS_K="prefill or realloc" TESTS_TIMEOUT=120
  BRAID_PDL=0 gc STAGES=kvbw KV_MODELS="qwen2.5-0.5b llama-3.1-8b" KV_TIMEOUT=90
  gc STAGES=bench BENCH_MODELS="llama-3.1-8b:1,2,4:braid" NEW=64 WARMUP=1 TAG=-b2 BENCH_TIMEOUT=120 \
     BENCH_ARGS="--chat none --check none --no-agreement"
}
