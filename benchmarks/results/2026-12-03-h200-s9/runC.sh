#!/usr/bin/env bash
# Session 9, GPU run C (one H200): MoE op config sweep (Qwen3-30B-A3B, gpt-oss-20b, batch 1), the dense
# kernel tests after the refactor, the issue #22 speed check (braid only), gpt-oss-20b end to end.
set -u
OUT=${OUT:-$PWD/gpu-out}; W=$OUT/w; mkdir -p "$W"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 BRAID_GPU_TESTS=1 TRITON_INTERPRET=0
t0=$(date +%s); st() { echo; echo "=== $1 ($(( $(date +%s) - t0 ))s)"; }
pub() { tar -czf "$OUT/runC.tgz" -C "$W" . 2>/dev/null; }
st env; { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch,transformers,triton;print('torch',torch.__version__,'transformers',transformers.__version__,'triton',triton.__version__)"
  cat COMMIT 2>/dev/null; date -u +%FT%TZ; } 2>&1 | tee "$W/env.txt"
kt() { st "tests $1"; timeout "$2" python3 -m pytest -q -p no:cacheprovider $3 > "$W/tests-$1.log" 2>&1; echo "exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$W/tests-$1.log" | tail -n 8; pub; }
bench() { st "bench $1 $2"; timeout "$3" python3 -m braid_backend.bench -m "$1" -b "$2" --variants "$4" -p 128 -n "$5" --reps "$6" --warmup 1 \
  --timeout "$3" $7 -o "$W/bench-$1" > "$W/bench-$1.log" 2>&1; echo "exit $?"; grep -E "^(stock|braid|hf-static)" "$W/bench-$1.log" | head -n 8; pub; }
st sweep-moe; timeout 170 python3 benchmarks/kernels/bench_moe.py --models qwen3-30b-a3b,gpt-oss-20b --batches 1 --sweep --case-timeout 80 \
  --out "$W/bench_moe_sweep.json" > "$W/bench_moe_sweep.log" 2>&1; echo "exit $?"; tail -n 30 "$W/bench_moe_sweep.log"; pub
bench qwen2.5-0.5b 1,16 110 braid 256 3 ""
bench llama-3.2-1b 1 80 braid 256 3 ""
kt dense 120 "tests/test_kernel_gemv.py tests/test_kernel_attention.py tests/test_kernel_attention_sinks.py tests/test_kernel_rope_cache.py tests/test_kernel_rmsnorm.py tests/test_kernel_greedy_select.py"
bench gpt-oss-20b 1 150 stock,braid 32 2 "--check none"
st done
