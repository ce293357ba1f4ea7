"""Long-context decode (GPU): one graph-replayed decode step at context C, batch B, and how fast its
attention kernels read the KV cache.

For each (B, C): a session cache with C valid positions per row (random keys/values), one decode step
at position C captured as a CUDA graph, then
  step_ms            the replayed step (all kernels, in-graph gaps)
  attn_us_per_layer  the attention kernels' own time per layer (profiler: decode_attention + combine)
  kv_GBps            KV bytes the step must read per layer / attn time per layer
  kv_pct_copy        kv_GBps / device-to-device copy bandwidth (bytes read + written per second)
  kv_share           KV bytes / (KV + weight bytes) of the step: when > 0.5, KV bytes dominate
Usage: python benchmarks/kv_bandwidth.py PRESET [--batch 1,8] [--ctx 8192,32768] [--out f.json]
"""
from __future__ import annotations

import json
import sys
import time

import torch

import braid_backend
from braid_backend.bench.probe import probe
from braid_backend.testing.presets import build_model
from step_breakdown import _time   # sibling script (benchmarks/ is on sys.path when run as a script)


def _attention_us(fn, n) -> tuple[float, list]:
    """Total device time (us) per call of fn of the attention kernels (split + combine), and their names."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    att = [e for e in ev if "_attn_" in e.name]   # _attn_split_kernel, _attn_combine_kernel
    return sum(e.device_time for e in att) / n, sorted({e.name[:60] for e in att})


@torch.no_grad()
def measure(model, B: int, C: int, copy_Bps: float) -> dict:
    st = model._braid_session
    step = st.step
    cache = st.new_cache(B, C + 1)
    for t in cache.k + cache.v:   # random keys/values: the softmax is over real-looking scores
        t.normal_()
    cache.valid[:B, :C + 1].fill_(1)
    step.prepare(cache.max_len)
    b = step.new_buffers(cache.batch_capacity, cache.max_len)
    b.ids.random_(0, step.vocab)
    for t in (b.slots, b.pos):
        t.fill_(C)
    b.kv_lens.fill_(C + 1)
    for _ in range(2):
        step.run(cache, b)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step.run(cache, b)
    reps = 20
    step_s = _time(lambda: [g.replay() for _ in range(reps)]) / reps
    att_us, names = _attention_us(lambda: [g.replay() for _ in range(reps)], reps)
    L, elt = step.num_layers, cache.k[0].element_size()
    kv_layer = 2 * B * step.n_kv_heads * (C + 1) * step.head_dim * elt
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    att_layer_s = att_us / L * 1e-6
    res = {"batch": B, "bucket": cache.batch_capacity, "ctx": C, "step_ms": step_s * 1e3,
           "tok_per_s": B / step_s, "attn_us_per_layer": att_us / L, "kv_MB_per_layer": kv_layer / 1e6,
           "kv_GBps": kv_layer / att_layer_s / 1e9, "kv_pct_copy": 100 * kv_layer / att_layer_s / copy_Bps,
           "kv_share": kv_layer * L / (kv_layer * L + weights), "num_splits": b.num_splits,
           "attention_kernels": names}
    del g, b
    cache.release()
    torch.cuda.empty_cache()
    return res


def main(argv):
    preset = argv[0] if argv and not argv[0].startswith("--") else "qwen2.5-0.5b"
    arg = lambda k, d: argv[argv.index(k) + 1] if k in argv else d  # noqa: E731
    batches = [int(x) for x in arg("--batch", "1,8").split(",")]
    ctxs = [int(x) for x in arg("--ctx", "8192,32768").split(",")]
    out = arg("--out", None)
    pr = probe({"device": "cuda"})
    copy_Bps = (pr["copy_bw_gbs"] or float("nan")) * 1e9
    model = build_model(preset, dtype=torch.bfloat16, device="cuda")
    braid_backend.patch(model)
    res = {"preset": preset, "gpu": torch.cuda.get_device_name(), "probe": pr,
           "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": []}
    for C in ctxs:
        for B in batches:
            try:
                r = measure(model, B, C, copy_Bps)
            except Exception as e:   # out of memory at the biggest point must not lose the others
                r = {"batch": B, "ctx": C, "error": f"{type(e).__name__}: {e}"[:300]}
                torch.cuda.empty_cache()
            res["runs"].append(r)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
            if out:
                with open(out, "w") as f:
                    json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
