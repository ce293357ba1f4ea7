# Session 6, call A (issue #13): 4 lanes. See scripts/lanes_gpu.sh.
lane0() {  # prefill-graph fix on the GPU, TTFT with graphs, cold start, the fused Gemma-2 / Granite
  gc STAGES="env test-gpu" TESTS_K="prefill or realloc" TESTS_TIMEOUT=200
  gc STAGES=bench BENCH_MODELS="qwen2.5-0.5b:1:stock,braid" NEW=64 TAG=-ttft BENCH_TIMEOUT=240 \
     BENCH_ARGS="--ttft-prompts 128,2048,8192"
  gc STAGES=cold COLD_TIMEOUT=120
  gc STAGES=bench BENCH_MODELS="gemma-2-9b:1:stock,braid granite-3.1-2b:1:stock,braid" NEW=64 \
     BENCH_TIMEOUT=200 BENCH_ARGS="--chat none"
}
lane1() {  # batch sweep, Qwen2.5-0.5B, every variant
  gc STAGES="env bench" BENCH_MODELS="qwen2.5-0.5b:1,2,4,8,16,32,64:stock,hf-static,braid" NEW=64 \
     WARMUP=1 BENCH_TIMEOUT=530 VARIANT_TIMEOUT=500 BENCH_ARGS="--chat none --check first"
}
lane2() {  # batch sweep, Llama-3.1-8B stock vs braid; then KV bandwidth at 8k/32k (small models)
  gc STAGES="env bench" BENCH_MODELS="llama-3.1-8b:1,2,4,8,16,32,64:stock,braid" NEW=64 WARMUP=1 \
     BENCH_TIMEOUT=330 VARIANT_TIMEOUT=300 BENCH_ARGS="--chat none --check none"
  gc STAGES=kvbw KV_MODELS="qwen2.5-0.5b llama-3.2-1b" KV_TIMEOUT=150
}
lane3() {  # HF static + compile for Llama-3.1-8B, one batch per braid-bench call (each finishes alone)
  gc STAGES="env bench" BENCH_MODELS="llama-3.1-8b:1:hf-static llama-3.1-8b:16:hf-static llama-3.1-8b:64:hf-static llama-3.1-8b:4:hf-static" \
     NEW=64 WARMUP=1 BENCH_TIMEOUT=200 VARIANT_TIMEOUT=190 BENCH_ARGS="--chat none --check none --no-agreement"
}
