"""MoE decode routing on the device: router GEMV (+ bias) -> top-k -> the family's weights -> the list of
experts any row selected. One kernel; the expert ids never leave the GPU (kernels/moe.py runs the experts).

Spec (`moe_route_reference`), rnd = round to h.dtype (identity for fp32):
  logits = rnd(h @ Wr^T + b)                                   (one rounding, like F.linear)
  ROUTE "softmax_topk" (Qwen2/3-MoE, OLMoE, Mixtral): p = softmax_fp32(logits) over all E; ids = topk(p);
        w = p[ids], / sum(p[ids]) when renorm
  ROUTE "topk_softmax" (gpt-oss, GraniteMoE): ids = topk(logits); w = softmax_fp32(logits[ids])
  w = rnd(w) when round_weights (all but Mixtral, whose weights stay fp32)
  top-k order: descending score, equal scores by lower expert index (CUDA torch.topk's choice of the
  set at the boundary); ties are exact: scores are compared as computed, never with a tolerance.
  shared gate (Qwen2-MoE): sg = rnd(sigmoid(rnd(h @ wg))), computed as an extra router row.
  elist[0:n] = the experts any row selected, ascending; elist[n:E] = -1.

Kernel: programs (expert block, H split, row block) store fp32 partial logits; the last to arrive (an
atomic counter, left at 0) sums them in split order and does the rest for all rows.
"""
from __future__ import annotations

import torch

from ._common import BF16_RNE_FIX, launch, next_pow2, num_sms, pdl_launch_kwargs, tl, triton

if triton is not None:
    from ._common import arrive_last, pdl_wait, round_to

ROUTES = {"softmax_topk": 0, "topk_softmax": 1}
MAX_ROUTE_SPLIT = 8   # H splits of the router GEMV (the workspace holds this many partial-logit slabs)


if triton is not None:

    @triton.jit
    def _route_finish(part_ptr, b_ptr, ids_ptr, wts_ptr, sg_ptr, elist_ptr, M, E, EE,
                      ROUTE: tl.constexpr, RENORM: tl.constexpr, ROUND_W: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_SG: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
                      E_PAD: tl.constexpr, SPLIT: tl.constexpr, FBM: tl.constexpr, DT: tl.constexpr,
                      BF16_FIX: tl.constexpr):
        e = tl.arange(0, E_PAD)
        ev = e < E
        kk = tl.arange(0, KP)
        kv = kk < TOPK
        present = tl.zeros((E_PAD,), tl.int32)
        for m0 in range(0, M, FBM):
            m = m0 + tl.arange(0, FBM)
            mv = m < M
            lg = tl.zeros((FBM, E_PAD), tl.float32)
            for s in range(SPLIT):   # split order: deterministic sums
                lg += tl.load(part_ptr + (s * M + m)[:, None] * EE + e[None, :],
                              mask=mv[:, None] & ev[None, :], other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                lg += tl.load(b_ptr + e, mask=ev, other=0.0).to(tl.float32)[None, :]
            lg = round_to(lg, DT, BF16_FIX)
            if HAS_SG:
                sgl = tl.zeros((FBM,), tl.float32)
                for s in range(SPLIT):
                    sgl += tl.load(part_ptr + (s * M + m) * EE + E, mask=mv, other=0.0, cache_modifier=".cg")
                sgl = round_to(sgl, DT, BF16_FIX)
                tl.store(sg_ptr + m, round_to(1.0 / (1.0 + tl.exp(-sgl)), DT, BF16_FIX), mask=mv)
            avail = mv[:, None] & ev[None, :]
            if ROUTE == 0:
                mx = tl.max(tl.where(avail, lg, float("-inf")), axis=1)
                ex = tl.where(avail, tl.exp(lg - mx[:, None]), 0.0)
                score = ex / tl.sum(ex, axis=1)[:, None]
            else:
                score = lg
            vals = tl.zeros((FBM, KP), tl.float32)
            idxs = tl.zeros((FBM, KP), tl.int32)
            for s in tl.static_range(TOPK):   # k argmax passes; equal scores: the lowest index
                sc = tl.where(avail, score, float("-inf"))
                best = tl.max(sc, axis=1)
                idx = tl.min(tl.where(avail & (sc == best[:, None]), e[None, :], E_PAD), axis=1)
                idx = tl.minimum(idx, E - 1)   # NaN rows: stay in bounds (their output is NaN anyway)
                vals = tl.where(kk[None, :] == s, best[:, None], vals)
                idxs = tl.where(kk[None, :] == s, idx[:, None], idxs)
                avail = avail & (e[None, :] != idx[:, None])
            taken = mv[:, None] & ev[None, :] & (avail == 0)
            present = tl.maximum(present, tl.max(taken.to(tl.int32), axis=0))
            if ROUTE == 0:
                w = vals
                if RENORM:
                    w = w / tl.sum(tl.where(kv[None, :], w, 0.0), axis=1)[:, None]
            else:
                mk = tl.max(tl.where(kv[None, :], vals, float("-inf")), axis=1)
                ex = tl.where(kv[None, :], tl.exp(vals - mk[:, None]), 0.0)
                w = ex / tl.sum(ex, axis=1)[:, None]
            if ROUND_W:
                w = round_to(w, DT, BF16_FIX)
            o = m[:, None] * TOPK + kk[None, :]
            om = mv[:, None] & kv[None, :]
            tl.store(ids_ptr + o, idxs, mask=om)
            tl.store(wts_ptr + o, w, mask=om)
        # compaction: selected experts ascending first, then the others' slots get -1 (a permutation of
        # 0..E-1, so every entry is written)
        pres = (present > 0) & ev
        c = tl.cumsum(pres.to(tl.int32), axis=0)
        n_items = tl.sum(pres.to(tl.int32), axis=0)
        pos = tl.where(pres, c - 1, n_items + e - c)
        tl.store(elist_ptr + pos, tl.where(pres, e, -1), mask=ev)

    @triton.jit
    def _router_tile(w_rows, sgw_ptr, offs_e, E, k0, k_hi, me, HAS_SG: tl.constexpr, BLOCK_K: tl.constexpr):
        """Router rows (and the shared-expert gate as row E) over K [k0, k0 + BLOCK_K), fp32."""
        k = (k0 + tl.arange(0, BLOCK_K))[None, None, :]
        mk = k < k_hi
        w = tl.load(w_rows + k, mask=me & mk, other=0.0).to(tl.float32)
        if HAS_SG:
            w += tl.load(sgw_ptr + k + 0 * offs_e[None, :, None], mask=(offs_e == E)[None, :, None] & mk,
                         other=0.0).to(tl.float32)
        return w

    @triton.jit
    def _route_kernel(h_ptr, w_ptr, b_ptr, sgw_ptr, part_ptr, cnt_ptr, ids_ptr, wts_ptr, sg_ptr, elist_ptr,
                      M, E, H, stride_hm, stride_we, n_prog,
                      ROUTE: tl.constexpr, RENORM: tl.constexpr, ROUND_W: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_SG: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
                      E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT: tl.constexpr, FBM: tl.constexpr, BF16_FIX: tl.constexpr, USE_PDL: tl.constexpr):
        pid_e = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_m = tl.program_id(2)
        DT = h_ptr.dtype.element_ty
        EE = E   # logit columns: the experts, then the shared-expert gate
        if HAS_SG:
            EE = E + 1
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        k_chunk = tl.cdiv(tl.cdiv(H, SPLIT), BLOCK_K) * BLOCK_K
        k_lo = pid_s * k_chunk
        k_hi = tl.minimum(k_lo + k_chunk, H)
        me = (offs_e < E)[None, :, None]
        w_rows = w_ptr + offs_e.to(tl.int64)[None, :, None] * stride_we
        h_rows = h_ptr + offs_m.to(tl.int64)[:, None, None] * stride_hm
        mm = (offs_m < M)[:, None, None]
        acc = tl.zeros((BLOCK_M, BLOCK_E, BLOCK_K), tl.float32)
        # PDL: the first router tile does not depend on earlier kernels: in flight before the wait, h after
        w = _router_tile(w_rows, sgw_ptr, offs_e, E, k_lo, k_hi, me, HAS_SG, BLOCK_K)
        pdl_wait(USE_PDL)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = (k0 + tl.arange(0, BLOCK_K))[None, None, :]
            if k0 > k_lo:
                w = _router_tile(w_rows, sgw_ptr, offs_e, E, k0, k_hi, me, HAS_SG, BLOCK_K)
            acc += tl.load(h_rows + k, mask=mm & (k < k_hi), other=0.0).to(tl.float32) * w
        part = tl.sum(acc, axis=2)
        tl.store(part_ptr + (pid_s * M + offs_m)[:, None] * EE + offs_e[None, :], part,
                 mask=(offs_m < M)[:, None] & (offs_e < EE)[None, :])
        if arrive_last(cnt_ptr, n_prog):
            _route_finish(part_ptr, b_ptr, ids_ptr, wts_ptr, sg_ptr, elist_ptr, M, E, EE, ROUTE, RENORM,
                          ROUND_W, HAS_BIAS, HAS_SG, TOPK, KP, E_PAD, SPLIT, FBM, DT, BF16_FIX)
            tl.atomic_xchg(cnt_ptr, 0)   # the next launch counts from 0 again


def route_config(M: int, E: int, H: int, device: torch.device) -> dict:
    """Launch parameters from shapes only (graph-safe). GPU numbers are estimates, not yet swept."""
    bm = min(next_pow2(M), 16)
    if torch.device(device).type == "cpu":   # interpreter: few, big programs
        return dict(BLOCK_M=bm, BLOCK_E=min(next_pow2(E + 1), 16), BLOCK_K=min(next_pow2(H), 128), SPLIT=1,
                    num_warps=4)
    be = 4
    bk = max(32, min(4096 // (bm * be), next_pow2(H), 512))
    progs = triton.cdiv(E + 1, be) * triton.cdiv(M, bm)
    split = max(1, min(MAX_ROUTE_SPLIT, triton.cdiv(num_sms(device), progs), triton.cdiv(H, 2 * bk)))
    return dict(BLOCK_M=bm, BLOCK_E=be, BLOCK_K=bk, SPLIT=split, num_warps=4)


def moe_route(h, router_weight, ws, *, top_k: int, route: str, renorm: bool, round_weights: bool,
              router_bias=None, shared_gate=None, config: dict | None = None, tuning=None) -> None:
    """Fill ws.ids (M, top_k) int32, ws.wts (M, top_k) fp32, ws.elist (E,) int32 and, with shared_gate
    (H,), ws.sg (M,) fp32 for the rows of h (M, H). No sync, no allocation (ws: kernels.moe.MoEWorkspace)."""
    M, H = h.shape
    E = router_weight.shape[0]
    cfg = dict(route_config(M, E, H, h.device))
    if config:
        cfg.update(config)
    split = int(cfg["SPLIT"])
    if not 1 <= split <= MAX_ROUTE_SPLIT:
        raise ValueError(f"route SPLIT must be in 1..{MAX_ROUTE_SPLIT}, got {split}")
    if router_weight.stride(1) != 1 or (router_bias is not None and router_bias.stride(0) != 1):
        raise ValueError("router weight/bias need a contiguous last dimension")
    if shared_gate is not None and (shared_gate.numel() != H or shared_gate.stride(-1) != 1):
        raise ValueError(f"shared_gate must hold {H} contiguous values")
    grid = (triton.cdiv(E + (shared_gate is not None), cfg["BLOCK_E"]), split, triton.cdiv(M, cfg["BLOCK_M"]))
    dummy = h
    launch(_route_kernel, grid)(
        h, router_weight, router_bias if router_bias is not None else dummy,
        shared_gate if shared_gate is not None else dummy, ws.part, ws.counters, ws.ids, ws.wts, ws.sg, ws.elist,
        M, E, H, h.stride(0), router_weight.stride(0), grid[0] * grid[1] * grid[2],
        ROUTE=ROUTES[route], RENORM=bool(renorm), ROUND_W=bool(round_weights), HAS_BIAS=router_bias is not None,
        HAS_SG=shared_gate is not None, TOPK=top_k, KP=next_pow2(top_k), E_PAD=next_pow2(E),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_E=cfg["BLOCK_E"], BLOCK_K=cfg["BLOCK_K"], SPLIT=split,
        FBM=min(next_pow2(M), 16), BF16_FIX=BF16_RNE_FIX, num_warps=cfg["num_warps"],
        **pdl_launch_kwargs(h.device, tuning))


# --------------------------------------------------------------------------------------- reference
def topk_lowest_index(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest along the last dim, equal values by lower index: the set CUDA's
    torch.topk picks (CPU torch.topk orders ties arbitrarily). A stable descending sort gives it."""
    vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return vals[..., :k], idx[..., :k]


def moe_route_reference(h, router_weight, *, top_k: int, route: str, renorm: bool, round_weights: bool,
                        router_bias=None, shared_gate=None, ids=None):
    """The kernel's routing spec in torch: (ids int64 (M, k), weights fp32 (M, k), sg fp32 (M,) or None).
    `ids` given: the weights of those experts instead of a top-k (an fp32 reference that must follow the
    bf16 path's choice)."""
    dt = h.dtype
    logits = h.float() @ router_weight.float().t()
    if router_bias is not None:
        logits = logits + router_bias.float()
    logits = logits.to(dt).float()
    score = torch.softmax(logits, dim=-1) if route == "softmax_topk" else logits
    if ids is None:
        vals, ids = topk_lowest_index(score, top_k)
    else:
        ids = ids.long()
        vals = score.gather(1, ids)
    if route == "softmax_topk":
        w = vals / vals.sum(-1, keepdim=True) if renorm else vals
    else:
        w = torch.softmax(vals, dim=-1)
    if round_weights:
        w = w.to(dt).float()
    sg = None
    if shared_gate is not None:
        g = (h.float() @ shared_gate.float().reshape(-1, 1)).squeeze(1).to(dt).float()
        sg = torch.sigmoid(g).to(dt).float()
    return ids, w, sg
