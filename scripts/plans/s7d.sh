# Session 7, call D: the 7-9B batch-1 GEMV tiles end to end (and their numerics on the 8B); Gemma-2-2B.
export PYTHONPATH=$PWD:${PYTHONPATH:-}
lane0() { gc STAGES="env bench" BENCH_MODELS="llama-3.1-8b:1:braid" NEW=64 WARMUP=1 BENCH_TIMEOUT=280 \
            BENCH_ARGS="--chat none --check first --no-agreement"; }
lane1() { gc STAGES="env bench" BENCH_MODELS="mistral-7b-v0.3:1:braid qwen2.5-7b:1:braid" NEW=64 WARMUP=1 \
            BENCH_TIMEOUT=140 BENCH_ARGS="--chat none --check none --no-agreement"; }
lane2() { gc STAGES="env bench" BENCH_MODELS="gemma-2-9b:1:braid" NEW=64 WARMUP=1 BENCH_TIMEOUT=200 \
            BENCH_ARGS="--chat none --check none --no-agreement"; }
lane3() { gc STAGES="env bench" BENCH_MODELS="gemma-2-2b:1:stock,braid" NEW=128 WARMUP=1 BENCH_TIMEOUT=240 \
            BENCH_ARGS="--chat none --check none --no-agreement"; }
