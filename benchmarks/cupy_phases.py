"""Per-phase time of ONE CuPy persistent layer kernel (GPU): where the CuPy step's layer time goes.

For each model, batch bucket M and context: builds the model, patches it with backend="cupy", runs a short
greedy generate (compiles, first-use check), then launches the middle layer's kernel, compiled with
BRAID_PHASE_TIMES (kernels/cupy_layer.cu: %globaltimer stamps of thread 0 of every CTA at entry, at each
grid-barrier arrival and release, at exit), on a 1-layer random cache filled to `ctx` positions, REPS times,
and prints per phase the median over launches of:
  work max   slowest CTA's time from the previous barrier's release to this barrier's arrival (the CTA
             every other one waits for); includes issuing the L2 prefetch of the NEXT phase's weights
  wait med / max   barrier wait (release - arrival) over CTAs
  span       the phase's share of wall time (median release to median release; spans sum to `total`)
  MB, GB/s   bytes the phase must read (its weights; P2: the K and V rows) / work max. Weights may
             already sit in L2 from the previous phase's prefetch, so this is "effective", not DRAM
plus the timed kernel's total (max exit - min entry), the plain kernel's time (CUDA events over a graph
of REPS launches: the timing variant's overhead shows as the difference), and, unless --no-triton, the
Triton step's same layer as a graph (total) and per kernel (torch.profiler over eager launches).

    python benchmarks/cupy_phases.py [--models qwen2.5-0.5b llama-3.2-1b] [--buckets 1 4]
                                     [--ctx 128 4096] [--reps 20] [--no-triton] [--out phases.json]
Each (model, M, ctx) is its own try/except: a failing config prints its error and the rest go on.
Configs left when --budget seconds have passed are skipped (and listed).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import torch

import braid_backend
from braid_backend.kernels.cupy_layer import PHASES, LayerKernel
from braid_backend.kernels.decode_attention import decode_attention
from braid_backend.kernels.fused_gemv import fused_gemv
from braid_backend.kernels.rope_cache import rope_qkv_cache_write
from braid_backend.model.cupy_step import CupyDecodeStep, _events
from braid_backend.model.step import _w
from braid_backend.runtime.cache import BraidCache
from braid_backend.runtime.interface import fill_inputs
from braid_backend.testing.numerics import random_tokens
from braid_backend.testing.presets import build_model


def _graph_us(fn, reps: int) -> float:
    """us per call of fn, from a CUDA graph of `reps` calls (launch gaps of a real step included)."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    t = _events(g.replay, reps=3) * 1000.0 / reps
    del g
    return t


def _phase_bytes(step, M: int, ctx: int) -> list[int]:
    sp, e = step.spec, 2      # bf16 / fp16
    H, I, NH, NKV, HD = sp.hidden, sp.intermediate, sp.n_heads, sp.n_kv_heads, sp.head_dim
    nq = (NH + 2 * NKV) * HD
    return [nq * H * e + H * e + (nq * e if sp.bias_qkv else 0),      # qkv weights, norm, bias
            2 * M * NKV * ctx * HD * e,                               # K and V rows attended
            H * NH * HD * e,                                          # o_proj
            2 * I * H * e + H * e,                                    # gate_up, norm
            H * I * e]                                                # down


def _layer_args(step, i: int, cache, b) -> dict:
    """The kernel arguments of layer i (CupyDecodeStep._run_cupy's), on a 1-layer cache."""
    fl, lp = step.layers[i], step.layers[i].plan
    cos, sin = step.tables[None]
    return dict(w_qkv=fl.w_qkv, b_qkv=fl.b_qkv, nw_attn=_w(lp.attn_norm), eps_attn=fl.eps_attn, w_o=fl.w_o,
                b_o=fl.b_o, w_gu=fl.w_gu, b_gu=fl.b_gu, nw_mlp=_w(lp.mlp_norm), eps_mlp=fl.eps_mlp,
                w_down=fl.w_down, b_down=fl.b_down, scale=lp.scale, cos=cos, sin=sin, pos=b.pos, slots=b.slots,
                kv_lens=b.kv_lens, valid=cache.valid, k_cache=cache.k[0], v_cache=cache.v[0],
                next_w_qkv=step.layers[i + 1].w_qkv if i + 1 < len(step.layers) else None,
                q_buf=b.q, attn=b.attn, act=b.act)


def _triton_layer(step, i: int, cache, b) -> None:
    """DecodeStep.run's body for layer i of a llama-like model (what the CuPy kernel replaces)."""
    fl, lp, p = step.layers[i], step.layers[i].plan, step.plan
    cos, sin = step.tables[None]
    fused_gemv(b.x, fl.w_qkv, bias=fl.b_qkv, norm_weight=_w(lp.attn_norm), eps=fl.eps_attn, out=b.qkv)
    rope_qkv_cache_write(b.qkv, cos, sin, b.pos, b.slots, cache.k[0], cache.v[0], b.q, n_heads=step.n_heads,
                         n_kv_heads=step.n_kv_heads, head_dim=p.head_dim, rope_dim=cos.shape[1])
    decode_attention(b.q, cache.k[0], cache.v[0], b.kv_lens, cache.valid, scale=lp.scale, out=b.attn,
                     num_splits=b.num_splits, workspace=b.ws)
    step._sublayer_out(b, b.attn, fl.w_o, fl.b_o, None, fl.eps_attn_out, 0)
    fused_gemv(b.x, fl.w_gu, bias=fl.b_gu, norm_weight=_w(lp.mlp_norm), eps=fl.eps_mlp, act=p.act, out=b.act)
    step._sublayer_out(b, b.act, fl.w_down, fl.b_down, None, fl.eps_mlp_out, 1)


def _triton_kernels(fn, n: int) -> list[tuple[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                key=lambda e: e.time_range.start)
    per = len(ev) // n
    return [(ev[j].name[:48], sum(ev[r * per + j].device_time for r in range(n)) / n) for j in range(per)]


def _med(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r[key] is not None]
    return statistics.median(vals) if vals else None


@torch.no_grad()
def run_config(step, M: int, ctx: int, reps: int, kernels: dict, triton: bool) -> dict:
    S = -(-(ctx + 64) // 64) * 64
    layer = len(step.layers) // 2
    cache = BraidCache(1, M, step.n_kv_heads, S, step.head_dim, step.dtype, step.device)
    g = torch.Generator(device=step.device).manual_seed(ctx + M)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g, device=step.device).to(t.dtype))
    cache.valid.zero_()
    cache.valid[:M, :ctx] = 1
    step.prepare(S)
    b = step.new_buffers(M, S)
    fill_inputs(b, cache, torch.randint(3, step.vocab, (M,), generator=g, device=step.device), None, ctx - 1)
    x0 = (torch.randn(b.x.shape, generator=g, device=step.device) * 0.5).to(b.x.dtype)
    for pt in (False, True):
        if (M, pt) not in kernels:
            kernels[(M, pt)] = LayerKernel(step.spec, M, step.device, phase_times=pt)
    kt, kp = kernels[(M, True)], kernels[(M, False)]
    ws_t, ws_p = kt.workspace(S), kp.workspace(S)
    args = _layer_args(step, layer, cache, b)
    runs = []
    for r in range(reps + 2):                       # 2 warm-ups
        b.x.copy_(x0)
        kt.launch(ws_t, b.x, **args)
        if r == 0:
            kt.check(ws_t)
        st = kt.phase_stats()
        if r >= 2:
            runs.append(st)
    kt.check(ws_t)
    b.x.copy_(x0)
    plain_us = _graph_us(lambda: kp.launch(ws_p, b.x, **args), reps)
    kp.check(ws_p)
    nbytes = _phase_bytes(step, M, ctx)
    phases = []
    for i, name in enumerate(PHASES):
        rows = [st["phases"][i] for st in runs]
        d = {k: _med(rows, k) for k in rows[0] if k != "phase"}
        d.update(phase=name, bytes=nbytes[i], gbps=nbytes[i] / (d["work_max_us"] * 1e3) if d["work_max_us"] else None)
        phases.append(d)
    out = dict(M=M, ctx=ctx, layer=layer, ctas=runs[0]["ctas"], num_splits=ws_t.num_splits, reps=reps,
               total_us=statistics.median(st["total_us"] for st in runs),
               entry_spread_us=statistics.median(st["entry_spread_us"] for st in runs),
               plain_kernel_us=plain_us, phases=phases)
    if triton:
        try:
            b.x.copy_(x0)
            out["triton_layer_us"] = _graph_us(lambda: _triton_layer(step, layer, cache, b), reps)
            out["triton_kernels"] = _triton_kernels(lambda: _triton_layer(step, layer, cache, b), 5)
        except Exception as e:   # optional part: report and keep the CuPy numbers
            out["triton_error"] = f"{type(e).__name__}: {e}"
    return out


def print_config(name: str, r: dict) -> None:
    print(f"\n== {name}  M={r['M']}  ctx={r['ctx']}  layer {r['layer']}  ({r['ctas']} CTAs, {r['num_splits']} "
          f"KV splits, median of {r['reps']} launches)")
    print(f"{'phase':<24}{'work max':>10}{'work med':>10}{'wait med':>10}{'wait max':>10}{'span':>9}"
          f"{'MB':>8}{'GB/s':>8}")
    f = lambda v, w=10, p=1: f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"
    for ph in r["phases"]:
        print(f"{ph['phase']:<24}{f(ph['work_max_us'])}{f(ph['work_median_us'])}{f(ph['wait_median_us'])}"
              f"{f(ph['wait_max_us'])}{f(ph['span_us'], 9)}{f(ph['bytes'] / 1e6, 8, 2)}{f(ph['gbps'], 8, 0)}")
    print(f"timed kernel total {r['total_us']:.1f} us (CTA entry skew {r['entry_spread_us']:.1f}); plain kernel "
          f"{r['plain_kernel_us']:.1f} us/launch (graph)")
    if "triton_layer_us" in r:
        ks = ", ".join(f"{n} {t:.1f}" for n, t in r["triton_kernels"])
        print(f"triton layer {r['triton_layer_us']:.1f} us/layer (graph); kernels (eager, us): {ks}")
    elif "triton_error" in r:
        print(f"triton layer: failed ({r['triton_error']})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["qwen2.5-0.5b", "llama-3.2-1b"])
    ap.add_argument("--buckets", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--ctx", nargs="+", type=int, default=[128, 4096])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton layer timing / profile")
    ap.add_argument("--budget", type=float, default=80.0, help="skip configs once this many seconds passed")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("cupy_phases: needs a CUDA GPU")
        return 1
    t_start = time.perf_counter()
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, results=[], errors=[], skipped=[])
    for name in a.models:
        todo = [(M, c) for M in a.buckets for c in a.ctx]
        if time.perf_counter() - t_start > a.budget:
            res["skipped"] += [dict(model=name, M=M, ctx=c) for M, c in todo]
            print(f"\n{name}: skipped (budget {a.budget:.0f} s spent)")
            continue
        try:
            model = build_model(name, dtype=torch.bfloat16, device="cuda", seed=0)
            rep = braid_backend.patch(model, backend="cupy")
            ids = random_tokens(model.config.vocab_size, 1, 32, 1, "cuda")
            model.generate(ids, do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
            step = model._braid_session.step
            if not isinstance(step, CupyDecodeStep) or step.failed:
                raise RuntimeError(f"CuPy step not in use: {getattr(step, 'failed', None) or rep}")
            print(f"\n{name}: patched ({rep.backends}), setup {time.perf_counter() - t_start:.1f} s")
        except Exception as e:
            traceback.print_exc()
            res["errors"].append(dict(model=name, error=f"setup: {type(e).__name__}: {e}"))
            continue
        kernels: dict = {}
        for M, ctx in todo:
            if time.perf_counter() - t_start > a.budget:
                res["skipped"].append(dict(model=name, M=M, ctx=ctx))
                print(f"{name} M={M} ctx={ctx}: skipped (budget)")
                continue
            try:
                r = run_config(step, M, ctx, a.reps, kernels, not a.no_triton)
                r["model"] = name
                res["results"].append(r)
                print_config(name, r)
            except Exception as e:
                traceback.print_exc()
                print(f"{name} M={M} ctx={ctx}: FAILED {type(e).__name__}: {e}")
                res["errors"].append(dict(model=name, M=M, ctx=ctx, error=f"{type(e).__name__}: {e}"))
            sys.stdout.flush()
        try:
            braid_backend.unpatch(model)
        except Exception:
            pass
        del model, step, kernels
        torch.cuda.empty_cache()
    print(f"\ncupy_phases: {len(res['results'])} configs, {len(res['errors'])} errors, {len(res['skipped'])} "
          f"skipped, {time.perf_counter() - t_start:.1f} s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.out}")
    return 0 if not res["errors"] else 2


if __name__ == "__main__":
    sys.exit(main())
