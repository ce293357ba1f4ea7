"""GPU checks of the CuPy layer kernel (kernels/cupy_layer.cu) and the CuPy backend. Skipped without
CUDA or CuPy. Run on the GPU machine:

    BRAID_GPU_TESTS=1 python -m pytest -q -rA -s -m gpu tests/test_gpu_cupy.py

Errors are printed for every case (-s), failures list the worst ones. The rule everywhere: bf16 error
against an fp32 reference at most 2x the bf16 torch reference's own error (+ a small floor)."""
import math

import pytest
import torch

import braid_backend
from braid_backend.kernels._common import interpret_mode
from braid_backend.kernels.cupy_layer import LayerKernel, LayerSpec, cupy_available, layer_reference
from braid_backend.kernels.decode_attention import decode_attention
from braid_backend.kernels.fused_gemv import fused_gemv
from braid_backend.kernels.rope_cache import rope_qkv_cache_write
from braid_backend.testing.numerics import fp32_reference_logits, random_tokens, rel_err, teacher_forced_logits
from braid_backend.testing.presets import build_model

HAVE_GPU = torch.cuda.is_available() and not interpret_mode()
OK, WHY = cupy_available(torch.device("cuda")) if HAVE_GPU else (False, "no CUDA")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not OK, reason=f"CuPy backend unavailable: {WHY}")]

RATIO, FLOOR = 2.0, 1e-4
EPS = 1e-6
# (name, hidden, intermediate, heads, kv heads, head_dim, qkv bias)
CONFIGS = [("qwen2-like", 896, 4864, 14, 2, 64, True), ("llama-like", 2048, 5632, 16, 4, 128, False)]
ROWS = [(1, 1), (2, 2), (4, 3), (8, 8)]    # (bucket M, active rows B): (4, 3) has a padding row
CONTEXTS = (1, 300, 4000)


def _rope_tables(S, hd, dtype, theta=1e6):
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, device="cuda", dtype=torch.float32) / hd)
    f = torch.outer(torch.arange(S, device="cuda", dtype=torch.float32), inv)
    e = torch.cat([f, f], -1)
    return e.cos().to(dtype).contiguous(), e.sin().to(dtype).contiguous()


def _case(cfg, M, B, ctx, seed):
    """fp32 master copies of one layer's weights, inputs and cache (cast per run)."""
    _, H, I, NH, NKV, HD, bias = cfg
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rn(*shape, s=1.0):
        return torch.randn(*shape, generator=g, device="cuda") * s

    nq = (NH + 2 * NKV) * HD
    w = dict(w_qkv=rn(nq, H, s=H ** -0.5), b_qkv=rn(nq, s=0.5) if bias else None, nw_attn=1 + rn(H, s=0.2),
             w_o=rn(H, NH * HD, s=(NH * HD) ** -0.5), b_o=None, w_gu=rn(2 * I, H, s=H ** -0.5), b_gu=None,
             nw_mlp=1 + rn(H, s=0.2), w_down=rn(H, I, s=I ** -0.5), b_down=None)
    S = -(-(ctx + 8) // 64) * 64
    slot = ctx - 1
    pad = [min(5, ctx - 1) if m == 0 else 0 for m in range(M)]     # row 0 left-padded
    valid = torch.zeros(M, S, dtype=torch.int8, device="cuda")
    for m in range(B):
        valid[m, pad[m]:ctx] = 1
    k, v = rn(M, NKV, S, HD), rn(M, NKV, S, HD)
    if pad[0]:
        k[0, :, 0] = v[0, :, 0] = float("nan")                     # masked slots may hold anything
    ins = dict(pos=torch.tensor([slot - pad[m] if m < B else 0 for m in range(M)], device="cuda"),
               slots=torch.full((M,), slot, device="cuda"), kv_lens=torch.full((M,), ctx, dtype=torch.int32,
                                                                                 device="cuda"), valid=valid)
    return dict(w=w, x=rn(M, H), k=k, v=v, ins=ins, S=S, slot=slot, scale=HD ** -0.5, cfg=cfg)


def _cast(c, dtype):
    # copies always: .to(float32) of an fp32 master is the master itself, and every path below writes x
    # and the caches in place (a shared master made the fp32 reference its own input: update 0)
    w = {n: (t.to(dtype, copy=True).contiguous() if t is not None else None) for n, t in c["w"].items()}
    cos, sin = _rope_tables(c["S"], c["cfg"][5], dtype)
    return (w, c["x"].to(dtype, copy=True).contiguous(), c["k"].to(dtype, copy=True).contiguous(),
            c["v"].to(dtype, copy=True).contiguous(), cos, sin)


def _ref(c, dtype):
    w, x, k, v, cos, sin = _cast(c, dtype)
    _, H, I, NH, NKV, HD, _ = c["cfg"]
    layer_reference(x, **w, eps_attn=EPS, eps_mlp=EPS, scale=c["scale"], cos=cos, sin=sin, **c["ins"],
                    k_cache=k, v_cache=v, n_heads=NH, n_kv_heads=NKV, head_dim=HD)
    return x, k, v


def _triton(c, dtype):
    w, x, k, v, cos, sin = _cast(c, dtype)
    _, H, I, NH, NKV, HD, _ = c["cfg"]
    M, i = x.shape[0], c["ins"]
    qkv = fused_gemv(x, w["w_qkv"], bias=w["b_qkv"], norm_weight=w["nw_attn"], eps=EPS)
    q = torch.empty(M, NH, HD, dtype=dtype, device="cuda")
    rope_qkv_cache_write(qkv, cos, sin, i["pos"], i["slots"], k, v, q, n_heads=NH, n_kv_heads=NKV, head_dim=HD)
    attn = decode_attention(q, k, v, i["kv_lens"], i["valid"], scale=c["scale"])
    fused_gemv(attn, w["w_o"], residual=x, out=x)
    act = fused_gemv(x, w["w_gu"], norm_weight=w["nw_mlp"], eps=EPS, act="silu_mul")
    fused_gemv(act, w["w_down"], residual=x, out=x)
    return x, k, v


_KERNELS = {}


def _cupy(c, dtype, reps=1):
    w, x, k, v, cos, sin = _cast(c, dtype)
    _, H, I, NH, NKV, HD, bias = c["cfg"]
    M = x.shape[0]
    spec = LayerSpec(dtype, H, I, NH, NKV, HD, bias, False, False, False)
    key = (spec, M)
    if key not in _KERNELS:
        _KERNELS[key] = LayerKernel(spec, M, torch.device("cuda"))
    kern = _KERNELS[key]
    ws = kern.workspace(c["S"])
    for t in (ws.ml, ws.acc):
        t.fill_(float("nan"))
    q = torch.full((M, NH, HD), float("nan"), dtype=dtype, device="cuda")
    attn = torch.full((M, NH * HD), float("nan"), dtype=dtype, device="cuda")
    act = torch.full((M, I), float("nan"), dtype=dtype, device="cuda")
    x0, k0, v0 = x.clone(), k.clone(), v.clone()
    outs = []
    for _ in range(reps):   # repeated launches from the same inputs: counters must reset themselves
        x.copy_(x0), k.copy_(k0), v.copy_(v0)
        kern.launch(ws, x, **w, eps_attn=EPS, eps_mlp=EPS, next_w_qkv=None, scale=c["scale"], cos=cos, sin=sin,
                    **c["ins"], k_cache=k, v_cache=v, q_buf=q, attn=attn, act=act)
        kern.check(ws)
        outs.append(x.clone())
    return x, k, v, outs, ws


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("M,B", ROWS, ids=[f"M{m}B{b}" for m, b in ROWS])
def test_cupy_layer_vs_reference_and_triton(cfg, M, B):
    failures = []
    for ctx in CONTEXTS:
        c = _case(cfg, M, B, ctx, seed=ctx + 10 * M)
        x32, k32, v32 = _ref(c, torch.float32)
        xr, kr, _ = _ref(c, torch.bfloat16)
        xt, kt, _ = _triton(c, torch.bfloat16)
        xk, kk, vk, outs, ws = _cupy(c, torch.bfloat16, reps=2)
        x_in = c["x"].to(torch.bfloat16).float()
        d32 = x32 - c["x"]
        # judge the layer's update (x_out - x_in), not x itself (the residual would hide errors)
        e_ref, e_tri, e_cu = (rel_err(x.float() - x_in, d32) for x in (xr, xt, xk))
        s = c["slot"]
        ek_ref, ek_cu = rel_err(kr[:, :, s].float(), k32[:, :, s]), rel_err(kk[:, :, s].float(), k32[:, :, s])
        ev = rel_err(vk[:, :, s].float(), v32[:, :, s])
        print(f"{cfg[0]} M={M} B={B} ctx={ctx} splits={ws.num_splits}: update err ref {e_ref:.3g} triton "
              f"{e_tri:.3g} cupy {e_cu:.3g} | k-slot ref {ek_ref:.3g} cupy {ek_cu:.3g} | v-slot {ev:.3g} | "
              f"max|cupy-triton| {(xk.float() - xt.float()).abs().max().item():.3g}")
        if not (math.isfinite(e_cu) and e_cu <= RATIO * e_ref + FLOOR):
            failures.append(("update", ctx, e_cu, e_ref))
        if not ek_cu <= RATIO * ek_ref + FLOOR:
            failures.append(("k slot", ctx, ek_cu, ek_ref))
        if not ev <= 1e-2:
            failures.append(("v slot", ctx, ev))
        if not torch.equal(outs[0], outs[1]):
            failures.append(("second launch differs", ctx, (outs[0].float() - outs[1].float()).abs().max().item()))
        if ws.bar.abs().sum().item() != 0:
            failures.append(("counters not reset", ctx, ws.bar.tolist()))
        if B < M and not torch.isfinite(xk).all():
            failures.append(("padding row not finite", ctx))
        # the combine must have written every head of every row: no NaN from the poisoned buffers
        if not torch.isfinite(xk).all():
            failures.append(("non-finite output", ctx))
    assert not failures, failures


def _tf(model, ctx, seed):
    V = model.config.vocab_size
    prompt = random_tokens(V, 1, ctx, 100 + ctx + seed, "cuda")
    cont = random_tokens(V, 1, 8, 200 + ctx + seed, "cuda")
    return prompt, cont


@pytest.mark.parametrize("preset", ["qwen2.5-0.5b", "llama-3.2-1b"])
def test_patch_backend_cupy_logits_within_2x_of_stock(preset):
    model = build_model(preset, dtype=torch.bfloat16, device="cuda", seed=0)
    cases = []
    for ctx in CONTEXTS:
        prompt, cont = _tf(model, ctx, 0)
        ref = fp32_reference_logits(model, prompt, cont)
        cases.append((ctx, prompt, cont, ref, rel_err(teacher_forced_logits(model, prompt, cont), ref)))
    failures = []
    for graphs in (False, True):
        rep = braid_backend.patch(model, backend="cupy", graphs=graphs, strict=True)
        assert rep.backend == "cupy", str(rep)
        for ctx, prompt, cont, ref, stock in cases:
            err = rel_err(teacher_forced_logits(model, prompt, cont), ref)
            print(f"{preset} graphs={graphs} ctx={ctx}: cupy err {err:.4g} stock {stock:.4g} ratio {err / stock:.3f}")
            if not err <= 2 * stock:
                failures.append((ctx, graphs, err, stock))
        step = model._braid_session.step   # internals: the CuPy step's own failure record
        print(str(rep))
        assert step.failed is None, (step.failed, rep.events)
        assert rep.backends.get(1) == "cupy", (rep.backends, rep.events)
        braid_backend.unpatch(model)
    assert not failures, failures


def test_cupy_generate_greedy_matches_triton_backend_and_buckets():
    """Greedy 48 tokens, batch 3 (bucket 4, left padding): the CuPy backend's fast-loop graphs vs the Triton
    backend's; a bucket above 8 uses Triton under backend='cupy' and says so."""
    model = build_model("qwen2.5-0.5b", dtype=torch.bfloat16, device="cuda", seed=1)
    ids = random_tokens(model.config.vocab_size, 3, 40, 7, "cuda")
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=48, min_new_tokens=48, pad_token_id=0)
    braid_backend.patch(model, backend="triton")
    want = model.generate(ids, **kw)
    braid_backend.unpatch(model)
    rep = braid_backend.patch(model, backend="cupy")
    got = model.generate(ids, **kw)
    assert braid_backend.status(model).last_path == "fast"
    assert rep.backends.get(4) == "cupy", (rep.backends, rep.events)
    agree = (got[:, 40:] == want[:, 40:]).float().mean().item()
    first_diff = [(r, int((got[r, 40:] != want[r, 40:]).nonzero()[0])) for r in range(3)
                  if not torch.equal(got[r], want[r])]
    print(f"greedy agreement cupy vs triton: {agree:.3f}, first differing step per row: {first_diff}")
    # random-weight greedy tokens flip on near-ties between two correct bf16 paths (DESIGN.md: never judge
    # by tokens), so this is printed, not asserted; the logits tests above are the correctness check
    assert got.shape == want.shape and torch.isfinite(got.float()).all()
    ids16 = random_tokens(model.config.vocab_size, 12, 20, 8, "cuda")
    model.generate(ids16, do_sample=False, max_new_tokens=4, pad_token_id=0)
    assert rep.backends.get(16) == "triton" and any("batch bucket 16" in e for e in rep.events), rep.events
    braid_backend.unpatch(model)


def test_cupy_step_graph_replay_equals_eager():
    from braid_backend.model.cupy_step import CupyDecodeStep
    from braid_backend.model.spec import plan_model
    from braid_backend.runtime.cache import BraidCache
    from braid_backend.runtime.interface import fill_inputs

    model = build_model("qwen2.5-0.5b", dtype=torch.bfloat16, device="cuda", seed=2)
    step = CupyDecodeStep(plan_model(model), "cupy")
    M, S = 2, 512
    cache = BraidCache(step.num_layers, M, step.n_kv_heads, S, step.head_dim, step.dtype, "cuda")
    g = torch.Generator(device="cuda").manual_seed(3)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g, device="cuda").to(t.dtype))
    cache.valid[:, :300] = 1
    cache.valid[1, :7] = 0
    step.prepare(S)
    b = step.new_buffers(M, S)
    fill_inputs(b, cache, torch.tensor([11, 12], device="cuda"), None, 299)
    step.run(cache, b)                    # first use: compile, check, time
    assert step.choice.get(M) == "cupy", (step.failed, step.choice)
    k_saved = [t[:, :, 299].clone() for t in cache.k]
    eager = step.run(cache, b).clone()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step.run(cache, b)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        out = step.run(cache, b)
    b.x.fill_(float("nan"))
    b.logits.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    print(f"graph vs eager max diff {(out.float() - eager.float()).abs().max().item():.3g}")
    assert torch.equal(out, eager)
    assert all(torch.equal(t[:, :, 299], s) for t, s in zip(cache.k, k_saved))
    for _ in range(20):                   # replays keep working (counters reset inside the kernel)
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    step.release()


def test_auto_picks_a_backend_and_reports_it():
    model = build_model("qwen2.5-0.5b", dtype=torch.bfloat16, device="cuda", seed=4)
    rep = braid_backend.patch(model, backend="auto")
    assert rep.backend == "auto", str(rep)
    ids = random_tokens(model.config.vocab_size, 1, 30, 9, "cuda")
    model.generate(ids, do_sample=False, max_new_tokens=16, pad_token_id=0)
    ev = [e for e in rep.events if e.startswith("backend auto: bucket 1 ->")]
    print(str(rep))
    assert rep.backends.get(1) in ("cupy", "triton") and ev, (rep.backends, rep.events)
    assert "bucket 1:" in str(rep)
    braid_backend.unpatch(model)
