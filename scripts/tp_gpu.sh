#!/usr/bin/env bash
# Tensor-parallel GPU run (2 GPUs): correctness and decode speed of braid TP vs stock TP, TP=1 vs TP=2.
#   STAGES="env tiny llama8b" bash scripts/tp_gpu.sh
# Each stage writes its JSON/log to $OUT at once, so a run cut off by its time limit still reports.
set -u
OUT=${OUT:-$PWD/tp-out}
LOGS=${LOGS:-/tmp/braid-tp-logs}   # logs go back as one tarball (the device tool returns few files)
mkdir -p "$OUT" "$LOGS"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
STAGES=${STAGES:-"env tiny llama8b"}
CK=${CK:-/tmp/braid-ckpt}
NEW=${NEW:-64}
t0=$(date +%s)
stage() { echo; echo "=== $1 ($(( $(date +%s) - t0 ))s)"; }
tp() {  # tp <name> <nproc> <limit_s> <checkpoint> [tp_check args...]
  local name=$1 n=$2 lim=$3 ck=$4; shift 4
  stage "$name"
  timeout "$lim" torchrun --standalone --nproc-per-node "$n" -m braid_backend.testing.tp_check "$ck" \
    --out "$OUT/$name.json" "$@" > "$LOGS/$name.log" 2>&1
  echo "exit $?"; grep -v "Loading weights" "$LOGS/$name.log" | tail -n 45
  tar -czf "$OUT/logs.tgz" -C "$LOGS" .
}
save() {  # save <preset> <dir> [overrides as python kwargs]
  [ -f "$2/config.json" ] && return
  stage "save $1"
  timeout 300 python3 -c "
import torch; from braid_backend.testing.tp_check import save_preset
save_preset('$1', '$2', dtype=torch.bfloat16, device='cuda' ${3:+, $3})" 2>&1 | tail -n 3
}
for s in $STAGES; do
  case $s in
  env)
    stage env
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nvidia-smi topo -m
      python3 -c "import torch,transformers,triton;print('torch',torch.__version__,'transformers',transformers.__version__,'triton',triton.__version__)"
      date -u +%FT%TZ; } 2>&1 | tee "$OUT/env.txt" ;;
  tiny)
    save tiny-qwen2 "$CK/tiny-qwen2" "vocab_size=308"
    tp tiny-qwen2-tp2 2 240 "$CK/tiny-qwen2" --dtype bf16 --new 24 ;;
  llama8b)
    save llama-3.1-8b "$CK/llama-3.1-8b"
    tp llama8b-tp2-b1 2 400 "$CK/llama-3.1-8b" --bench-new "$NEW" --steps 8
    BRAID_TP_ALLREDUCE=nccl tp llama8b-tp2-b1-nccl 2 300 "$CK/llama-3.1-8b" --no-fp32-ref --bench-new "$NEW" --steps 4
    tp llama8b-tp1-b1 1 300 "$CK/llama-3.1-8b" --no-fp32-ref --bench-new "$NEW" --steps 4 ;;
  llama8b-tp1)
    save llama-3.1-8b "$CK/llama-3.1-8b"
    tp llama8b-tp1-b1 1 300 "$CK/llama-3.1-8b" --no-fp32-ref --bench-new "$NEW" --steps 4 ;;
  llama8b-b16)
    save llama-3.1-8b "$CK/llama-3.1-8b"
    tp llama8b-tp2-b16 2 400 "$CK/llama-3.1-8b" --no-fp32-ref --batch 16 --bench-new "$NEW" --steps 4
    tp llama8b-tp1-b16 1 400 "$CK/llama-3.1-8b" --no-fp32-ref --batch 16 --bench-new "$NEW" --steps 4 ;;
  llama8b-tp2-b16)
    save llama-3.1-8b "$CK/llama-3.1-8b"
    tp llama8b-tp2-b16 2 400 "$CK/llama-3.1-8b" --no-fp32-ref --batch 16 --bench-new "$NEW" --steps 4 ;;
  ab)
    # same-machine A/B of the all-reduce (braid only, more repetitions): 8B TP=1 / TP=2 symm / TP=2 nccl,
    # 32B TP=2 symm / nccl
    save llama-3.1-8b "$CK/llama-3.1-8b"
    A="--no-fp32-ref --no-stock-bench --steps 2 --new 8 --reps 7 --bench-new 128"
    tp ab-8b-tp1 1 200 "$CK/llama-3.1-8b" $A
    BRAID_TP_ALLREDUCE=symm tp ab-8b-tp2-symm 2 200 "$CK/llama-3.1-8b" $A
    BRAID_TP_ALLREDUCE=nccl tp ab-8b-tp2-nccl 2 200 "$CK/llama-3.1-8b" $A
    save qwen2.5-32b "$CK/qwen2.5-32b"
    BRAID_TP_ALLREDUCE=symm tp ab-32b-tp2-symm 2 240 "$CK/qwen2.5-32b" $A
    BRAID_TP_ALLREDUCE=nccl tp ab-32b-tp2-nccl 2 240 "$CK/qwen2.5-32b" $A ;;
  ab-residual)
    save qwen2.5-32b "$CK/qwen2.5-32b"
    A="--no-fp32-ref --no-stock-bench --steps 2 --new 8 --reps 7 --bench-new 128"
    BRAID_TP_RESIDUAL_IN_REDUCE=0 tp ab-32b-tp2-symm-sepadd 2 240 "$CK/qwen2.5-32b" $A
    tp ab-32b-tp2-symm 2 240 "$CK/qwen2.5-32b" $A ;;
  flags)
    # the flag-synced reduce kernel (kernels/tp_reduce.py, default since it exists): correctness on tiny
    # models (bias path, post-norm path), then a same-machine A/B against torch's one-shot op at 8B
    save tiny-qwen2 "$CK/tiny-qwen2" "vocab_size=308"
    BRAID_TP_ALLREDUCE=flags tp tiny-qwen2-tp2-flags 2 240 "$CK/tiny-qwen2" --dtype bf16 --new 24
    save tiny-gemma2 "$CK/tiny-gemma2" "vocab_size=308"
    BRAID_TP_ALLREDUCE=flags tp tiny-gemma2-tp2-flags 2 240 "$CK/tiny-gemma2" --dtype bf16 --new 24
    save llama-3.1-8b "$CK/llama-3.1-8b"
    A="--no-fp32-ref --no-stock-bench --steps 2 --new 8 --reps 7 --bench-new 128"
    tp ab-8b-tp1 1 200 "$CK/llama-3.1-8b" $A
    BRAID_TP_ALLREDUCE=flags tp ab-8b-tp2-flags 2 200 "$CK/llama-3.1-8b" $A
    BRAID_TP_ALLREDUCE=symm tp ab-8b-tp2-symm 2 200 "$CK/llama-3.1-8b" $A ;;
  flags-full)
    save llama-3.1-8b "$CK/llama-3.1-8b"
    BRAID_TP_ALLREDUCE=flags tp llama8b-tp2-b1-flags 2 400 "$CK/llama-3.1-8b" --bench-new "$NEW" --steps 8
    BRAID_TP_ALLREDUCE=flags tp llama8b-tp2-b16-flags 2 300 "$CK/llama-3.1-8b" --no-fp32-ref --no-stock-bench --batch 16 --bench-new "$NEW" --steps 4 ;;
  flags-load)
    # peer loads of the flags reduce: .cg (vector) vs volatile (scalar), batch 1 and 16, symm as baseline
    save llama-3.1-8b "$CK/llama-3.1-8b"
    A="--no-fp32-ref --no-stock-bench --steps 2 --new 8 --reps 5 --bench-new 128"
    tp ab-8b-tp1 1 200 "$CK/llama-3.1-8b" $A
    BRAID_TP_ALLREDUCE=flags tp ab-8b-tp2-flags-cg 2 200 "$CK/llama-3.1-8b" $A
    BRAID_TP_ALLREDUCE=flags tp ab-8b-tp2-flags-cg-b16 2 200 "$CK/llama-3.1-8b" $A --batch 16
    BRAID_TP_ALLREDUCE=flags BRAID_TP_REDUCE_LOAD=volatile tp ab-8b-tp2-flags-vol-b16 2 200 "$CK/llama-3.1-8b" $A --batch 16
    BRAID_TP_ALLREDUCE=symm tp ab-8b-tp2-symm-b16 2 200 "$CK/llama-3.1-8b" $A --batch 16 ;;
  qwen32b)
    # 65 GB of bf16 weights: TP=2 only; the fp32 reference is itself TP=2 (65 GB a GPU)
    save qwen2.5-32b "$CK/qwen2.5-32b"
    tp qwen32b-tp2-b1 2 420 "$CK/qwen2.5-32b" --bench-new 32 --steps 4 ;;
  esac
done
stage done
