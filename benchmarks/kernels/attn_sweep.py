"""Long-context decode attention (GPU): split count and launch config of the split kernel, against the
KV bytes it must read (issue #13: >= 70% of copy bandwidth when KV bytes dominate).

    python benchmarks/kernels/attn_sweep.py [--out f.json] [--budget 240] [--no-pdl]

Per shape (batch, q heads, kv heads, head_dim, context): the launcher's default, then BLOCK_S x
num_warps x num_stages x {default, 2x, 4x splits}; each timed inside a CUDA graph with an L2 flush
between calls (common.bench_ms(graph=True)); checked against the reference first.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _ROOT)
_spec = importlib.util.spec_from_file_location("_bc", os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

from braid_backend.kernels._common import num_sms  # noqa: E402
from braid_backend.tuning import Tuning  # noqa: E402
from braid_backend.kernels.decode_attention import (attention_workspace, decode_attention,  # noqa: E402
                                                    decode_attention_reference, default_num_splits)

SHAPES = [  # name, M, H, KV, D, S
    ("qwen2.5-0.5b", 1, 14, 2, 64, 32768), ("qwen2.5-0.5b", 8, 14, 2, 64, 32768),
    ("llama-3.2-1b", 8, 32, 8, 64, 32768), ("llama-3.1-8b", 1, 32, 8, 128, 32768),
    ("llama-3.1-8b", 8, 32, 8, 128, 32768), ("qwen2.5-0.5b", 8, 14, 2, 64, 8192),
]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--budget", type=float, default=240.0)
    ap.add_argument("--no-pdl", action="store_true", help="launch without programmatic dependent launch")
    a = ap.parse_args(argv)
    copy = common.copy_bandwidth_gbs()
    dev, dt = torch.device("cuda"), torch.bfloat16
    rows, t0 = [], time.perf_counter()
    tuning = Tuning(pdl=not a.no_pdl)
    slot = a.budget / len(SHAPES)
    print(f"{torch.cuda.get_device_name()} copy {copy:.0f} GB/s, PDL {'off' if a.no_pdl else 'on'}", flush=True)
    for name, M, H, KV, D, S in SHAPES:
        ts = time.perf_counter()
        q = torch.randn(M, H, D, dtype=dt, device=dev)
        k = torch.randn(M, KV, S, D, dtype=dt, device=dev)
        v = torch.randn(M, KV, S, D, dtype=dt, device=dev)
        kv_lens = torch.full((M,), S, dtype=torch.int32, device=dev)
        valid = torch.ones(M, S, dtype=torch.int8, device=dev)
        out = torch.empty(M, H * D, dtype=dt, device=dev)
        ref = decode_attention_reference(q, k, v, kv_lens, valid, scale=D ** -0.5)
        nbytes = 2 * M * KV * S * D * 2
        base = default_num_splits(M, KV, S, num_sms(dev))
        cands = [(base, None)]
        bs = (32, 64) if D > 64 else (64, 128)
        for b, st, w, sp in itertools.product(bs, (2, 3), (4, 8), (base, 2 * base, 4 * base)):
            cands.append((min(sp, 256), dict(BLOCK_S=b, num_warps=w, num_stages=st)))
        res = []
        for sp, cfg in cands:
            if time.perf_counter() - ts > slot:
                break
            ws = attention_workspace(M, H, D, sp, dev)
            fn = lambda: decode_attention(q, k, v, kv_lens, valid, scale=D ** -0.5, out=out,  # noqa: E731
                                          num_splits=sp, workspace=ws, config=cfg, tuning=tuning)
            try:
                fn()
                torch.cuda.synchronize()
                err = (out.float() - ref.float()).abs().max().item()
                ms = common.bench_ms(fn, graph=True)
            except Exception as e:  # a config that does not compile (shared memory) is skipped
                res.append(dict(splits=sp, config=cfg, error=f"{type(e).__name__}: {str(e)[:120]}"))
                continue
            res.append(dict(splits=sp, config=cfg, us=round(ms * 1e3, 2), GBps=round(nbytes / ms / 1e6, 1),
                            pct_copy=round(100 * nbytes / ms / 1e6 / copy, 1), max_err=err))
        ok = [r for r in res if "us" in r]
        best = min(ok, key=lambda r: r["us"]) if ok else None
        row = dict(shape=f"{name} M={M} H={H} KV={KV} D={D} S={S}", kv_MB=nbytes / 1e6, default=res[0],
                   best=best, tried=len(res), results=res)
        rows.append(row)
        print(f"{row['shape']}: default {res[0].get('us')} us ({res[0].get('pct_copy')}% copy) "
              f"best {best and best['us']} us ({best and best['pct_copy']}%) splits={best and best['splits']} "
              f"{best and best['config']} [{len(res)} tried]", flush=True)
        if a.out:
            json.dump(dict(gpu=torch.cuda.get_device_name(), copy_gbs=copy, torch=torch.__version__,
                           rows=rows), open(a.out, "w"), indent=1)
        del q, k, v, valid, out, ref
        torch.cuda.empty_cache()
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
