"""Decode attention at long contexts, where the KV bytes dominate (issue #13: >= 70% of copy bandwidth).

    python benchmarks/kernels/bench_attention_long.py --out long.json [--ctx 8192,32768] [--batches 1,8]

Shapes of Llama-3.1-8B (32 q heads, 8 kv heads, head_dim 128) and Llama-3.2-1B (32/8/64), bf16; the
kernel alone with its default split count, timed as CUDA-graph replays with L2 flushed
(common.bench_ms(graph=True)); bytes = K and V of the attended positions + q + out.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from braid_backend.kernels._common import num_sms  # noqa: E402
from braid_backend.kernels.decode_attention import (  # noqa: E402
    attention_workspace, decode_attention, default_num_splits,
)

_spec = importlib.util.spec_from_file_location("_braid_bench_common",
                                               os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

SHAPES = {"llama-3.1-8b": (32, 8, 128), "llama-3.2-1b": (32, 8, 64)}


def bench(name, B, ctx, copy_gbs, dtype=torch.bfloat16):
    H, KV, D = SHAPES[name]
    dev = torch.device("cuda")
    S = ctx + 64
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, H, D, device=dev, dtype=dtype, generator=g)
    kc = torch.randn(B, KV, S, D, device=dev, dtype=dtype, generator=g)
    vc = torch.randn(B, KV, S, D, device=dev, dtype=dtype, generator=g)
    kv_lens = torch.full((B,), ctx, device=dev, dtype=torch.int32)
    valid = torch.ones(B, S, device=dev, dtype=torch.int8)
    out = torch.empty(B, H * D, device=dev, dtype=dtype)
    ns = default_num_splits(B, KV, S, num_sms(dev))
    ws = attention_workspace(B, H, D, ns, dev) if ns > 1 else None
    ms = common.bench_ms(lambda: decode_attention(q, kc, vc, kv_lens, valid, scale=D ** -0.5, out=out,
                                                  num_splits=ns, workspace=ws), graph=True)
    nbytes = (2 * B * KV * ctx * D + 2 * B * H * D) * 2
    return common.row("decode_attention", f"{name} H{H}/KV{KV}/D{D} ctx{ctx}", B, "bf16", ms, nbytes, copy_gbs,
                      baseline="-", baseline_ms=ms, config=f"splits={ns}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--ctx", default="8192,32768")
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args(argv)
    copy_gbs = common.copy_bandwidth_gbs()
    rows = []
    for name in SHAPES:
        for B in (int(b) for b in args.batches.split(",")):
            for ctx in (int(c) for c in args.ctx.split(",")):
                r = bench(name, B, ctx, copy_gbs)
                rows.append(r)
                print(f"{r['shape']:42} b{B:<3} {r['us']:9.2f} us {r['gbs']:8.1f} GB/s {r['pct_copy_bw']:6.1f}% "
                      f"of copy BW ({r['config']})", flush=True)
                torch.cuda.empty_cache()
    if args.out:
        json.dump({"gpu": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "torch": torch.__version__,
                   "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
