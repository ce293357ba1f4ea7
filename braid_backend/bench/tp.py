"""braid-bench --tp N: stock HF tensor parallelism vs braid on the same ranks, through torchrun.

For each batch size, one `torchrun --standalone --nproc-per-node N -m braid_backend.testing.tp_check`
(see that module) loads the checkpoint with transformers' `tp_plan="auto"`, times stock TP, patches,
checks the logits (2x rule vs an fp32 TP reference at the first batch size) and times braid TP. A preset
is first saved as a random-weight checkpoint in the output folder (presets have no files to load).
The same line works by hand on a cluster node.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys


def run_group(cmd: list[str], env: dict, timeout: float, stdout) -> int:
    """Run torchrun in its own process group; on timeout kill the whole group (torchrun's workers too:
    killing torchrun alone leaves ranks blocked in a collective) and return 124."""
    p = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return 124


def tp_command(world: int, checkpoint: str, dtype: str, batch: int, prompt: int, new: int, reps: int,
               out: str, fp32_ref: bool) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           "-m", "braid_backend.testing.tp_check", checkpoint, "--dtype", dtype, "--batch", str(batch),
           "--prompt", str(prompt), "--bench-new", str(new), "--reps", str(reps), "--out", out]
    return cmd + ([] if fp32_ref else ["--no-fp32-ref"])


def run_tp(s: dict, world: int, out_dir: str, say) -> int:
    """Runs every batch size; writes tp-b<B>.json / .log and tp-summary.json; returns an exit code."""
    ckpt = s["model"]
    if s["model_source"] == "preset":
        ckpt = os.path.join(out_dir, "checkpoint")
        if not os.path.exists(os.path.join(ckpt, "config.json")):
            from ..testing.tp_check import DTYPES
            from .presets import load_model
            say(f"saving preset {s['model']} as a random-weight checkpoint in {ckpt}")
            load_model(s["model"], dtype=DTYPES[s["dtype"]], device=s["device"]).save_pretrained(ckpt)
    env = dict(os.environ)
    if s["device"] == "cpu":
        env["TRITON_INTERPRET"] = "1"
    rows, rc = [], 0
    for i, b in enumerate(s["batch_sizes"]):
        out = os.path.join(out_dir, f"tp-b{b}.json")
        cmd = tp_command(world, ckpt, s["dtype"], b, s["prompt_len"], s["new_tokens"], s["reps"], out,
                         fp32_ref=(i == 0 and s["check"] != "none"))
        say("running: " + " ".join(cmd))
        with open(os.path.join(out_dir, f"tp-b{b}.log"), "w") as log:
            code = run_group(cmd, env, s["timeout"], log)
        if code or not os.path.exists(out):
            why = f"timed out after {s['timeout']} s" if code == 124 else f"exit code {code}"
            say(f"batch {b}: torchrun {why}; see {out_dir}/tp-b{b}.log")
            rows.append({"batch": b, "error": why})
            rc = 1
            continue
        res = json.load(open(out))
        rows.append({"batch": b, **res})
        st, br = res.get("stock_tp") or {}, res.get("braid_tp") or {}
        err = res.get("ref_err")
        say(f"TP={world} batch {b}: stock {st.get('decode_ms_per_step', float('nan')):.3f} ms/step "
            f"({st.get('tok_s') or 0:.1f} tok/s), braid {br.get('decode_ms_per_step', float('nan')):.3f} ms/step "
            f"({br.get('tok_s') or 0:.1f} tok/s)" + (f", error ratio {err['ratio']:.2f}" if err else "")
            + ("" if res.get("patched") else " - LEFT STOCK: " + res.get("report", "").splitlines()[0]))
    with open(os.path.join(out_dir, "tp-summary.json"), "w") as f:
        json.dump({"tp": world, "model": s["model"], "rows": rows}, f, indent=1)
    return rc
