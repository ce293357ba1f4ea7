"""Microbenchmark of the fused MoE decode op (braid_backend/kernels/moe.py) at real layer shapes (GPU).

Shapes: Qwen3-30B-A3B (H 2048, E 128, top 8, I 768), gpt-oss-20b (H 2880, E 32, top 4, I 2880, biases,
transposed interleaved experts), Mixtral-8x7B (H 4096, E 8, top 2, I 14336), OLMoE-1B-7B (H 2048, E 64,
top 8, I 1024); batch 1, 4, 16; bf16 random weights (router scaled so that routing spreads).

Timings (CUDA graphs, CUDA events, median):
  chain:  `--reps` x L layers of the whole op (route + gate_up + down) back to back in one graph, each layer
          its own weights, as consecutive MoE layers of a decode step run (PDL between kernels, no layer's
          experts left in L2 by the previous one); us per op = total / (reps x L).
  kernel: each of the three kernels alone (common.bench_ms(graph=True): 128 MB L2 flush before each call).
Bytes counted per op = router (+ bias) + the union of the experts the batch selected (gate_up + down
[+ biases]) + h, x, out; GB/s and % of the measured copy bandwidth (read + write) from those.
--sweep tries a few alternative configs per kernel (best reported, then the chain re-timed with them);
--stock times the transformers block (experts_implementation grouped_mm) on the same weights, eager.

    python benchmarks/kernels/bench_moe.py --out benchmarks/results/moe_h200.json [--sweep] [--stock]
    python benchmarks/kernels/bench_moe.py --smoke     # tiny shapes on the CPU interpreter: code paths only
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from braid_backend.kernels.moe import MoEWorkspace, expert_config, moe_decode  # noqa: E402
from braid_backend.kernels.moe_route import route_config  # noqa: E402

MODELS = {
    "qwen3-30b-a3b": dict(H=2048, E=128, k=8, I=768, route="softmax_topk", renorm=True, hf="qwen3_moe"),
    "gpt-oss-20b": dict(H=2880, E=32, k=4, I=2880, route="topk_softmax", gpt=True, hf="gpt_oss"),
    "mixtral-8x7b": dict(H=4096, E=8, k=2, I=14336, route="softmax_topk", renorm=True, round_weights=False,
                         hf="mixtral"),
    "olmoe-1b-7b": dict(H=2048, E=64, k=8, I=1024, route="softmax_topk", renorm=False, hf="olmoe"),
}
SMOKE = {"smoke-qwen": dict(H=40, E=7, k=3, I=24, route="softmax_topk", renorm=True, hf="qwen3_moe"),
         "smoke-gpt": dict(H=40, E=5, k=2, I=24, route="topk_softmax", gpt=True, hf="gpt_oss")}
BATCHES = (1, 4, 16)
MIN_CHAIN_BYTES = 1 << 30   # layers in the chain: at least this many weight bytes, so L2 never helps


class CaseTimeout(Exception):
    pass


def log(*a):
    print(*a, flush=True)


def make_layer(m: dict, dev, dtype, seed: int) -> dict:
    """One layer's weights as moe_decode keywords (the packed layouts transformers uses)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    H, E, k, I = m["H"], m["E"], m["k"], m["I"]

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * scale).to(dtype)

    kw = dict(top_k=k, route=m["route"], renorm=m.get("renorm", False), round_weights=m.get("round_weights", True),
              router_weight=rnd(E, H, scale=H ** -0.5))
    if m.get("gpt"):
        kw.update(gate_up=rnd(E, H, 2 * I, scale=H ** -0.5), down=rnd(E, I, H, scale=I ** -0.5),
                  router_bias=rnd(E, scale=0.1), gate_up_bias=rnd(E, 2 * I, scale=0.1),
                  down_bias=rnd(E, H, scale=0.1), act="gpt_oss_swiglu", transposed=True, interleaved=True,
                  limit=7.0, alpha=1.702)
    else:
        kw.update(gate_up=rnd(E, 2 * I, H, scale=H ** -0.5), down=rnd(E, H, I, scale=I ** -0.5))
    return kw


def expert_bytes(kw: dict) -> int:
    E = kw["gate_up"].shape[0]
    n = (kw["gate_up"].numel() + kw["down"].numel()) // E * kw["gate_up"].element_size()
    for b in ("gate_up_bias", "down_bias"):
        if kw.get(b) is not None:
            n += kw[b].numel() // E * kw[b].element_size()
    return n


def op_bytes(kw: dict, n_union: int, M: int, H: int) -> int:
    r = kw["router_weight"].numel() * kw["router_weight"].element_size()
    if kw.get("router_bias") is not None:
        r += kw["router_bias"].numel() * kw["router_bias"].element_size()
    return r + n_union * expert_bytes(kw) + 3 * M * H * kw["gate_up"].element_size()


def timed(fn, reps: int, warm: int = 3) -> float:
    """Median ms of fn() (CUDA events on a GPU, wall clock in the smoke run)."""
    for _ in range(warm):
        fn()
    if not torch.cuda.is_available():
        t = []
        for _ in range(max(1, reps // 4)):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) * 1e3)
        return sorted(t)[len(t) // 2]
    torch.cuda.synchronize()
    t = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        t.append(s.elapsed_time(e))
    return sorted(t)[len(t) // 2]


def graphed(fn):
    """fn captured in a CUDA graph (returns the replay), or fn itself where there is no GPU."""
    if not torch.cuda.is_available():
        return fn
    fn()   # compile outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def kernel_ms(fn) -> float:
    if not torch.cuda.is_available():
        return timed(fn, 8)
    import common
    return common.bench_ms(fn, graph=True)


def chain_ms(layers, h, x, out, ws, cfg, reps: int) -> float:
    def run():
        for _ in range(reps):
            for kw in layers:
                moe_decode(h, x, **kw, out=out, workspace=ws, config=cfg)
    return timed(graphed(run), 10) / (reps * len(layers))


def sweep_configs(kind: str, M: int, gpt: bool) -> list[dict]:
    """A few alternatives per kernel around the heuristic (compile time bounds the list)."""
    if kind == "route":
        return [dict(SPLIT=s, BLOCK_E=be) for s in (1, 2, 4, 8) for be in (2, 8)]
    if M <= 2:
        if gpt:   # N contiguous: column-tile width x K tile
            alts = [dict(BLOCK_N=bn, BLOCK_K=bk) for bn in (16, 32, 64) for bk in (16, 32)]
        else:
            alts = [dict(BLOCK_N=bn, BLOCK_K=bk) for bn in (2, 4, 8) for bk in (512, 1024)]
        alts = [dict(a, path="gemv", num_warps=w, num_stages=st) for a in alts for w, st in ((4, 3), (8, 2))]
    else:
        alts = [dict(path="tc", BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
                for bn in (32, 64, 128) for bk in (64, 128) for w, st in ((4, 3), (8, 3))]
    if kind == "down":
        alts += [dict(a, SPLIT=s) for a in alts[1::3] for s in (2, 4)]
    return alts


def stock_block(m: dict, kw: dict, dev, dtype):
    """The transformers block of the family, built on the meta device, holding the bench's tensors."""
    import transformers
    from torch import nn
    cfg_kw = dict(hidden_size=m["H"], num_experts_per_tok=m["k"], experts_implementation="grouped_mm",
                  num_hidden_layers=1)
    fam = m["hf"]
    if fam in ("qwen3_moe", "olmoe"):
        cfg_kw.update(num_experts=m["E"], norm_topk_prob=m.get("renorm", False),
                      **({"moe_intermediate_size": m["I"]} if fam == "qwen3_moe" else {"intermediate_size": m["I"]}))
    else:
        cfg_kw.update(num_local_experts=m["E"], intermediate_size=m["I"])
    cfg = transformers.AutoConfig.for_model(fam, **cfg_kw)
    mod = __import__(f"transformers.models.{fam}.modeling_{fam}", fromlist=["x"])
    cls = {"qwen3_moe": "Qwen3MoeSparseMoeBlock", "olmoe": "OlmoeSparseMoeBlock", "mixtral": "MixtralSparseMoeBlock",
           "gpt_oss": "GptOssMLP"}[fam]
    with torch.device("meta"):
        block = getattr(mod, cls)(cfg)
    router = block.router if fam == "gpt_oss" else block.gate
    p = lambda t: nn.Parameter(t, requires_grad=False)   # noqa: E731
    router.weight = p(kw["router_weight"])
    block.experts.gate_up_proj, block.experts.down_proj = p(kw["gate_up"]), p(kw["down"])
    if fam == "gpt_oss":
        router.bias = p(kw["router_bias"])
        block.experts.gate_up_proj_bias, block.experts.down_proj_bias = p(kw["gate_up_bias"]), p(kw["down_bias"])
    return block.eval()


def run_case(name, m, M, layers, ws, args, dev, dtype, copy_gbs):
    H = m["H"]
    g = torch.Generator(device=dev).manual_seed(1000 + M)
    h = torch.randn(M, H, generator=g, device=dev).to(dtype)
    x = torch.randn(M, H, generator=g, device=dev).to(dtype)
    out = torch.empty_like(x)
    unions = []
    for kw in layers:   # each layer's selection (deterministic: the graph replays the same inputs)
        moe_decode(h, x, **kw, out=out, workspace=ws)
        unions.append(int(torch.unique(ws.ids[:M * m["k"]]).numel()))
    nbytes = sum(op_bytes(kw, u, M, H) for kw, u in zip(layers, unions)) / len(layers)
    items = min(m["E"], M * m["k"])
    kw0 = layers[0]
    tr = bool(kw0.get("transposed"))
    default = dict(route=route_config(M, m["E"], H, h.device),
                   gate_up=expert_config("gate_up", M, m["I"], H, items, dtype, h.device, tr),
                   down=expert_config("down", M, H, m["I"], items, dtype, h.device, tr))
    row = dict(model=name, batch=M, experts_selected=unions[0], union_mean=sum(unions) / len(unions),
               layers_in_chain=len(layers), bytes=int(nbytes), default_config=default)
    row["us"] = round(chain_ms(layers, h, x, out, ws, None, args.reps) * 1e3, 2)
    gbs = nbytes / (row["us"] * 1e-6) / 1e9
    row.update(gbs=round(gbs, 1), pct_copy_bw=round(100 * gbs / copy_gbs, 1) if copy_gbs else None)
    moe_decode(h, x, **kw0, out=out, workspace=ws)   # ws holds layer 0's routing for the per-kernel runs
    for kern in ("route", "gate_up", "down"):
        row[f"{kern}_us"] = round(kernel_ms(lambda: moe_decode(h, x, **kw0, out=out, workspace=ws,
                                                                kernels=(kern,))) * 1e3, 2)
    log(f"  {name} b{M}: {row['us']:.1f} us/op, {nbytes / 1e6:.1f} MB ({unions[0]} experts), {gbs:.0f} GB/s"
        f" = {row['pct_copy_bw']}% of copy | route {row['route_us']} gate_up {row['gate_up_us']} down {row['down_us']} us")
    if args.sweep:
        best = {}
        for kern in ("route", "gate_up", "down"):
            cands = [dict()] + sweep_configs(kern, M, bool(m.get("gpt")))
            res = []
            for c in cands:
                try:
                    ms = kernel_ms(lambda: moe_decode(h, x, **kw0, out=out, workspace=ws, kernels=(kern,),
                                                      config={kern: c}))
                    res.append((ms, c))
                except CaseTimeout:
                    raise
                except Exception as e:   # a config that does not compile (shared memory, registers)
                    log(f"    {kern} {c}: {type(e).__name__}: {str(e)[:80]}")
            res.sort(key=lambda r: r[0])
            best[kern] = res[0][1]
            row[f"best_{kern}"] = dict(config=res[0][1], us=round(res[0][0] * 1e3, 2))
            log(f"    best {kern}: {res[0][0] * 1e3:.2f} us {res[0][1]} (default {row[f'{kern}_us']} us)")
        row["best_us"] = round(chain_ms(layers, h, x, out, ws, best, args.reps) * 1e3, 2)
        row["best_pct_copy_bw"] = round(100 * nbytes / (row["best_us"] * 1e-6) / 1e9 / copy_gbs, 1) if copy_gbs else None
        log(f"    chain with the best configs: {row['best_us']} us ({row['best_pct_copy_bw']}% of copy)")
    if args.stock:
        try:
            block = stock_block(m, kw0, dev, dtype)
            with torch.no_grad():
                row["stock_us"] = round(timed(lambda: block(h[None]), 10) * 1e3, 2)
            log(f"    stock transformers block (grouped_mm, eager): {row['stock_us']} us")
        except CaseTimeout:
            raise
        except Exception as e:
            row["stock_error"] = f"{type(e).__name__}: {e}"[:200]
            log(f"    stock block failed: {row['stock_error']}")
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--reps", type=int, default=5, help="chain repetitions inside the graph")
    ap.add_argument("--sweep", action="store_true", help="try alternative configs per kernel")
    ap.add_argument("--stock", action="store_true", help="also time the transformers block")
    ap.add_argument("--case-timeout", type=int, default=240, help="seconds per (model, batch) case")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench_moe.py needs a CUDA GPU (or --smoke)")
    dev = torch.device("cuda" if not args.smoke else "cpu")
    dtype = torch.bfloat16
    models = SMOKE if args.smoke else {k: MODELS[k] for k in (args.models.split(",") if args.models else MODELS)}
    batches = [int(b) for b in args.batches.split(",")]
    if args.smoke:
        args.reps = 1
    copy_gbs = None
    if not args.smoke:
        import common
        copy_gbs = common.copy_bandwidth_gbs()
        log(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_gbs:.0f} GB/s")
    meta = dict(gpu=torch.cuda.get_device_name() if not args.smoke else "cpu-interpreter", torch=torch.__version__,
                triton=__import__("triton").__version__, copy_gbs=copy_gbs, dtype=str(dtype),
                date=time.strftime("%Y-%m-%d %H:%M"))
    rows = []

    def on_alarm(*_):
        raise CaseTimeout()
    signal.signal(signal.SIGALRM, on_alarm)
    for name, m in models.items():
        per_layer = m["E"] * (3 * m["H"] * m["I"] + (2 * m["I"] + m["H"] if m.get("gpt") else 0)) * 2
        n_layers = 1 if args.smoke else max(2, min(8, -(-MIN_CHAIN_BYTES // per_layer)))
        log(f"{name}: {n_layers} layers of {per_layer / 1e9:.2f} GB")
        layers = [make_layer(m, dev, dtype, seed=i) for i in range(n_layers)]
        ws = MoEWorkspace(max(batches), m["E"], m["k"], m["H"], m["I"], dtype, dev)
        for M in batches:
            signal.alarm(args.case_timeout)
            t0 = time.time()
            try:
                rows.append(run_case(name, m, M, layers, ws, args, dev, dtype, copy_gbs))
            except CaseTimeout:
                rows.append(dict(model=name, batch=M, error=f"timed out after {args.case_timeout} s"))
                log(f"  {name} b{M}: timed out")
            except Exception as e:
                rows.append(dict(model=name, batch=M, error=f"{type(e).__name__}: {e}"[:300]))
                log(f"  {name} b{M}: {type(e).__name__}: {e}")
            finally:
                signal.alarm(0)
            rows[-1]["case_s"] = round(time.time() - t0, 1)
        del layers, ws
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
