"""Microbenchmark of quant_gemv (kernels/quant_gemv.py) against fused_gemv in bf16 at 7-8B decode shapes (GPU).

Per model, projection, batch and format: the launcher's own config, timed as in the decode graph
(common.bench_ms(graph=True): L2 flushed between calls), optionally a small config sweep (--sweep, best
reported). GB/s counts what the kernel must read: the quantized bytes + scales (+ zero points) + x / out /
residual, next to a measured device copy bandwidth. Each case has a time limit (--case-s) and prints its
line as soon as it is done. Also checks each result against the dequantise-then-matmul reference.

    python benchmarks/kernels/bench_quant_gemv.py --out benchmarks/results/quant_gemv_h200.json
    python benchmarks/kernels/bench_quant_gemv.py --models llama-3.1-8b --batches 1 --formats int4_g128 --sweep
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import torch  # noqa: E402

import common  # noqa: E402
from braid_backend.kernels.fused_gemv import fused_gemv, gemv_workspace  # noqa: E402
from braid_backend.kernels.quant_gemv import (QuantWeight, quant_config, quant_gemv,  # noqa: E402
                                              quant_gemv_reference, quant_gemv_workspace)


def _shapes(h, inter, q, kv, vocab, bias):
    return [dict(name="qkv", N=q + 2 * kv, K=h, bias=bias, norm=True, act=None, residual=False),
            dict(name="o_proj", N=h, K=q, bias=False, norm=False, act=None, residual=True),
            dict(name="gate_up", N=2 * inter, K=h, bias=False, norm=True, act="silu_mul", residual=False),
            dict(name="down", N=h, K=inter, bias=False, norm=False, act=None, residual=True),
            dict(name="lm_head", N=vocab, K=h, bias=False, norm=True, act=None, residual=False)]


MODELS = {"llama-3.1-8b": _shapes(4096, 14336, 4096, 1024, 128256, False),
          "qwen2.5-7b": _shapes(3584, 18944, 3584, 512, 152064, True)}
FORMATS = ["bf16", "fp8_block", "fp8_channel", "int4_g128", "int4_g32", "int4_g128_asym"]
SWEEP = {
    "gemv_int4": [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s) for n, k, w, s in
                  [(8, 64, 4, 2), (16, 32, 4, 3), (16, 64, 4, 3), (16, 128, 8, 3), (32, 32, 4, 3), (32, 64, 8, 2)]],
    "gemv_fp8": [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s) for n, k, w, s in
                 [(2, 1024, 4, 2), (4, 512, 4, 2), (4, 1024, 4, 3), (4, 2048, 8, 2), (8, 512, 4, 3), (16, 256, 4, 3)]],
    "tc": [dict(BLOCK_N=n, num_warps=w, num_stages=s) for n, w, s in
           [(32, 4, 3), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3)]],
}


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def make_weight(fmt, N, K, dev):
    """Random weights of a format, made on the GPU (values do not change the timing)."""
    if fmt == "bf16":
        return (torch.randn(N, K, device=dev) * K ** -0.5).to(torch.bfloat16)
    if fmt.startswith("fp8"):
        data = (torch.randn(N, K, device=dev) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        if fmt == "fp8_block":
            return QuantWeight(fmt, data, torch.rand(-(-N // 128), -(-K // 128), device=dev) * 1e-3, (N, K))
        return QuantWeight(fmt, data, torch.rand(N, 1, device=dev) * 1e-3, (N, K))
    g = int(fmt.split("_")[1][1:])
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (N, K // 8), dtype=torch.int32, device=dev)
    zp = (torch.randint(-2 ** 31, 2 ** 31 - 1, (-(-N // 8), K // g), dtype=torch.int32, device=dev)
          if fmt.endswith("asym") else None)
    scale = (torch.rand(N, K // g, device=dev) * 1e-2).to(torch.bfloat16)
    return QuantWeight("int4", words, scale, (N, K), group_size=g, zero_point=zp)


def run_case(sh, M, fmt, copy_gbs, sweep, dev):
    N, K, act = sh["N"], sh["K"], sh["act"]
    n_out = N // 2 if act else N
    w = make_weight(fmt, N, K, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, K, device=dev, generator=g).to(torch.bfloat16)
    kw = dict(act=act)
    if sh["bias"]:
        kw["bias"] = torch.randn(N, device=dev).to(torch.bfloat16)
    if sh["norm"]:
        kw["norm_weight"] = (1 + 0.1 * torch.randn(K, device=dev)).to(torch.bfloat16)
    res = torch.randn(M, n_out, device=dev).to(torch.bfloat16) if sh["residual"] else None
    out = torch.empty(M, n_out, device=dev, dtype=torch.bfloat16)
    if fmt == "bf16":
        ws = gemv_workspace([(M, n_out, K, act is not None, sh["norm"])], torch.bfloat16, dev)
        wbytes = w.numel() * 2
        base_cfg = None

        def call(cfg=None):
            return fused_gemv(x, w, residual=res, out=out, workspace=ws, config=cfg, **kw)
    else:
        gran = w.group_size if w.format == "int4" else (128 if w.format == "fp8_block" else 0)
        ws = quant_gemv_workspace([(M, n_out, K, act is not None, sh["norm"], w.format, gran)], torch.bfloat16, dev)
        wbytes = w.nbytes
        base_cfg = quant_config(M, n_out, K, torch.bfloat16, act is not None, dev, w.format, gran, None, sh["norm"])

        def call(cfg=None):
            return quant_gemv(x, w, residual=res, out=out, workspace=ws, config=cfg, **kw)
    call()
    err = None
    if fmt != "bf16":   # against the dequantise-then-matmul reference (fp32), before timing
        ref = quant_gemv_reference(x.float(), w, residual=None if res is None else res.float(),
                                   **{k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()})
        got = call().float()
        err = float((got - ref).norm() / ref.norm().clamp(min=1e-30))
        del ref
    nbytes = wbytes + x.numel() * 2 + out.numel() * 2 * (2 if res is not None else 1)
    best = (common.bench_ms(call, graph=True), "heuristic")
    if sweep and fmt != "bf16":
        key = "tc" if base_cfg["path"] == "tc" else ("gemv_int4" if w.format == "int4" else "gemv_fp8")
        for alt in SWEEP[key]:
            cfg = dict(alt, path=base_cfg["path"])
            if "SPLIT_K" in base_cfg:
                cfg["SPLIT_K"] = 1
            try:
                ms = common.bench_ms(lambda: call(cfg), graph=True)
            except Exception as e:   # an invalid tiling for this format: skip it
                print(f"    skip {cfg}: {type(e).__name__}: {str(e)[:80]}", flush=True)
                continue
            if ms < best[0]:
                best = (ms, json.dumps(cfg, sort_keys=True))
    ms, cfg_used = best
    r = common.row("quant_gemv" if fmt != "bf16" else "fused_gemv", sh["name"], M, fmt, ms, nbytes, copy_gbs,
                   "", ms, cfg_used if cfg_used != "heuristic" else json.dumps(base_cfg, sort_keys=True))
    r.update(N=N, K=K, weight_bytes=wbytes, relerr=err)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--formats", nargs="+", default=["bf16", "fp8_block", "fp8_channel", "int4_g128"], choices=FORMATS)
    ap.add_argument("--shapes", nargs="+", default=None, help="projection names (default: all)")
    ap.add_argument("--sweep", action="store_true", help="also time a few alternative configs per case")
    ap.add_argument("--case-s", type=int, default=120, help="time limit per case (compile included)")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_quant_gemv needs a CUDA GPU")
    dev = torch.device("cuda", 0)
    import triton
    copy_gbs = common.copy_bandwidth_gbs()
    meta = dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__, triton=triton.__version__,
                copy_gbs=round(copy_gbs, 1), date=time.strftime("%Y-%m-%d %H:%M"))
    print(json.dumps(meta), flush=True)
    rows = []
    signal.signal(signal.SIGALRM, _alarm)
    for model in args.models:
        for sh in MODELS[model]:
            if args.shapes and sh["name"] not in args.shapes:
                continue
            for M in args.batches:
                base_us = None
                for fmt in args.formats:
                    t0 = time.time()
                    signal.alarm(args.case_s)
                    try:
                        r = run_case(sh, M, fmt, copy_gbs, args.sweep, dev)
                    except CaseTimeout:
                        r = dict(model=model, shape=sh["name"], batch=M, dtype=fmt, error=f"timeout {args.case_s}s")
                    except Exception as e:
                        r = dict(model=model, shape=sh["name"], batch=M, dtype=fmt, error=f"{type(e).__name__}: {e}")
                    finally:
                        signal.alarm(0)
                    r["model"] = model
                    if "us" in r:
                        if fmt == "bf16":
                            base_us = r["us"]
                        if base_us:
                            r.update(baseline="fused_gemv bf16", baseline_us=base_us,
                                     speedup=round(base_us / r["us"], 2))
                        print(f"{model:13s} {sh['name']:8s} M={M:<3d} {fmt:15s} {r['us']:9.2f} us {r['gbs']:7.1f} GB/s "
                              f"({r['pct_copy_bw']:5.1f}% of copy) x{r.get('speedup', 1):.2f} vs bf16 "
                              f"relerr={r['relerr']} [{time.time() - t0:.0f}s] {r['config']}", flush=True)
                    else:
                        print(f"{model:13s} {sh['name']:8s} M={M:<3d} {fmt:15s} ERROR {r['error'][:200]}", flush=True)
                    rows.append(r)
                    torch.cuda.empty_cache()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(meta, rows=rows), indent=1))
        print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
