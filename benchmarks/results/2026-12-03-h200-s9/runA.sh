#!/usr/bin/env bash
# Session 9, GPU run A (one H200): megakernel ladder rungs 1-2 (issue #25), the GPU kernel tests and the
# issue #22 speed check of the tuning/deletion refactor. Run from a clean export of the commit (.snap).
set -u
OUT=${OUT:-$PWD/gpu-out}; W=$OUT/w; mkdir -p "$W"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 BRAID_GPU_TESTS=1 TRITON_INTERPRET=0
t0=$(date +%s); st() { echo; echo "=== $1 ($(( $(date +%s) - t0 ))s)"; }
pub() { tar -czf "$OUT/runA.tgz" -C "$W" . 2>/dev/null; }
st env; { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
  python3 -c "import torch,transformers,triton,cupy;print('torch',torch.__version__,'transformers',transformers.__version__,'triton',triton.__version__,'cupy',cupy.__version__)"
  git log -1 --format=%H 2>/dev/null; date -u +%FT%TZ; } 2>&1 | tee "$W/env.txt"
L=benchmarks/megakernel/ladder.py
st rung1; timeout 200 python3 $L --rung 1 --model qwen2.5-0.5b --out "$W/rung1-qwen.json" > "$W/rung1-qwen.log" 2>&1; echo "exit $?"; tail -n 45 "$W/rung1-qwen.log"; pub
st rung2; timeout 120 python3 $L --rung 2 --out "$W/rung2.json" > "$W/rung2.log" 2>&1; echo "exit $?"; tail -n 40 "$W/rung2.log"; pub
st kernel-tests; timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernel_gemv.py tests/test_kernel_attention.py \
  tests/test_kernel_attention_sinks.py tests/test_kernel_rope_cache.py tests/test_kernel_rmsnorm.py tests/test_kernel_greedy_select.py \
  > "$W/kernel-tests.log" 2>&1; echo "exit $?"; tail -n 4 "$W/kernel-tests.log"; pub
st gpu-tests; timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "tuning or fused or no_host" \
  > "$W/gpu-tests.log" 2>&1; echo "exit $?"; tail -n 4 "$W/gpu-tests.log"; pub
for mb in qwen2.5-0.5b:1,16 llama-3.2-1b:1; do m=${mb%%:*}; b=${mb#*:}
  st "bench $m $b"; timeout 200 python3 -m braid_backend.bench -m "$m" -b "$b" --variants braid -p 128 -n 256 --reps 3 --warmup 2 \
    -o "$W/bench-$m" > "$W/bench-$m.log" 2>&1; echo "exit $?"; tail -n 8 "$W/bench-$m.log"; pub
done
st done
