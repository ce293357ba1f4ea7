#!/usr/bin/env bash
# Session 9, GPU run B (one H200): megakernel rung 3a (the projection chain in one persistent kernel), MoE
# kernel tests, the MoE op microbenchmark, Qwen3-30B-A3B end to end (stock vs braid).
set -u
OUT=${OUT:-$PWD/gpu-out}; W=$OUT/w; mkdir -p "$W"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 BRAID_GPU_TESTS=1 TRITON_INTERPRET=0
t0=$(date +%s); st() { echo; echo "=== $1 ($(( $(date +%s) - t0 ))s)"; }
pub() { tar -czf "$OUT/runB.tgz" -C "$W" . 2>/dev/null; }
st env; { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch,transformers,triton;print('torch',torch.__version__,'transformers',transformers.__version__,'triton',triton.__version__)"
  cat COMMIT 2>/dev/null; date -u +%FT%TZ; } 2>&1 | tee "$W/env.txt"
kt() { st "tests $1"; timeout "$2" python3 -m pytest -q -p no:cacheprovider $3 > "$W/tests-$1.log" 2>&1; echo "exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$W/tests-$1.log" | tail -n 8; pub; }
st rung3a; timeout 150 python3 benchmarks/megakernel/rung3a.py --budget 110 --out "$W/rung3a.json" > "$W/rung3a.log" 2>&1; echo "exit $?"; tail -n 40 "$W/rung3a.log"; pub
kt moe-kernel 110 "tests/test_kernel_moe.py tests/test_moe_plan.py"
st bench-moe; timeout 100 python3 benchmarks/kernels/bench_moe.py --batches 1,16 --case-timeout 30 --out "$W/bench_moe.json" > "$W/bench_moe.log" 2>&1; echo "exit $?"; tail -n 22 "$W/bench_moe.log"; pub
st e2e-qwen3-30b-a3b; timeout 210 python3 -m braid_backend.bench -m qwen3-30b-a3b -b 1 --variants stock,braid -p 128 -n 64 --reps 2 --warmup 1 \
  --timeout 200 -o "$W/bench-qwen3-30b-a3b" > "$W/bench-qwen3-30b-a3b.log" 2>&1; echo "exit $?"; tail -n 14 "$W/bench-qwen3-30b-a3b.log"; pub
st done
