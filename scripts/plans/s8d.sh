# Session 8, call D: what runs A-C did not verify. GPU kernel tests (the arrive_last refactor, the L2
# prefetch), the row-chunked prefill and L2-streaming step tests, the CuPy backend tests in full, the
# Qwen2.5-0.5B L2 sweep log lost in call C, cold / warm first call. Logs go to $WORK (one tarball per lane).
export PYTHONPATH=$PWD:${PYTHONPATH:-}
lane0() { gc STAGES="env test-kernel" TESTS_TIMEOUT=300; }
lane1() { gc STAGES="env test-gpu" TESTS_K="row_chunked or l2_weight or no_host_sync" TESTS_TIMEOUT=200; }
lane2() { gc STAGES="env test-tests/test_gpu_cupy.py" TESTS_TIMEOUT=330; }
lane3() {
  timeout 80 python3 benchmarks/l2_prefetch_sweep.py qwen2.5-0.5b --variants "0 2:next 4:next 2 4 0" \
    --out "$WORK/sweep-qwen2.5-0.5b-b1.json" > "$WORK/sweep-qwen2.5-0.5b-b1.log" 2>&1; tail -n 8 "$WORK/sweep-qwen2.5-0.5b-b1.log"
  gc STAGES="env cold" COLD_TIMEOUT=90
}
