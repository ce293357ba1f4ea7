#!/usr/bin/env bash
# Session 9, GPU run D (one H200): dense kernel tests after the refactor, MoE kernel tests with the swept
# tile, Qwen3-30B-A3B end to end again, the FineGrainedFP8 offline GPU test, the real-sized MoE error test.
set -u
OUT=${OUT:-$PWD/gpu-out}; W=$OUT/w; mkdir -p "$W"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 BRAID_GPU_TESTS=1 TRITON_INTERPRET=0
t0=$(date +%s); st() { echo; echo "=== $1 ($(( $(date +%s) - t0 ))s)"; }
pub() { tar -czf "$OUT/runD.tgz" -C "$W" . 2>/dev/null; }
st env; { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch,transformers,triton;print('torch',torch.__version__,'transformers',transformers.__version__,'triton',triton.__version__)"
  cat COMMIT 2>/dev/null; date -u +%FT%TZ; } 2>&1 | tee "$W/env.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
kt() { st "tests $1"; timeout "$2" python3 -m pytest -q -p no:cacheprovider -rf $3 > "$W/tests-$1.log" 2>&1; echo "exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$W/tests-$1.log" | tail -n 8; pub; }
kt dense 170 "tests/test_kernel_gemv.py tests/test_kernel_attention.py tests/test_kernel_attention_sinks.py tests/test_kernel_rope_cache.py tests/test_kernel_rmsnorm.py tests/test_kernel_greedy_select.py"
kt moe-kernel 80 "tests/test_kernel_moe.py"
st "bench qwen3-30b-a3b"; timeout 110 python3 -m braid_backend.bench -m qwen3-30b-a3b -b 1 --variants braid -p 128 -n 64 --reps 2 --warmup 1 \
  --timeout 100 --check none -o "$W/bench-qwen3-30b-a3b" > "$W/bench-qwen3-30b-a3b.log" 2>&1; echo "exit $?"; grep -E "^braid" "$W/bench-qwen3-30b-a3b.log"; pub
kt quant-gpu 70 "-m gpu tests/test_quant_models.py"
kt moe-gpu 100 "-m gpu tests/test_moe_families.py -k qwen3_moe"
st done
