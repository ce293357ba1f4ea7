"""Short table of a scripts/gpu_check.sh run (reads the files it wrote into one folder)."""
import glob
import json
import os
import sys

work = sys.argv[1]


def load(name):
    p = os.path.join(work, name)
    return json.load(open(p)) if os.path.exists(p) else None


env = open(os.path.join(work, "env.txt")).read().strip() if os.path.exists(os.path.join(work, "env.txt")) else "?"
print("env:", env.replace("\n", " | "))
errs = []
for path in sorted(glob.glob(os.path.join(work, "gpu_errors*.json"))):
    errs += json.load(open(path))
if errs:
    print("\ncorrectness (teacher-forced logits vs fp32; rule braid <= 2x stock)")
    print(f"{'preset':14} {'ctx':>5} {'graphs':>6} {'stock err':>10} {'braid err':>10} {'ratio':>6}")
    for r in errs:
        print(f"{str(r.get('preset', r.get('family', '?'))):14} {r.get('ctx', 0):5d} {str(r.get('graphs', '')):>6} "
              f"{r.get('stock_err', float('nan')):10.3e} {r.get('braid_err', float('nan')):10.3e} {r.get('ratio', float('nan')):6.2f}")
for log in sorted(glob.glob(os.path.join(work, "tests*.log"))):
    lines = open(log).read().splitlines()
    tail = [l for l in lines if " passed" in l or " failed" in l or l.startswith("exit ")]
    print(f"{os.path.basename(log)}:", " | ".join(tail[-2:]) if tail else "no summary line (cut off?)")
bd = load("breakdown.json")
if bd and "runs" in bd:
    print(f"\nstep breakdown {bd['preset']} batch 1 ctx {bd['ctx']} (ms): pdl, graph step, kernel sum, fast loop/token, "
          "hf loop/token, eager step, kernels/step")
    for r in bd["runs"]:
        print(f"  pdl={r['pdl']!s:5} {r['graph_step_ms']:.3f} {r['kernel_sum_ms']:.3f} {r['fast_loop_ms_per_token']:.3f} "
              f"{r['hf_loop_ms_per_token']:.3f} {r['eager_step_ms']:.3f} {r.get('n_kernels')}")
for name in ("reliability.json",):
    d = load(name)
    if d:
        print(f"\n{name}: " + json.dumps(d)[:1500])
for name in ("gemv.json", "attention.json"):
    rows = load(name)
    if not rows:
        continue
    rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
    print(f"\n{name}: kernel, shape, batch, us, GB/s, %copyBW, baseline us, speedup")
    for r in rows:
        if isinstance(r, dict) and "us" in r:
            print(f"  {r.get('kernel',''):22} {str(r.get('shape','')):26} b{r.get('batch','')} {r['us']:9.2f} "
                  f"{r.get('gbs', 0):8.1f} {r.get('pct_copy_bw', 0):6.1f}% {r.get('baseline_us', 0):9.2f} "
                  f"x{r.get('speedup', 0)} {r.get('config','')}")
for path in sorted(glob.glob(os.path.join(work, "bench-*", "results.md"))):
    print(f"\n{os.path.basename(os.path.dirname(path))}:")
    print(open(path).read().strip())
