"""Microbenchmark: fused RoPE + KV-cache write and GQA decode attention vs the unfused torch ops they
replace in HF's decode step, at Qwen2.5-0.5B shapes (14 q heads, 2 kv heads, head_dim 64, bf16).

    python benchmarks/kernels/bench_attention.py --out benchmarks/results/attention_h100.json

All timings are CUDA-graph replays (common.bench_ms(graph=True)), i.e. launch overhead as inside the
decode graph. Each row also carries `max_abs_err` of the kernel against the torch baseline, so a run is
a GPU correctness smoke test too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # run as a script from anywhere, without installing the package
    sys.path.insert(0, _ROOT)

def _load_common():
    # Load the sibling common.py by path: works as a script, as a module, and whatever else is named
    # "benchmarks" or "common" on sys.path.
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py")
    spec = importlib.util.spec_from_file_location("_braid_bench_common", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


common = _load_common()
from braid_backend.kernels.decode_attention import (  # noqa: E402
    attention_workspace,
    decode_attention,
    default_num_splits,
)
from braid_backend.kernels.rope_cache import rope_qkv_cache_write  # noqa: E402

N_HEADS, N_KV, HEAD_DIM = 14, 2, 64  # Qwen2.5-0.5B
S_MAX = 4096
CONTEXTS = (300, 4000)


def _shape(ctx):
    return f"qwen2.5-0.5b H{N_HEADS}/KV{N_KV}/D{HEAD_DIM} S_max{S_MAX} ctx{ctx}"


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _bench_rope(B, ctx, dtype, device, copy_gbs):
    H, KV, D = N_HEADS, N_KV, HEAD_DIM
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(B, (H + 2 * KV) * D, device=device, dtype=dtype, generator=g)
    inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=device).float() / D))
    freqs = torch.arange(S_MAX, device=device).float()[:, None] * inv[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    positions = torch.full((B,), ctx - 1, device=device, dtype=torch.int64)
    cache_position = positions[:1].clone()  # HF's static cache: one write position for the batch
    kc = torch.zeros(B, KV, S_MAX, D, device=device, dtype=dtype)
    vc = torch.zeros_like(kc)
    kc_t, vc_t = torch.zeros_like(kc), torch.zeros_like(kc)
    q_out = torch.empty(B, H, D, device=device, dtype=dtype)

    def fused():
        rope_qkv_cache_write(qkv, cos, sin, positions, positions, kc, vc, q_out,
                             n_heads=H, n_kv_heads=KV, head_dim=D)

    res = {}

    def unfused():
        # HF: split + view/transpose, cos/sin gathered at the positions, rotate_half rope, index_copy_.
        q = qkv[:, :H * D].view(B, 1, H, D).transpose(1, 2)
        k = qkv[:, H * D:(H + KV) * D].view(B, 1, KV, D).transpose(1, 2)
        v = qkv[:, (H + KV) * D:].view(B, 1, KV, D).transpose(1, 2)
        c, s = cos[positions][:, None, None], sin[positions][:, None, None]
        q = (q * c) + (_rotate_half(q) * s)
        k = (k * c) + (_rotate_half(k) * s)
        kc_t.index_copy_(2, cache_position, k)
        vc_t.index_copy_(2, cache_position, v)
        res["q"] = q

    ms = common.bench_ms(fused, graph=True)
    base_ms = common.bench_ms(unfused, graph=True)
    fused()
    unfused()
    err = max((q_out.float() - res["q"][:, :, 0].float()).abs().max().item(),
              (kc.float() - kc_t.float()).abs().max().item(),
              (vc.float() - vc_t.float()).abs().max().item())
    el = torch.finfo(dtype).bits // 8
    nbytes = (qkv.numel() + 2 * B * D + B * H * D + 2 * B * KV * D) * el
    r = common.row("rope_qkv_cache_write", _shape(ctx), B, str(dtype).replace("torch.", ""), ms,
                   nbytes, copy_gbs, "HF rotate_half rope + index_copy_ x2", base_ms, config="grid=(B, H+KV)")
    r["max_abs_err"] = err
    return r


def _bench_attention(B, ctx, dtype, device, copy_gbs, num_sms):
    H, KV, D = N_HEADS, N_KV, HEAD_DIM
    G = H // KV
    scale = D ** -0.5
    g = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(B, H, D, device=device, dtype=dtype, generator=g)
    kc = torch.randn(B, KV, S_MAX, D, device=device, dtype=dtype, generator=g)
    vc = torch.randn(B, KV, S_MAX, D, device=device, dtype=dtype, generator=g)
    kv_lens = torch.full((B,), ctx, device=device, dtype=torch.int32)
    valid = torch.ones(B, S_MAX, device=device, dtype=torch.int8)
    valid[B // 2:, :7] = 0  # some left padding, as in a batched prompt
    mask = valid.bool()[:, None, None, :ctx]
    out = torch.empty(B, H * D, device=device, dtype=dtype)
    res = {}

    def unfused():
        # HF sdpa path over the cache slice: repeat_kv materialises G copies of K and V.
        k = kc[:, :, None, :ctx].expand(B, KV, G, ctx, D).reshape(B, H, ctx, D)
        v = vc[:, :, None, :ctx].expand(B, KV, G, ctx, D).reshape(B, H, ctx, D)
        o = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale)
        res["o"] = o.transpose(1, 2).reshape(B, H * D)

    base_ms = common.bench_ms(unfused, graph=True)
    unfused()
    el = torch.finfo(dtype).bits // 8
    nbytes = (2 * B * KV * ctx * D + 2 * B * H * D) * el
    rows = []
    default = default_num_splits(B, KV, S_MAX, num_sms)
    for ns in sorted({default, 1}, reverse=True):
        ws = attention_workspace(B, H, D, ns, device) if ns > 1 else None

        def fused(ns=ns, ws=ws):
            decode_attention(q, kc, vc, kv_lens, valid, scale=scale, out=out, num_splits=ns, workspace=ws)

        ms = common.bench_ms(fused, graph=True)
        fused()
        err = (out.float() - res["o"].float()).abs().max().item()
        tag = "default" if ns == default else "forced"
        r = common.row("decode_attention", _shape(ctx), B, str(dtype).replace("torch.", ""), ms,
                       nbytes, copy_gbs, "sdpa(repeat_kv(cache[:, :, :ctx]), mask)", base_ms,
                       config=f"num_splits={ns} ({tag}), grid=(B, KV, splits)")
        r["max_abs_err"] = err
        rows.append(r)
    return rows


def run(copy_gbs: float, batches=(1, 16), device: str = "cuda", dtype=torch.bfloat16) -> list[dict]:
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device == "cuda" else 132
    rows = []
    for ctx in CONTEXTS:
        for B in batches:
            rows.append(_bench_rope(B, ctx, dtype, device, copy_gbs))
            rows.extend(_bench_attention(B, ctx, dtype, device, copy_gbs, num_sms))
    return rows


def _table(rows):
    cols = ["kernel", "shape", "batch", "us", "gbs", "pct_copy_bw", "baseline_us", "speedup", "max_abs_err", "config"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(" | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) and c == "max_abs_err" else str(r[c])
                                for c in cols))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the rows (plus GPU/version info) as JSON here")
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args(argv)
    copy_gbs = common.copy_bandwidth_gbs()
    rows = run(copy_gbs, batches=tuple(int(b) for b in args.batches.split(",")))
    import triton

    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                copy_gbs=round(copy_gbs, 1), rows=rows)
    print(f"{info['gpu']}  torch {info['torch']}  triton {info['triton']}  copy {info['copy_gbs']} GB/s")
    print(_table(rows))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
