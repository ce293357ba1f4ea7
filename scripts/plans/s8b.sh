# Session 8, call B: why L2 streaming slowed every preset in call A. In-process sweep of how the
# prefetch is issued (benchmarks/l2_prefetch_sweep.py: graph replays of the step, variants interleaved).
export PYTHONPATH=$PWD:${PYTHONPATH:-}
sw() {  # sw PRESET BATCH TIMEOUT VARIANTS
  local tag=$1-b$2
  timeout $3 python3 benchmarks/l2_prefetch_sweep.py $1 --batch $2 --variants "$4" --out "$OUT/sweep-$tag.json" \
    > "$OUT/sweep-$tag.log" 2>&1; tail -n 16 "$OUT/sweep-$tag.log"
}
lane0() { gc STAGES=env; sw qwen2.5-0.5b 1 300 "0 2 4 8 8:hint 8:end 8:progs=8 8:chunk=8192 8:chunk=1048576 20 20:hint 20:end 0"; }
lane1() { sw llama-3.2-1b 1 200 "0 2 4 8 8:hint 8:end 8:progs=8 0"; sw qwen2.5-0.5b 8 150 "0 4 8 8:hint 8:end 0"; }
lane2() { sw qwen2.5-1.5b 1 200 "0 2 4 8 8:hint 8:end 8:progs=8 0"; sw smollm2-135m 1 150 "0 2 4 8 8:hint 8:end 0"; }
lane3() { sw llama-3.1-8b 1 300 "0 4 8:hint 8:end 0"; }
