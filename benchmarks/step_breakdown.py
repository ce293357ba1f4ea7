"""Per-step time breakdown of batch-1 decode (GPU): where a generate() step's time goes.

  graph-step   one decode step replayed from a CUDA graph (kernel time + in-graph launch gaps)
  fast-loop    generate()'s fast path per token (K-step graphs, device-side selection, 1 sync / K)
  hf-loop      HF's own loop per token with the graph-replayed forward (output_scores forces it)
  eager-step   the same fused kernels launched from Python without graphs (host launch cost)
The differences are the host's share. Usage: python benchmarks/step_breakdown.py [preset] [--out f.json]
"""
from __future__ import annotations

import json
import sys
import time

import torch

import braid_backend
from braid_backend.numerics import random_tokens
from braid_backend.presets import build_model


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


def main(argv):
    preset = argv[0] if argv and not argv[0].startswith("--") else "qwen2.5-0.5b"
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    model = build_model(preset, dtype=torch.bfloat16, device="cuda")
    ids = random_tokens(model.config.vocab_size, 1, 128, 0, "cuda")
    braid_backend.patch(model)
    st = model._braid_state
    n = 128
    kw = dict(do_sample=False, pad_token_id=0, min_new_tokens=n, max_new_tokens=n)
    gen = lambda **extra: model.generate(ids, **kw, **extra)  # noqa: E731
    t1 = _time(lambda: model.generate(ids, do_sample=False, pad_token_id=0, max_new_tokens=1))
    fast = (_time(gen) - t1) / (n - 1)
    hf = (_time(lambda: gen(output_scores=True, return_dict_in_generate=True), reps=3) - t1) / (n - 1)
    cache = st.cache
    step = next(cs for k, cs in st.graphs.graphs.items() if k[4] == "hf-step")
    graph_step = _time(lambda: [step.graph.replay() for _ in range(50)]) / 50
    b = st.decode.buffers_for(1, cache.max_len)
    b.slots.fill_(cache.max_len - 1)
    b.kv_lens.fill_(129)
    eager = _time(lambda: [st.decode.forward(cache, b) for _ in range(20)]) / 20
    res = {"preset": preset, "gpu": torch.cuda.get_device_name(), "graph_step_ms": graph_step * 1e3,
           "fast_loop_ms_per_token": fast * 1e3, "hf_loop_ms_per_token": hf * 1e3,
           "eager_step_ms": eager * 1e3, "graph_steps_K": st.options["graph_steps"]}
    for k, v in res.items():
        print(f"{k:24} {v:.4f}" if isinstance(v, float) else f"{k:24} {v}")
    if out:
        json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
