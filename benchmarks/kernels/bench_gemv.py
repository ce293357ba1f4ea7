"""Microbenchmark of fused_gemv on the Qwen2.5-0.5B decode projections (GPU).

For each shape and batch: the launcher's heuristic config, optionally a small sweep of alternative
configs (best one reported), and the unfused torch ops the kernel replaces. Everything is timed
inside CUDA graphs (common.bench_ms(graph=True)), i.e. as it runs in the decode graph.
Bytes counted = weight + x + out (+ residual read, bias, norm weight).

    python benchmarks/kernels/bench_gemv.py --out benchmarks/results/gemv_h100.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from braid_backend.kernels.fused_gemv import (GemvWorkspace, default_config, fused_gemv,  # noqa: E402
                                              fused_gemv_reference)

# Qwen2.5-0.5B: hidden 896, intermediate 4864, 14 x 64 query heads, 2 KV heads, vocab 151936.
QWEN_SHAPES = [
    dict(name="qkv", N=1152, K=896, bias=True, norm=True, act=None, residual=False),
    dict(name="o_proj", N=896, K=896, bias=False, norm=False, act=None, residual=True),
    dict(name="gate_up", N=2 * 4864, K=896, bias=False, norm=True, act="silu_mul", residual=False),
    dict(name="down", N=896, K=4864, bias=False, norm=False, act=None, residual=True),
    dict(name="lm_head", N=151936, K=896, bias=False, norm=True, act=None, residual=False),
]

# Llama-3.1-8B: hidden 4096, intermediate 14336, 32 x 128 query heads, 8 KV heads (lm_head left out: it
# is the batch-1 GEMV's case, and 1 GB of random weights per shape costs the sweep's time)
LLAMA8B_SHAPES = [
    dict(name="qkv", N=6144, K=4096, bias=False, norm=True, act=None, residual=False),
    dict(name="o_proj", N=4096, K=4096, bias=False, norm=False, act=None, residual=True),
    dict(name="gate_up", N=2 * 14336, K=4096, bias=False, norm=True, act="silu_mul", residual=False),
    dict(name="down", N=4096, K=14336, bias=False, norm=False, act=None, residual=True),
]
SHAPES = {"qwen2.5-0.5b": QWEN_SHAPES, "llama-3.1-8b": LLAMA8B_SHAPES}

# Alternatives tried around the heuristic (a few per path; compile time dominates the sweep).
GEMV_SWEEP = [
    dict(BLOCK_N=2, BLOCK_K=1024, num_warps=4, num_stages=1),
    dict(BLOCK_N=4, BLOCK_K=512, num_warps=4, num_stages=1),
    dict(BLOCK_N=4, BLOCK_K=1024, num_warps=4, num_stages=3),
    dict(BLOCK_N=8, BLOCK_K=512, num_warps=8, num_stages=2),
    dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=2),
    dict(BLOCK_N=32, BLOCK_K=256, num_warps=8, num_stages=3),
]
# --wide on the GEMV path (batch 1-2): deeper K tiles and more warps for 7-9B matrices (K 4096-14336)
GEMV_SWEEP_WIDE = GEMV_SWEEP + [
    dict(BLOCK_N=4, BLOCK_K=1024, num_warps=8, num_stages=3),
    dict(BLOCK_N=4, BLOCK_K=2048, num_warps=8, num_stages=2),
    dict(BLOCK_N=2, BLOCK_K=2048, num_warps=8, num_stages=3),
    dict(BLOCK_N=8, BLOCK_K=1024, num_warps=8, num_stages=3),
    dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, num_stages=4),
    dict(BLOCK_N=16, BLOCK_K=512, num_warps=8, num_stages=3),
]
TC_SWEEP = [
    dict(BLOCK_N=16, BLOCK_K=128, num_warps=4, num_stages=4),
    dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
    dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
    dict(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_N=32, BLOCK_K=256, num_warps=8, num_stages=3),
    dict(path="gemv", BLOCK_N=4, BLOCK_K=128, num_warps=8, num_stages=2),  # no tensor cores at all
]
# --wide: deeper K tiles and pipelines for big matrices at batch 3-16 (7-9B models), where the default
# 16-row tiles with 128-wide K read the weights at about half of copy bandwidth (issue #13's batch sweep)
TC_SWEEP_WIDE = TC_SWEEP + [
    dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=4),
    dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=3),
    dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4),
    dict(BLOCK_N=32, BLOCK_K=512, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=3),
    dict(BLOCK_N=64, BLOCK_K=256, num_warps=8, num_stages=4),
    dict(BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
    dict(path="gemv", BLOCK_N=2, BLOCK_K=256, num_warps=4, num_stages=2),
    dict(path="gemv", BLOCK_N=4, BLOCK_K=256, num_warps=8, num_stages=3),
]
# --split: split-K on the small models' batch 3-16 tiles (fewer tiles than SMs: Qwen2.5-0.5B down, o_proj,
# qkv); SPLIT_K=1 is the one-program-per-tile baseline
TC_SWEEP_SPLIT = [
    dict(SPLIT_K=1),
    dict(BLOCK_N=16, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=4),
    dict(BLOCK_N=16, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=4),
    dict(BLOCK_N=16, BLOCK_K=128, SPLIT_K=8, num_warps=4, num_stages=4),
    dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=4, num_warps=4, num_stages=4),
    dict(BLOCK_N=16, BLOCK_K=256, SPLIT_K=4, num_warps=4, num_stages=3),
    dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=4),
    dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=4),
    dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=2, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=4),
]
_WIDE = False
_SPLIT = False


def _cfg_str(cfg: dict) -> str:
    keys = ("path", "BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "SPLIT_K")
    return " ".join(f"{k.replace('BLOCK_', '').lower() if k.startswith('BLOCK_') else k}={cfg[k]}"
                    for k in keys if k in cfg)


def _candidates(base: dict, M: int) -> list[dict]:
    out, seen = [], {_cfg_str(base)}
    tc = TC_SWEEP_SPLIT if _SPLIT else TC_SWEEP_WIDE if _WIDE else TC_SWEEP
    gemv = GEMV_SWEEP_WIDE if _WIDE else GEMV_SWEEP
    for alt in (gemv if base["path"] == "gemv" else tc):
        cfg = dict(base, **alt)
        if cfg["path"] == "gemv":
            if alt.get("path") == "gemv" and base["path"] != "gemv":
                cfg["BLOCK_M"] = min(16, 1 << (M - 1).bit_length())
            # keep the 3-D fp32 accumulator within ~64 registers/thread
            cap = 64 * 32 * cfg["num_warps"] // (cfg["BLOCK_M"] * cfg["BLOCK_N"])
            cfg["BLOCK_K"] = max(32, min(cfg["BLOCK_K"], 1 << (cap.bit_length() - 1)))
        s = _cfg_str(cfg)
        if s not in seen:
            seen.add(s)
            out.append(cfg)
    return out


def _hf_rmsnorm(x, w, eps=1e-6):
    """Qwen2RMSNorm.forward, verbatim math."""
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    return w * (xf * torch.rsqrt(var + eps)).to(x.dtype)


def _relerr(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def run(copy_gbs: float, batches=(1, 16), sweep=True, *, shapes=None, dtype=torch.bfloat16,
        device="cuda", budget_s: float = 45.0, verbose=True) -> list[dict]:
    """One row per (shape, batch) for the heuristic config, plus one for the sweep's best.

    The sweep (compile time dominates it) gets budget_s in all, split evenly over the
    (shape, batch) slots so that no shape loses its sweep to the ones before it."""
    rows: list[dict] = []
    shapes = shapes or QWEN_SHAPES
    slot_s = budget_s / max(1, len(shapes) * len(batches))
    gen = torch.Generator(device="cpu").manual_seed(0)
    ws = GemvWorkspace(1 << 23, 1 << 14, device)   # split-K partials: ample for every shape here
    for sh in shapes:
        N, K, act = sh["N"], sh["K"], sh["act"]
        n_out = N // 2 if act else N

        def rnd(*s, scale=1.0):
            return (torch.randn(*s, generator=gen) * scale).to(dtype).to(device)

        w = rnd(N, K, scale=K ** -0.5)
        bias = rnd(N) if sh["bias"] else None
        nw = (rnd(K, scale=0.1) + 1) if sh["norm"] else None
        for M in batches:
            t_slot = time.perf_counter()
            x = rnd(M, K)
            res_check = rnd(M, n_out) if sh["residual"] else None
            res_t = res_check.clone() if sh["residual"] else None  # updated in place while timing
            out = torch.empty(M, n_out, dtype=dtype, device=device)
            kw = dict(bias=bias, norm_weight=nw, act=act)
            ref = fused_gemv_reference(x, w, residual=res_check, **kw)
            esz = x.element_size()
            nbytes = (w.numel() + x.numel() + out.numel() + (res_t.numel() if res_t is not None else 0)
                      + (bias.numel() if bias is not None else 0) + (nw.numel() if nw is not None else 0)) * esz

            def fused(cfg):
                if res_t is not None:  # in-place residual-stream update, as in the decode layer
                    return lambda: fused_gemv(x, w, residual=res_t, out=res_t, config=cfg, workspace=ws, **kw)
                return lambda: fused_gemv(x, w, out=out, config=cfg, workspace=ws, **kw)

            def try_cfg(cfg):
                """(ms, note): checks the config's answer first, then times it."""
                try:
                    chk = torch.empty(M, n_out, dtype=dtype, device=device)
                    fused_gemv(x, w, residual=res_check, out=chk, config=cfg, workspace=ws, **kw)
                    if chk.is_cuda:
                        torch.cuda.synchronize()  # surface asynchronous launch errors here
                    err = _relerr(chk, ref)
                    if not err < 1e-2:
                        return None, f"WRONG (relerr {err:.2e})"
                    return common.bench_ms(fused(cfg), graph=True), ""
                except Exception as e:  # compile failure / out of resources: note it and move on
                    return None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"

            # the unfused stock ops this kernel replaces
            if sh["name"] == "gate_up":
                wg, wu = w[:n_out], w[n_out:]

                def base():
                    h = _hf_rmsnorm(x, nw)
                    return F.silu(F.linear(h, wg)) * F.linear(h, wu)
                base_name = "rmsnorm + 2x F.linear + silu*mul"
            elif sh["residual"]:
                def base():
                    return res_check + F.linear(x, w, bias)
                base_name = "F.linear + add"
            elif sh["norm"]:
                def base():
                    return F.linear(_hf_rmsnorm(x, nw), w, bias)
                base_name = "rmsnorm + F.linear" + (" (bias)" if bias is not None else "")
            else:
                def base():
                    return F.linear(x, w, bias)
                base_name = "F.linear"
            base_ms = common.bench_ms(base, graph=True)

            heur = dict(default_config(M, n_out, K, dtype, act is not None, torch.device(device), None,
                                       bool(sh["norm"])))
            h_ms, h_note = try_cfg(heur)
            shape_s = f"{sh['name']} N={N} K={K}"
            sweep_res = [dict(config=_cfg_str(heur), us=None if h_ms is None else round(h_ms * 1e3, 2),
                              note=h_note)]
            if h_ms is not None:
                r = common.row("fused_gemv[heuristic]", shape_s, M, str(dtype).replace("torch.", ""), h_ms,
                               nbytes, copy_gbs, base_name, base_ms, _cfg_str(heur))
            else:
                r = dict(kernel="fused_gemv[heuristic]", shape=shape_s, batch=M, config=_cfg_str(heur),
                         note=h_note, baseline=base_name, baseline_us=round(base_ms * 1e3, 2))
            first = len(rows)
            rows.append(r)
            if sweep:
                best = (h_ms, heur) if h_ms is not None else (None, None)
                truncated = False
                for cfg in _candidates(heur, M):
                    if time.perf_counter() - t_slot > slot_s:
                        truncated = True
                        break
                    ms, note = try_cfg(cfg)
                    sweep_res.append(dict(config=_cfg_str(cfg), us=None if ms is None else round(ms * 1e3, 2),
                                          note=note))
                    if ms is not None and (best[0] is None or ms < best[0]):
                        best = (ms, cfg)
                if best[0] is not None:
                    b = common.row("fused_gemv[best]", shape_s, M, str(dtype).replace("torch.", ""), best[0],
                                   nbytes, copy_gbs, base_name, base_ms, _cfg_str(best[1]))
                    b["sweep"] = sweep_res
                    if truncated:
                        b["note"] = f"sweep truncated at its {slot_s:.1f}s budget"
                    rows.append(b)
            if verbose:
                for rr in rows[first:]:
                    _print_row(rr)
            del x, out, res_t, res_check, ref
        del w, bias, nw
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


_HDR = f"{'kernel':<22} {'shape':<26} {'M':>3} {'us':>8} {'GB/s':>7} {'%copy':>6} {'base us':>8} {'speedup':>7}  config"


def _print_row(r: dict) -> None:
    if "us" not in r:
        print(f"{r['kernel']:<22} {r['shape']:<26} {r['batch']:>3}  {r.get('note', '')}  [{r['config']}]", flush=True)
        return
    print(f"{r['kernel']:<22} {r['shape']:<26} {r['batch']:>3} {r['us']:>8.2f} {r['gbs']:>7.1f} "
          f"{r['pct_copy_bw']:>6.1f} {r['baseline_us']:>8.2f} {r['speedup']:>7.2f}  {r['config']}"
          + (f"  ({r['note']})" if r.get("note") else ""), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default 1,16)")
    ap.add_argument("--no-sweep", action="store_true", help="time only the heuristic configs")
    ap.add_argument("--budget", type=float, default=45.0,
                    help="seconds for the whole sweep, split over the (shape, batch) slots")
    ap.add_argument("--shapes", default="qwen2.5-0.5b", choices=sorted(SHAPES), help="whose projections")
    ap.add_argument("--wide", action="store_true", help="the wider tensor-core sweep (TC_SWEEP_WIDE)")
    ap.add_argument("--split", action="store_true", help="the split-K tensor-core sweep (TC_SWEEP_SPLIT)")
    args = ap.parse_args(argv)
    import triton

    global _WIDE, _SPLIT
    _WIDE, _SPLIT = args.wide, args.split

    t0 = time.perf_counter()
    copy_gbs = common.copy_bandwidth_gbs()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: device copy bandwidth {copy_gbs:.0f} GB/s; torch {torch.__version__}, triton {triton.__version__}")
    print(_HDR)
    batches = tuple(int(b) for b in args.batches.split(","))
    rows = run(copy_gbs, batches=batches, sweep=not args.no_sweep, budget_s=args.budget, shapes=SHAPES[args.shapes])
    print(f"total {time.perf_counter() - t0:.1f}s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(benchmark="bench_gemv", gpu=gpu, torch=torch.__version__, triton=triton.__version__,
                           copy_gbs=round(copy_gbs, 1), dtype="bfloat16", rows=rows), f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
