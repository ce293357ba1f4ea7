"""Per-step time breakdown of batch-1 decode (GPU): where a generate() step's time goes.

  graph-step     one decode step replayed from a CUDA graph (kernel time + in-graph launch gaps)
  kernel-sum     the step's kernels' own durations (profiler, inside the graph replay); with PDL the
                 kernels overlap, so the sum can exceed the step
  fast-loop      generate()'s fast path per token (K-step graphs, device-side selection, 1 sync / K)
  hf-loop        HF's own loop per token with the graph-replayed forward (output_scores forces it)
  eager-step     the same fused kernels launched from Python without graphs (host launch cost)
Each is measured with programmatic dependent launch on and off (Tuning(pdl=...)). The differences are the
host's share. Usage: python benchmarks/step_breakdown.py [preset] [--out f.json] [--ctx 128]
"""
from __future__ import annotations

import json
import sys
import time
from collections import defaultdict

import torch

import braid_backend
from braid_backend.testing.numerics import random_tokens
from braid_backend.testing.presets import build_model


def _time(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def _kernel_times(fn, n):
    """The step's kernels in launch order, each one's mean device time (us) over the n replays of fn."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                key=lambda e: e.time_range.start)
    per = len(ev) // n
    rows = [(ev[i].name, sum(ev[r * per + i].device_time for r in range(n)) / n) for i in range(per)]
    return rows


@torch.no_grad()
def measure(model, ids, pdl: bool, ctx: int) -> dict:
    braid_backend.patch(model, tuning=braid_backend.Tuning(pdl=pdl))
    st = model._braid_session
    n = 128
    kw = dict(do_sample=False, pad_token_id=0, min_new_tokens=n, max_new_tokens=n)
    gen = lambda **extra: model.generate(ids, **kw, **extra)  # noqa: E731
    t1 = _time(lambda: model.generate(ids, do_sample=False, pad_token_id=0, max_new_tokens=1))
    fast = (_time(gen) - t1) / (n - 1)
    hf = (_time(lambda: gen(output_scores=True, return_dict_in_generate=True), reps=3) - t1) / (n - 1)
    cache = st.cache
    # one step of our own capture, positions as at `ctx` (slots/kv_lens in the buffers)
    b = st.step.new_buffers(1, cache.max_len)
    b.slots.fill_(min(ctx, cache.max_len - 1))
    b.kv_lens.fill_(min(ctx, cache.max_len - 1) + 1)
    b.pos.fill_(min(ctx, cache.max_len - 1))
    for _ in range(2):
        st.step.run(cache, b)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        st.step.run(cache, b)
    graph_step = _time(lambda: [g.replay() for _ in range(50)]) / 50
    eager = _time(lambda: [st.step.run(cache, b) for _ in range(20)]) / 20
    try:
        kernels = _kernel_times(lambda: [g.replay() for _ in range(20)], 20)
    except Exception as e:  # the profiler is a diagnostic; its absence must not lose the timings
        kernels = {"error": repr(e)}
    braid_backend.unpatch(model)
    ksum = sum(v for _, v in kernels) if isinstance(kernels, list) else float("nan")
    return {"pdl": pdl, "graph_step_ms": graph_step * 1e3, "kernel_sum_ms": ksum / 1e3,
            "fast_loop_ms_per_token": fast * 1e3, "hf_loop_ms_per_token": hf * 1e3,
            "eager_step_ms": eager * 1e3, "n_kernels": len(kernels),
            # embed + the first layer, and the tail (last layer's end, lm_head): the pattern repeats
            "kernels_us": [(k[:60], round(v, 2)) for k, v in kernels[:12] + kernels[-4:]]
            if isinstance(kernels, list) else kernels}


def main(argv):
    preset = argv[0] if argv and not argv[0].startswith("--") else "qwen2.5-0.5b"
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    ctx = int(argv[argv.index("--ctx") + 1]) if "--ctx" in argv else 128
    model = build_model(preset, dtype=torch.bfloat16, device="cuda")
    ids = random_tokens(model.config.vocab_size, 1, 128, 0, "cuda")
    res = {"preset": preset, "gpu": torch.cuda.get_device_name(), "ctx": ctx,
           "versions": {"torch": torch.__version__}, "runs": []}
    for pdl in (True, False):
        r = measure(model, ids, pdl, ctx)
        res["runs"].append(r)
        for k, v in r.items():
            if k != "kernels_us":
                print(f"{k:24} {v:.4f}" if isinstance(v, float) else f"{k:24} {v}")
        for row in r["kernels_us"] if isinstance(r["kernels_us"], list) else [r["kernels_us"]]:
            print("   ", row)
        if out:
            json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
