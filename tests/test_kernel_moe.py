"""The fused MoE decode op (kernels/moe.py, kernels/moe_route.py) against its torch spec and against the
stock block's arithmetic (model/moe.py moe_reference), under the interpreter on tiny odd shapes.

Router inputs are small multiples of 1/4 and 1/8, so every logit is exact in fp32 whatever the summation
order: the kernel and the references must then pick the same experts, ties included (and ties are
frequent). The expert weights are ordinary random values."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import (BF16_FLOOR, BF16_RATIO, CAST_MATCH, FP32_TOL, KERNEL_DEV, KERNELS_USABLE,  # noqa: E402
                     KERNELS_WHY, relerr)
from braid_backend.kernels.moe import MoEWorkspace, expert_config, moe_decode, moe_decode_reference  # noqa: E402
from braid_backend.kernels.moe_route import (moe_route, moe_route_reference, route_config,  # noqa: E402
                                             topk_lowest_index)
from braid_backend.model.moe import MoEPlan, moe_reference, shared_expert_reference  # noqa: E402

DEV = KERNEL_DEV
pytestmark = [pytest.mark.skipif(not KERNELS_USABLE, reason=KERNELS_WHY or "no triton"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]   # interpreter: inf - inf on padded rows

# name -> (op options, what it mirrors)
CASES = {
    "qwen3": dict(route="softmax_topk", renorm=True),                          # Qwen3-MoE
    "olmoe": dict(route="softmax_topk", renorm=False),                         # OLMoE / Qwen2-MoE routing
    "mixtral": dict(route="softmax_topk", renorm=True, round_weights=False),   # fp32 routing weights
    # + sigmoid-gated shared expert; no residual, whose rounding would hide the shared term's cast points
    "qwen2_shared": dict(route="softmax_topk", renorm=False, shared=True, no_residual=True),
    "gpt_oss": dict(route="topk_softmax", gpt=True),                           # biases, clamped SwiGLU, transposed
    "granite": dict(route="topk_softmax", res_scale=0.37),                     # residual multiplier
    "moe_only": dict(route="softmax_topk", renorm=True, no_residual=True),     # out = MoE(h), no x
}
SHAPES = [(1, 7, 3, 40, 24), (5, 9, 2, 56, 20), (3, 6, 4, 33, 17)]   # (M, E, top_k, H, I)
PATHS = {"gemv": {"path": "gemv"}, "tc": {"path": "tc"}}


def make(M, E, k, H, I, dtype, opts, seed, gen_h=None):
    g = torch.Generator().manual_seed(seed)
    gpt = opts.get("gpt", False)

    def q(*shape, den):   # exact small multiples: router logits exact in fp32 in any order
        return (torch.randint(-3, 4, shape, generator=g).float() / den).to(dtype).to(DEV)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)

    h = q(M, H, den=4) if gen_h is None else gen_h(g).to(dtype).to(DEV)
    kw = dict(top_k=k, route=opts["route"], renorm=opts.get("renorm", False),
              round_weights=opts.get("round_weights", True), router_weight=q(E, H, den=8))
    if gpt:
        kw.update(gate_up=rnd(E, H, 2 * I, scale=2 * H ** -0.5), down=rnd(E, I, H, scale=I ** -0.5),
                  router_bias=q(E, den=8), gate_up_bias=rnd(E, 2 * I, scale=0.5), down_bias=rnd(E, H, scale=0.1),
                  act="gpt_oss_swiglu", transposed=True, interleaved=True, limit=1.5, alpha=1.702)
    else:
        kw.update(gate_up=rnd(E, 2 * I, H, scale=H ** -0.5), down=rnd(E, H, I, scale=I ** -0.5))
    if opts.get("res_scale") is not None:
        kw["res_scale"] = opts["res_scale"]
    x = None if opts.get("no_residual") else rnd(M, H)
    shared = None
    if opts.get("shared"):
        si = 12
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False).to(dtype).to(DEV)   # noqa: E731
        shared = dict(shared_gate_proj=lin(H, si), shared_up_proj=lin(H, si), shared_down_proj=lin(si, H),
                      shared_expert_gate=lin(H, 1))
        with torch.no_grad():
            shared["shared_expert_gate"].weight.copy_(q(1, H, den=8))
        kw["shared_gate"] = shared["shared_expert_gate"].weight.reshape(-1)
    return h, x, kw, shared


def stock_plan(kw, shared, dtype):
    """The same weights as a MoEPlan: model/moe.py's moe_reference is the stock block's arithmetic."""
    gu = kw["gate_up"]
    E = gu.shape[0]
    H, I = (gu.shape[1], gu.shape[2] // 2) if kw.get("transposed") else (gu.shape[2], gu.shape[1] // 2)
    return MoEPlan("test", E, kw["top_k"], H, I, dtype, kw["router_weight"], kw.get("router_bias"), gu, kw["down"],
                   kw.get("gate_up_bias"), kw.get("down_bias"), kw["route"], kw["renorm"], kw["round_weights"],
                   kw.get("act", "silu_mul"), kw.get("transposed", False), kw.get("interleaved", False),
                   kw.get("limit"), kw.get("alpha"), **(shared or {}), res_scale=kw.get("res_scale"))


def f32(d):
    return {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


def poisoned_workspace(M, kw, dtype, max_rows=None):
    gu = kw["gate_up"]
    E, k = gu.shape[0], kw["top_k"]
    H, I = (gu.shape[1], gu.shape[2] // 2) if kw.get("transposed") else (gu.shape[2], gu.shape[1] // 2)
    ws = MoEWorkspace(max_rows or M, E, k, H, I, dtype, DEV)
    for t in (ws.part, ws.wts, ws.sg, ws.act, ws.y):   # everything read must be written by the same call
        t.fill_(float("nan"))
    ws.ids.fill_(-7)
    ws.elist.fill_(3)
    return ws


def run_case(M, E, k, H, I, dtype, opts, seed, config=None, inplace=False, ws=None, gen_h=None):
    h, x, kw, shared = make(M, E, k, H, I, dtype, opts, seed, gen_h)
    plan = stock_plan(kw, shared, dtype)
    shared_out = shared_expert_reference(plan, h) if shared else None
    with torch.no_grad():
        ws = ws or poisoned_workspace(M, kw, dtype)
        x0 = x.clone() if x is not None else None
        out = x if (inplace and x is not None) else torch.full((M, H), float("nan"), dtype=dtype, device=DEV)
        got = moe_decode(h, x, **kw, shared_out=shared_out, out=out, workspace=ws, config=config)
        assert got.data_ptr() == out.data_ptr() and not torch.isnan(got).any(), "every output element written"
        assert int(ws.counters.abs().sum()) == 0, "counters must be left at 0"
        ids = ws.ids[:M * k].view(M, k).long()
        wts = ws.wts[:M * k].view(M, k)
        # routing: exactly the spec's experts, in its order (descending score, ties to the lower index)
        rid, rw, _ = moe_route_reference(h, kw["router_weight"], top_k=k, route=kw["route"], renorm=kw["renorm"],
                                         round_weights=kw["round_weights"], router_bias=kw.get("router_bias"))
        assert torch.equal(ids.cpu(), rid.cpu()), f"ids {ids.tolist()} vs spec {rid.tolist()}"
        wtol = 2 ** -8 if (dtype != torch.float32 and kw["round_weights"]) else 1e-5
        assert torch.allclose(wts, rw, rtol=wtol, atol=1e-7), "routing weights"
        sel = sorted(set(ids.flatten().tolist()))
        assert ws.elist.tolist() == sel + [-1] * (E - len(sel)), "elist: selected experts ascending, then -1"
        ref = moe_decode_reference(h, x0, **kw, shared_out=shared_out)
        if dtype == torch.float32:
            err = relerr(got, ref)
            assert err <= FP32_TOL, f"fp32 relerr {err:.3e}"
        else:
            sh32 = None
            if shared:   # the true shared-expert output: fp32 weights, fp32 arithmetic
                plan32 = stock_plan(f32(kw), {n: _f32_linear(m) for n, m in shared.items()}, torch.float32)
                sh32 = shared_expert_reference(plan32, h.float())
            ref32 = moe_decode_reference(h.float(), None if x0 is None else x0.float(), **f32(kw), shared_out=sh32,
                                         ids=ids)
            mlp = moe_reference(plan, h)   # stock's own bf16 block output, then the decoder's add
            if kw.get("res_scale") is not None:
                mlp = (mlp.float() * kw["res_scale"]).to(dtype)
            stock = mlp if x0 is None else (x0.float() + mlp.float()).to(dtype)
            err, err_stock = relerr(got, ref32), relerr(stock, ref32)
            assert err <= BF16_RATIO * err_stock + BF16_FLOOR, f"relerr {err:.3e} vs stock {err_stock:.3e}"
            dev = relerr(got, ref)   # same cast points as the spec: only rare 1-ulp flips may separate them
            assert dev <= CAST_MATCH * err_stock, f"deviates from the spec's cast points: {dev:.3e} vs {err_stock:.3e}"
    return got, ids, ws


def _f32_linear(m):
    out = torch.nn.Linear(m.in_features, m.out_features, bias=False).to(DEV)
    with torch.no_grad():
        out.weight.copy_(m.weight.float())
    return out


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_moe_decode(case, dtype, path):
    i = list(CASES).index(case)
    M, E, k, H, I = SHAPES[i % len(SHAPES)]
    run_case(M, E, k, H, I, dtype, CASES[case], seed=100 * i + 1, config=PATHS[path], inplace=(i % 2 == 1))


def test_heuristic_config_and_inplace():
    """No config: the launcher's own choices, residual updated in place, a batch with shared experts."""
    _, ids, _ = run_case(6, 5, 2, 48, 40, torch.bfloat16, CASES["qwen3"], seed=7, inplace=True)
    assert ids.unique().numel() < ids.numel(), "rows should share experts"


def test_all_rows_pick_the_same_expert():
    """A router bias makes expert 4 every row's first choice: one expert program serves all rows."""
    def rig(M, E, k, H, I, dtype, opts, seed, config):
        h, x, kw, _ = make(M, E, k, H, I, dtype, opts, seed)
        kw["router_bias"] = torch.zeros(E, dtype=dtype, device=DEV)
        kw["router_bias"][4] = 50.0
        return h, x, kw
    for route, path in (("topk_softmax", "gemv"), ("softmax_topk", "tc")):
        h, x, kw = rig(6, 7, 3, 40, 24, torch.float32, dict(route=route, renorm=True), 3, None)
        ws = poisoned_workspace(6, kw, torch.float32)
        got = moe_decode(h, x, **kw, workspace=ws, config={"path": path})
        assert (ws.ids.view(6, 3)[:, 0] == 4).all()
        assert relerr(got, moe_decode_reference(h, x, **kw)) <= FP32_TOL


def test_shared_expert_cast_points_exact():
    """Routed experts' down weights zeroed: out = rnd(x + rnd(sg * shared)) must equal the spec bit for bit
    (an unrounded product, or the gate computed without stock's roundings, shows up here)."""
    M, E, k, H, I = 4, 5, 2, 40, 16
    h, x, kw, shared = make(M, E, k, H, I, torch.bfloat16, CASES["qwen2_shared"], seed=21)
    x = torch.randn(M, H, generator=torch.Generator().manual_seed(22)).to(torch.bfloat16).to(DEV)
    kw["down"].zero_()
    sh = (torch.randn(M, H, generator=torch.Generator().manual_seed(23)) * 3).to(torch.bfloat16).to(DEV)
    got = moe_decode(h, x, **kw, shared_out=sh, config={"path": "gemv"})
    want = moe_decode_reference(h, x, **kw, shared_out=sh)
    assert torch.equal(got, want)
    _, _, sg = moe_route_reference(h, kw["router_weight"], top_k=k, route=kw["route"], renorm=False,
                                   round_weights=True, shared_gate=kw["shared_gate"])
    unrounded = (x.float() + sg[:, None] * sh.float()).to(torch.bfloat16)
    assert not torch.equal(unrounded, want), "the inputs must make the product's rounding visible"


@pytest.mark.parametrize("route", ["softmax_topk", "topk_softmax"])
def test_router_ties(route):
    """Exact ties, at the top-k boundary and everywhere: the lower index wins, as CUDA's torch.topk picks;
    the values always equal torch.topk's (CPU torch.topk orders ties arbitrarily, so its indices are
    only compared where the row has no tie)."""
    M, E, H, k = 6, 13, 16, 4
    g = torch.Generator().manual_seed(5)
    w = torch.randint(-2, 3, (E, H), generator=g).float() / 8
    w[7], w[9], w[2] = w[3], w[3], w[11]          # duplicated rows: equal logits for every input
    w[12] = 0
    h = torch.randint(-2, 3, (M, H), generator=g).float() / 4
    h[0] = 0                                      # all logits 0: experts 0..k-1
    ws = MoEWorkspace(M, E, k, H, 8, torch.float32, DEV)
    moe_route(h.to(DEV), w.to(DEV), ws, top_k=k, route=route, renorm=True, round_weights=False)
    ids = ws.ids.view(M, k).cpu().long()
    logits = h @ w.t()
    score = torch.softmax(logits, -1) if route == "softmax_topk" else logits
    want_v, want_i = topk_lowest_index(score, k)
    assert torch.equal(ids, want_i)
    assert ids[0].tolist() == list(range(k))
    tv, ti = torch.topk(score, k)
    assert torch.equal(score.gather(1, ids), tv), "the same values as torch.topk"
    tied = torch.tensor([len(set(r.tolist())) < E for r in score])
    assert tied.sum() >= 3, "the test must contain ties"
    untied = [m for m in range(M) if len(set(score[m].tolist())) == E]
    for m in untied:
        assert ti[m].tolist() == ids[m].tolist()


def test_random_router_clear_margins():
    """Ordinary random bf16 inputs (logits rounded): ids equal the spec wherever the k-th and (k+1)-th
    scores are apart (a different summation order may move a logit by one bf16 ulp)."""
    M, E, k, H, I = 8, 11, 3, 64, 16
    g = torch.Generator().manual_seed(9)
    h = torch.randn(M, H, generator=g).to(torch.bfloat16)
    w = (torch.randn(E, H, generator=g) * 0.3).to(torch.bfloat16)
    ws = MoEWorkspace(M, E, k, H, I, torch.bfloat16, DEV)
    moe_route(h.to(DEV), w.to(DEV), ws, top_k=k, route="softmax_topk", renorm=True, round_weights=True)
    rid, _, _ = moe_route_reference(h, w, top_k=k, route="softmax_topk", renorm=True, round_weights=True)
    logits = (h.float() @ w.float().t()).sort(-1, descending=True).values
    clear = (logits[:, k - 1] - logits[:, k]) > 0.05 * logits[:, 0].abs()
    assert clear.sum() >= M // 2
    assert torch.equal(ws.ids.view(M, k).cpu().long()[clear], rid[clear])


def test_row_blocks_and_splits():
    """Several row blocks per expert (M above BLOCK_M), the router's H split, the down kernel's K split
    with a short last split, and a workspace larger than the batch reused by a second, smaller call."""
    cfg = {"path": "tc", "route": {"SPLIT": 3, "BLOCK_K": 16}, "gate_up": {"BLOCK_M": 16, "BLOCK_K": 16},
           "down": {"BLOCK_M": 16, "SPLIT": 3, "BLOCK_K": 16, "BLOCK_N": 16}}
    run_case(18, 6, 2, 40, 44, torch.bfloat16, CASES["gpt_oss"], seed=4, config=cfg)
    cfg2 = {"path": "gemv", "gate_up": {"BLOCK_M": 2, "BLOCK_N": 32}, "down": {"BLOCK_M": 2, "SPLIT": 2, "BLOCK_N": 64}}
    _, _, kw, _ = make(5, 6, 2, 40, 44, torch.bfloat16, CASES["gpt_oss"], seed=4)
    ws = poisoned_workspace(5, kw, torch.bfloat16, max_rows=18)
    run_case(5, 6, 2, 40, 44, torch.bfloat16, CASES["gpt_oss"], seed=5, config=cfg2, ws=ws)
    run_case(2, 6, 2, 40, 44, torch.bfloat16, CASES["qwen3"], seed=6, config=cfg2, ws=MoEWorkspace(
        18, 6, 2, 40, 44, torch.bfloat16, DEV))


def test_fp16_strided():
    """fp16, and h / x / out as row-strided views of wider buffers."""
    M, E, k, H, I = 3, 5, 2, 24, 12
    h, x, kw, _ = make(M, E, k, H, I, torch.float16, CASES["qwen3"], seed=8)
    hb = torch.zeros(M, H + 5, dtype=torch.float16, device=DEV)
    hb[:, :H] = h
    xb = torch.zeros(M, H + 3, dtype=torch.float16, device=DEV)
    xb[:, :H] = x
    ob = torch.full((M, H + 7), float("nan"), dtype=torch.float16, device=DEV)
    got = moe_decode(hb[:, :H], xb[:, :H], **kw, out=ob[:, :H])
    assert torch.isnan(ob[:, H:]).all(), "wrote past the out rows"
    ref = moe_decode_reference(h, x, **kw)
    ref32 = moe_decode_reference(h.float(), x.float(), **f32(kw))
    assert relerr(got, ref32) <= 2 * relerr(ref, ref32) + BF16_FLOOR


def test_rejects_bad_calls():
    h, x, kw, _ = make(3, 5, 2, 24, 12, torch.float32, CASES["qwen3"], seed=1)
    with pytest.raises(ValueError, match="workspace"):
        moe_decode(h, x, **kw, workspace=MoEWorkspace(2, 5, 2, 24, 12, torch.float32, DEV))
    with pytest.raises(ValueError, match="top_k"):
        moe_decode(h, x, **dict(kw, top_k=6))
    with pytest.raises(ValueError, match="shape"):
        moe_decode(h, x, **dict(kw, down=kw["down"].transpose(1, 2)))
    with pytest.raises(ValueError, match="go together"):
        moe_decode(h, x, **kw, shared_gate=torch.zeros(24, device=DEV))


def test_heuristics_real_shapes(monkeypatch):
    """The GPU launch choices for the benchmark's shapes on 132 SMs: batch 1-2 on the GEMV path with
    enough programs to fill the card, tensor-core tiles above, K split where the down programs are few."""
    import braid_backend.kernels.moe as moe
    import braid_backend.kernels.moe_route as mr

    monkeypatch.setattr(moe, "num_sms", lambda d: 132)
    monkeypatch.setattr(mr, "num_sms", lambda d: 132)
    expert_config.cache_clear()
    dev = torch.device("cuda", 0)
    bf = torch.bfloat16
    for name, E, k, H, I, tr in [("qwen3", 128, 8, 2048, 768, False), ("gpt-oss", 32, 4, 2880, 2880, True),
                                 ("mixtral", 8, 2, 4096, 14336, False), ("olmoe", 64, 8, 2048, 1024, False)]:
        for M in (1, 4, 16):
            items = min(E, M * k)
            gu = expert_config("gate_up", M, I, H, items, bf, dev, tr)
            dn = expert_config("down", M, H, I, items, bf, dev, tr)
            assert gu["path"] == dn["path"] == ("gemv" if M <= 2 else "tc"), name
            progs_gu = -(-I // gu["BLOCK_N"]) * items
            progs_dn = -(-H // dn["BLOCK_N"]) * items * dn["SPLIT"]
            assert progs_gu >= 132 and progs_dn >= 132, (name, M, progs_gu, progs_dn)
            assert gu["BLOCK_K"] <= H and dn["BLOCK_K"] <= max(I, 16)
            rc = route_config(M, E, H, dev)
            # the router's bytes spread over programs: each reads at most 16 KB of it
            assert rc["BLOCK_E"] * -(-H // rc["SPLIT"]) * 2 <= 16384, (name, M, rc)
    # few down programs (256 < 2 x 132): K split in two
    assert expert_config("down", 1, 1024, 4096, 2, bf, dev, False)["SPLIT"] == 2
    assert expert_config("gate_up", 1, 768, 2048, 8, bf, dev, False)["BLOCK_N"] == 2   # the H200 sweep
    expert_config.cache_clear()


# ------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
def test_gpu_ties_match_cuda_topk():
    """On the GPU: the kernel's expert set equals CUDA torch.topk's on the same tied scores."""
    M, E, H, k = 16, 64, 128, 8
    g = torch.Generator().manual_seed(2)
    w = (torch.randint(-1, 2, (E, H), generator=g).float() / 8).cuda()
    h = (torch.randint(-1, 2, (M, H), generator=g).float() / 4).cuda()
    for dt in (torch.float32, torch.bfloat16):
        ws = MoEWorkspace(M, E, k, H, 16, dt, "cuda")
        moe_route(h.to(dt), w.to(dt), ws, top_k=k, route="softmax_topk", renorm=True, round_weights=True)
        score = torch.softmax((h.to(dt) @ w.to(dt).t()).float(), -1)
        _, ti = torch.topk(score, k)
        assert torch.equal(ws.ids.view(M, k).long().sort(1).values, ti.sort(1).values)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 16])
def test_gpu_real_shape_and_graph(M):
    """Qwen3-30B-A3B's layer shape (E 128, top 8, H 2048, I 768) in bf16 against the spec, eager and
    replayed from a CUDA graph (no sync, no allocation inside)."""
    E, k, H, I = 128, 8, 2048, 768
    h, x, kw, _ = make(M, E, k, H, I, torch.bfloat16, CASES["qwen3"], seed=M,
                       gen_h=lambda g: torch.randn(M, H, generator=g))
    ws = MoEWorkspace(M, E, k, H, I, torch.bfloat16, "cuda")
    out = torch.empty_like(x)
    moe_decode(h, x, **kw, out=out, workspace=ws)
    ids = ws.ids.view(M, k).clone()
    ref = moe_decode_reference(h, x, **kw, ids=ids)
    ref32 = moe_decode_reference(h.float(), x.float(), **f32(kw), ids=ids)
    assert relerr(out, ref32) <= 2 * relerr(ref, ref32) + BF16_FLOOR
    graph, out2 = torch.cuda.CUDAGraph(), torch.empty_like(x)
    moe_decode(h, x, **kw, out=out2, workspace=ws)   # warm (compiles) outside the capture
    with torch.cuda.graph(graph):
        moe_decode(h, x, **kw, out=out2, workspace=ws)
    out2.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out2, out)
