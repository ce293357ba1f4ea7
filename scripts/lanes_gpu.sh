#!/usr/bin/env bash
# Several independent GPU jobs at once on a multi-GPU machine: one "lane" per GPU.
#   bash scripts/lanes_gpu.sh scripts/plans/<plan>.sh
# The plan file defines shell functions lane0, lane1, ... (as many as there are GPUs to use); each
# calls `gc VAR=value ...` one or more times, i.e. scripts/gpu_check.sh with those variables. Lane i
# runs on GPU i only (CUDA_VISIBLE_DEVICES) and publishes everything so far to $OUT/lane<i>/ after each
# stage (a tarball + summary.txt: 2 files per lane). A lane's jobs are sequential; lanes run in
# parallel. Timings A/B-compared in one braid-bench call share one GPU; numbers from different lanes
# are different cards of the same machine (say so where they are compared).
set -u
PLAN=$1
OUT=${OUT:-$PWD/gpu-out}
. "$PLAN"
n=$(nvidia-smi -L | wc -l)
gc() { env "$@" bash scripts/gpu_check.sh; }
pids=()
for i in $(seq 0 $((n - 1))); do
  declare -F "lane$i" > /dev/null || continue
  mkdir -p "$OUT/lane$i"
  ( export CUDA_VISIBLE_DEVICES=$i OUT=$OUT/lane$i WORK=$(mktemp -d /tmp/braid-lane$i.XXXX)
    "lane$i" > "/tmp/lane$i.log" 2>&1
    echo "lane $i done: $(date -u +%T)" >> "/tmp/lane$i.log" ) &
  pids+=($!)
done
wait "${pids[@]}"
for i in $(seq 0 $((n - 1))); do
  [ -f "/tmp/lane$i.log" ] && { echo "##### lane $i"; grep -vE "^\s*$" "/tmp/lane$i.log" | tail -n 40; }
done
