"""How L2 weight streaming (model/l2stream.py) changes one preset's decode step: CUDA-graph replays of
the fused step, one graph per variant, timed with CUDA events in one process on one GPU.

    python benchmarks/l2_prefetch_sweep.py qwen2.5-0.5b --batch 1 \
        --variants "0 8 20 20:hint 20:end 20:progs=16 20:chunk=16384 0"

A variant is MB ahead (0: off) with options: rope-kernel (the separate rope kernel instead of the rope in
the attention kernel, BRAID_FUSED_ROPE=0), next (only the next weight, whole, if at most MB), hint (evict_last policy), end (issued after the epilogue
instead of before the PDL wait), progs=N (programs that issue), chunk=BYTES (bytes per instruction).
Each variant is timed in `--rounds` rounds interleaved with the others (drift shows as spread).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

import braid_backend
from braid_backend.kernels import _common
from braid_backend.model import l2stream
from braid_backend.model import step as step_mod
from braid_backend.testing.numerics import random_tokens
from braid_backend.testing.presets import build_model


def parse(v: str) -> dict:
    mb, *opts = v.split(":")
    d = dict(name=v, mb=float(mb), hint=False, end=False, next=False, progs=None, chunk=65536, rope_kernel=False)
    for o in opts:
        if o == "rope-kernel":
            d["rope_kernel"] = True
        elif o in ("hint", "end", "next"):
            d[o] = True
        elif o.startswith("progs="):
            d["progs"] = int(o[6:])
        elif o.startswith("chunk="):
            d["chunk"] = int(o[6:])
        else:
            raise SystemExit(f"unknown variant option {o!r} in {v!r}")
    return d


def apply(step, weights, v: dict) -> None:
    os.environ["BRAID_L2_PREFETCH_MB"] = str(v["mb"])
    _common.PF_HINT, _common.PF_AT_END = v["hint"], v["end"]
    _common.PF_PROGS, _common.PF_CHUNK = v["progs"], v["chunk"]
    l2stream.NEXT_SMALL = v["next"]
    step_mod._FUSED_ROPE = not v["rope_kernel"]
    pf = l2stream.stream_plan(weights, step.device)
    step.prefetch = [pf[4 * i:4 * i + 4] for i in range(len(step.layers))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--variants", default="0 8 20 0")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()
    dev = torch.device("cuda")
    model = build_model(a.preset, dtype=torch.bfloat16, device="cuda", seed=0)
    braid_backend.patch(model, graphs=False)
    ids = random_tokens(model.config.vocab_size, a.batch, a.ctx, 1, "cuda")
    model.generate(ids, do_sample=False, pad_token_id=0, max_new_tokens=2)
    st = model._braid_session
    step, cache = st.step, st.cache
    b = step.new_buffers(a.batch, cache.max_len)
    b.ids.copy_(ids[:, -1])
    b.pos.fill_(a.ctx + 1)
    b.slots.fill_(a.ctx + 1)
    b.kv_lens.fill_(a.ctx + 2)
    weights = [w for fl in step.layers for w in (fl.w_qkv, fl.w_o, fl.w_gu, fl.w_down)]
    variants = [parse(v) for v in a.variants.split()]
    graphs, ref = [], None
    for v in variants:
        apply(step, weights, v)
        out = step.run(cache, b).clone()   # compiles this variant's kernels outside the capture
        ref = out if ref is None else ref
        same = bool(torch.equal(out, ref))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step.run(cache, b)
        graphs.append((v, g, same))
    s = torch.cuda.current_stream()
    times = {v["name"] + f"#{i}": [] for i, v in enumerate(variants)}
    for _ in range(a.rounds):
        for i, (v, g, _) in enumerate(graphs):
            g.replay()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record(s)
            for _ in range(a.reps):
                g.replay()
            e1.record(s)
            e1.synchronize()
            times[v["name"] + f"#{i}"].append(e0.elapsed_time(e1) / a.reps * 1000)
    rows = []
    print(f"{a.preset} batch {a.batch} ctx {a.ctx}: {torch.cuda.get_device_name()}, us per graph step "
          f"(median of {a.rounds} rounds x {a.reps} replays)")
    for i, (v, _, same) in enumerate(graphs):
        t = times[v["name"] + f"#{i}"]
        rows.append(dict(variant=v["name"], us=statistics.median(t), rounds=t, same_logits=same))
        print(f"  {v['name']:<24} {statistics.median(t):8.1f} us  ({min(t):.1f}-{max(t):.1f})  "
              f"logits {'identical' if same else 'DIFFER'}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(preset=a.preset, batch=a.batch, ctx=a.ctx, gpu=torch.cuda.get_device_name(),
                           torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
