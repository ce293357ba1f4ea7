#!/usr/bin/env bash
# Cold start on the GPU (issue #13): patch() + the first generate() of a fresh process, for
#   pre1: empty TRITON_CACHE_DIR, BRAID_PRECOMPILE=1 (kernels compiled in parallel worker processes)
#   pre0: empty TRITON_CACHE_DIR, BRAID_PRECOMPILE=0 (compiled one after another, as before)
#   warm: pre1's cache dir kept (every variant on disk), BRAID_PRECOMPILE=1
#   warmprof (PROFILE_WARM=1 only): warm again under cProfile (times inflated); the top functions by
#     cumulative and own time go to $OUT/warmprof.prof.txt: where the warm first call spends its second
# each in its own process under `timeout`. Prints one JSON line per case (also $OUT/<case>.json) and
# checks that the three generated the same tokens (exit 1 if not) and that pre1's warm-up compiled
# nothing the precompile missed (jit_post_compile_hook after it: compiled_after_precompile; a WARN line if any).
#   bash scripts/cold_start_gpu.sh            # MODEL, BATCH, NEW, PROMPT, CASE_TIMEOUT, OUT override
# Why not `braid-bench --cold`: it runs every variant's full benchmark first and has no A/B of
# BRAID_PRECOMPILE nor a token comparison between cold processes; this asks only those questions.
set -u
OUT=${OUT:-$PWD/cold-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export MODEL=${MODEL:-qwen2.5-0.5b} BATCH=${BATCH:-1} NEW=${NEW:-32} PROMPT=${PROMPT:-128}
LIM=${CASE_TIMEOUT:-300}
ROOT=$(mktemp -d /tmp/braid-cold.XXXXXX)

{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; echo "cpus $(nproc)"
  python3 -c "import torch,transformers,triton;print('torch',torch.__version__,'transformers',transformers.__version__,'triton',triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

run_case() {  # run_case <name> <BRAID_PRECOMPILE> <cache dir> [profile]
  echo "=== $1 (BRAID_PRECOMPILE=$2, TRITON_CACHE_DIR=$3)" >&2
  CASE=$1 BRAID_PRECOMPILE=$2 TRITON_CACHE_DIR=$3 PROFILE=${4:-} timeout "$LIM" python3 - "$OUT/$1.json" \
    > "$OUT/$1.log" 2>&1 <<'PY'
import json, logging, os, sys, time

import torch

import braid_backend
import braid_backend.runtime.precompile as pc
from braid_backend.testing.presets import build_model

logging.basicConfig(level=logging.WARNING, format="%(message)s")
logging.getLogger("braid_backend").setLevel(logging.INFO)   # the capture line with the precompile summary
cache_dir = os.environ["TRITON_CACHE_DIR"]


def files():
    return sum(len(f) for _, _, f in os.walk(cache_dir))


# count the cache's files right after each precompile: what the warm-up writes after it was missed
summaries, after_pre = [], []
orig = pc.precompile


def paths():
    return {os.path.join(r, f) for r, _, fs in os.walk(cache_dir) for f in fs}


# Diagnostic: after the first precompile, Triton's jit_post_compile_hook (Triton 3.4+, 3.6 included) sees
# every variant this process compiles or loads from disk; "fresh" = its metadata file was written after
# the precompile (a real compile the dry run missed), else a disk hit. The files written after it are
# listed by name too (Triton 3.6's per-signature launchers are "__triton_launcher.so").
post, marks = [], {}


def post_hook(*, key, repr, fn, compile, **kw):
    fresh = None
    try:
        k = fn.jit_function.device_caches[compile["device"]][0].get(key)
        meta = [p for n, p in k.metadata_group.items() if n.endswith(".json") and not n.startswith("__grp__")]
        fresh = os.path.getmtime(meta[0]) >= marks["t"]
    except Exception:
        pass
    post.append({"name": fn.name, "repr": repr, "key": str(key)[:400], "fresh": fresh})
    return None


def counted(body, *a, **kw):
    s = orig(body, *a, **kw)
    summaries.append(s)
    after_pre.append(files())
    if "t" not in marks:
        from triton import knobs
        marks["t"], marks["paths"] = time.time() - 0.01, paths()
        if getattr(knobs.runtime, "jit_post_compile_hook", "absent") is None:
            knobs.runtime.jit_post_compile_hook = post_hook
    return s


pc.precompile = counted   # graphs.py calls it through the module
B, new, T = int(os.environ["BATCH"]), int(os.environ["NEW"]), int(os.environ["PROMPT"])
model = build_model(os.environ["MODEL"], dtype=torch.bfloat16, device="cuda")
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g).cuda()
kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
          pad_token_id=0)
before = files()
prof = None
if os.environ.get("PROFILE"):
    import cProfile
    prof = cProfile.Profile()
torch.cuda.synchronize()
if prof is not None:
    prof.enable()
t0 = time.perf_counter()
report = braid_backend.patch(model)
t1 = time.perf_counter()
out = model.generate(ids, **kw)
torch.cuda.synchronize()
t2 = time.perf_counter()
if prof is not None:
    import io
    import pstats
    prof.disable()
    with open(sys.argv[1].replace(".json", ".prof.txt"), "w") as f:
        for key, n in (("cumulative", 90), ("tottime", 40)):
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(key).print_stats(n)
            f.write(s.getvalue())
end = files()
out2 = model.generate(ids, **kw)
torch.cuda.synchronize()
t3 = time.perf_counter()
toks = out[:, T:].tolist()
rec = {"case": os.environ["CASE"], "precompile_env": os.environ["BRAID_PRECOMPILE"], "model": os.environ["MODEL"],
       "batch": B, "new_tokens": new, "patch_s": round(t1 - t0, 3), "first_generate_s": round(t2 - t1, 3),
       "patch_plus_first_s": round(t2 - t0, 3), "second_generate_s": round(t3 - t2, 3),
       "last_path": braid_backend.status(model).last_path, "cache_files_before": before,
       "cache_files_after_precompile": after_pre, "cache_files_after_first_call": end,
       # files the warm-up wrote after the (first) precompile: variants it missed, compiled serially
       "written_after_precompile": (end - after_pre[0]) if after_pre else None,
       "precompile_summaries": summaries,
       # variants compiled for real after the precompile (what the dry run missed), and disk hits
       "compiled_after_precompile": [p for p in post if p["fresh"] is not False],
       "loaded_from_disk_after_precompile": [p["name"] for p in post if p["fresh"] is False],
       "files_written_after_precompile": sorted(os.path.basename(p) for p in paths() - marks.get("paths", paths())),
       "same_tokens_second_call": out2[:, T:].tolist() == toks, "tokens": toks,
       "gpu": torch.cuda.get_device_name(), "cpus": os.cpu_count()}
json.dump(rec, open(sys.argv[1], "w"))
print("RESULT " + json.dumps({k: v for k, v in rec.items() if k != "tokens"}))
PY
  local rc=$?
  [ $rc -ne 0 ] && { echo "case $1 failed (exit $rc; 124 = timed out after ${LIM}s):" >&2; tail -n 30 "$OUT/$1.log" >&2; }
  grep "^RESULT " "$OUT/$1.log" | sed 's/^RESULT //'
  grep "braid:" "$OUT/$1.log" >&2
  return 0
}

run_case pre1 1 "$ROOT/pre1"
run_case pre0 0 "$ROOT/pre0"
run_case warm 1 "$ROOT/pre1"
[ -n "${PROFILE_WARM:-}" ] && run_case warmprof 1 "$ROOT/pre1" 1

python3 - "$OUT" <<'PY'
import json, os, sys
got = {}
for c in ("pre1", "pre0", "warm"):
    p = os.path.join(sys.argv[1], f"{c}.json")
    if os.path.exists(p):
        got[c] = json.load(open(p))
missing = [c for c in ("pre1", "pre0", "warm") if c not in got]
toks = {c: r["tokens"] for c, r in got.items()}
same = len(set(json.dumps(t) for t in toks.values())) <= 1
print(json.dumps({"summary": {c: r["patch_plus_first_s"] for c, r in got.items()}, "tokens_identical": same,
                  "missing_cases": missing,
                  "pre1_written_after_precompile": got.get("pre1", {}).get("written_after_precompile"),
                  "pre1_compiled_after_precompile": [p["repr"] for p in got.get("pre1", {}).get(
                      "compiled_after_precompile", [])],
                  "pre1_files_written_after_precompile": got.get("pre1", {}).get("files_written_after_precompile")}))
if "pre1" in got and got["pre1"].get("compiled_after_precompile"):
    print("WARN: variants compiled after the precompile (see compiled_after_precompile): the dry run missed them")
if "pre1" in got and got["pre1"].get("written_after_precompile"):
    print("NOTE: cache files written after the precompile (files_written_after_precompile): on Triton 3.6 "
          "__triton_launcher.so are launchers (now built in the workers); anything else is a missed variant")
sys.exit(0 if same and not missing else 1)
PY
