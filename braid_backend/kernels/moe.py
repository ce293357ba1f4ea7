"""Fused mixture-of-experts decode op: x += MoE(h), three kernels, expert ids kept on the device.

CONTRACT (what the decode step calls once per MoE layer; model/moe.py's MoEPlan.op_kwargs() fills the
keywords from a Hugging Face MoE block):

    moe_decode(h, x, router_weight, gate_up, down, *, top_k, route, renorm, round_weights,
               router_bias=None, gate_up_bias=None, down_bias=None, act="silu_mul", transposed=False,
               interleaved=False, limit=7.0, alpha=1.702, shared_out=None, shared_gate=None,
               res_scale=None, out=None, workspace=None, config=None) -> out

  h (M, H): the post-attention RMSNorm output (model dtype, contiguous last dim); x (M, H): the residual
  stream, or None (then out = MoE(h) alone). out (M, H) may be x (in-place update). The expert tensors are
  the HF parameters, read in place: gate_up (E, 2I, H) [gate; up] and down (E, H, I), or with transposed
  (gpt-oss) gate_up (E, H, 2I) and down (E, I, H); interleaved: gate/up alternate along 2I. Biases
  (E, 2I) / (E, H). shared_out (M, H): Qwen2-MoE's shared-expert MLP output, already computed (e.g. two
  fused_gemv calls); shared_gate (H,): its sigmoid gate row. res_scale: Granite's residual multiplier.
  workspace: a MoEWorkspace(max_rows >= M, ...) reused by every layer and step (one stream); with it and
  `out` given the op allocates nothing and never syncs with the host (CUDA-graph capturable).
  Every workspace buffer the op reads is written earlier in the same call; its counters are left at 0.

SPEC (`moe_decode_reference`; rnd = round to h.dtype, identity in fp32; routing: kernels/moe_route.py):
  per selected (row, slot s, expert e): gu = rnd(h @ Wgu_e^T) [then rnd(gu + b) with biases]
    act "silu_mul":       a = rnd(rnd(silu(g)) * u)
    act "gpt_oss_swiglu": g = min(g, limit), u = clamp(u, +-limit),
                          a = rnd(rnd(u + 1) * rnd(g * rnd(sigmoid(rnd(g * alpha)))))   (stock's roundings)
    y_s = rnd(a @ Wd_e^T) [then rnd(y_s + bd)]
  acc = sum over s = 0..k-1 of w_s * y_s in fp32 (slot order), [+ rnd(sg * shared_out)]
  out = rnd(x + acc); with res_scale: rnd(x + rnd(rnd(acc) * res_scale)). One rounding where stock has
  two or three (stock rounds w_s * y_s, the sum and the add): the fused error is the smaller one.

KERNELS: route (moe_route.py) -> gate_up + act -> down + weighted sum + residual. The expert kernels'
grid is (N blocks, items [x K splits], row blocks): item i is the i-th selected expert in ascending order
(elist; programs past the selected ones do nothing), so at batch B each expert any row picked is read
once, by programs that take all the block's rows that picked it (masked rows cost FLOPs, not bytes).
gate_up writes act (M*k, I); down writes fp32 partial sums (M*k, H) and the last of a column block's
programs (atomic counter) combines them in slot order with the residual. Two paths: "gemv" (fp32 FMAs
on wide loads, few rows) and "tc" (tl.dot tiles of 16-64 rows)."""
from __future__ import annotations

import functools

import torch

from ._common import (BF16_RNE_FIX, DEFAULT_TUNING, DOT_UPCAST, Tuning, launch, next_pow2, num_sms,
                      pdl_launch_kwargs, tl, triton)
from .moe_route import MAX_ROUTE_SPLIT, ROUTES, moe_route, moe_route_reference

if triton is not None:
    from ._common import arrive_last, pdl_wait, round_to

ACTS = {"silu_mul": 1, "gpt_oss_swiglu": 2}
MAX_DOWN_SPLIT = 4


class MoEWorkspace:
    """Device buffers of moe_decode for up to max_rows rows; one serves every MoE layer of a step."""

    def __init__(self, max_rows: int, n_experts: int, top_k: int, hidden: int, intermediate: int,
                 dtype: torch.dtype, device):
        self.max_rows, self.n_experts, self.top_k = int(max_rows), int(n_experts), int(top_k)
        self.hidden, self.intermediate, self.dtype = int(hidden), int(intermediate), dtype
        mk = self.max_rows * self.top_k
        f32, i32 = torch.float32, torch.int32
        self.part = torch.empty(MAX_ROUTE_SPLIT * self.max_rows * (n_experts + 1), dtype=f32, device=device)
        self.ids = torch.empty(mk, dtype=i32, device=device)
        self.wts = torch.empty(mk, dtype=f32, device=device)
        self.sg = torch.empty(self.max_rows, dtype=f32, device=device)
        self.elist = torch.empty(n_experts, dtype=i32, device=device)
        self.act = torch.empty(mk * intermediate, dtype=dtype, device=device)
        self.y = torch.empty(MAX_DOWN_SPLIT * mk * hidden, dtype=f32, device=device)
        self.counters = torch.zeros(1 + hidden, dtype=i32, device=device)   # [0]: route, [1 + j]: down block j
        self.down_counters = self.counters[1:]


# ----------------------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _rows_of(ids_ptr, e, offs_m, M, TOPK: tl.constexpr, KP: tl.constexpr):
        """For rows offs_m: whether the row selected expert e, and in which slot."""
        kk = tl.arange(0, KP)
        idv = tl.load(ids_ptr + offs_m[:, None] * TOPK + kk[None, :],
                      mask=(offs_m < M)[:, None] & (kk < TOPK)[None, :], other=-1)
        slot = tl.min(tl.where(idv == e, kk[None, :], KP), axis=1)
        return slot < TOPK, slot

    @triton.jit
    def _mm(x_ptr, stride_xm, x_rows, x_mask, wb, n_a, n_b, mask_n, stride_wn, stride_wk, k_lo, k_hi,
            TWO: tl.constexpr, TC: tl.constexpr, BLOCK_M: tl.constexpr, BN: tl.constexpr,
            BLOCK_K: tl.constexpr, DOT_UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """fp32 (BLOCK_M, BN) = x[x_rows, k_lo:k_hi] @ W[n, k_lo:k_hi]^T for weight rows n_a (and n_b with
        TWO: gate and up in one pass over K), W element (n, k) at wb + n * stride_wn + k * stride_wk."""
        xr = x_ptr + x_rows.to(tl.int64) * stride_xm
        if TC:
            acc_a = tl.zeros((BLOCK_M, BN), tl.float32)
            acc_b = tl.zeros((BLOCK_M, BN), tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                mk = k < k_hi
                xv = tl.load(xr[:, None] + k[None, :], mask=x_mask[:, None] & mk[None, :], other=0.0)
                wa = tl.load(wb + k[:, None] * stride_wk + n_a[None, :] * stride_wn,
                             mask=mk[:, None] & mask_n[None, :], other=0.0)
                if DOT_UPCAST:   # interpreter: bf16 tl.dot is broken there; the values are exact in fp32
                    xv = xv.to(tl.float32)
                    wa = wa.to(tl.float32)
                if IEEE:
                    acc_a = tl.dot(xv, wa, acc_a, input_precision="ieee")
                else:
                    acc_a = tl.dot(xv, wa, acc_a)
                if TWO:
                    wu = tl.load(wb + k[:, None] * stride_wk + n_b[None, :] * stride_wn,
                                 mask=mk[:, None] & mask_n[None, :], other=0.0)
                    if DOT_UPCAST:
                        wu = wu.to(tl.float32)
                    if IEEE:
                        acc_b = tl.dot(xv, wu, acc_b, input_precision="ieee")
                    else:
                        acc_b = tl.dot(xv, wu, acc_b)
        else:
            # 3-D accumulators: the cross-lane reduction over K happens once, after the loop
            acc3a = tl.zeros((BLOCK_M, BN, BLOCK_K), tl.float32)
            acc3b = tl.zeros((BLOCK_M, BN, BLOCK_K), tl.float32)
            xm3 = x_mask[:, None, None]
            mn3 = mask_n[None, :, None]
            for k0 in range(k_lo, k_hi, BLOCK_K):
                k = (k0 + tl.arange(0, BLOCK_K))[None, None, :]
                mk = k < k_hi
                xv = tl.load(xr[:, None, None] + k, mask=xm3 & mk, other=0.0).to(tl.float32)
                wa = tl.load(wb + n_a[None, :, None] * stride_wn + k * stride_wk, mask=mn3 & mk, other=0.0)
                acc3a += xv * wa.to(tl.float32)
                if TWO:
                    wu = tl.load(wb + n_b[None, :, None] * stride_wn + k * stride_wk, mask=mn3 & mk, other=0.0)
                    acc3b += xv * wu.to(tl.float32)
            acc_a = tl.sum(acc3a, axis=2)
            acc_b = tl.sum(acc3b, axis=2)
        return acc_a, acc_b

    @triton.jit
    def _activate(g, u, bb, offs_n, mask_n, I, limit, alpha, ACT: tl.constexpr, INTERLEAVED: tl.constexpr,
                  HAS_BIAS: tl.constexpr, DT: tl.constexpr, BF16_FIX: tl.constexpr):
        g = round_to(g, DT, BF16_FIX)
        u = round_to(u, DT, BF16_FIX)
        if HAS_BIAS:   # stock: matmul, then `+ bias` on the rounded product
            if INTERLEAVED:
                gb = tl.load(bb + 2 * offs_n, mask=mask_n, other=0.0).to(tl.float32)
                ub = tl.load(bb + 2 * offs_n + 1, mask=mask_n, other=0.0).to(tl.float32)
            else:
                gb = tl.load(bb + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                ub = tl.load(bb + I + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            g = round_to(g + gb[None, :], DT, BF16_FIX)
            u = round_to(u + ub[None, :], DT, BF16_FIX)
        if ACT == 1:
            a = round_to(round_to(g / (1.0 + tl.exp(-g)), DT, BF16_FIX) * u, DT, BF16_FIX)
        else:   # gpt-oss: clamp, glu = g * sigmoid(g * alpha), (up + 1) * glu, each op in the dtype
            g = tl.minimum(g, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
            t = round_to(g * alpha, DT, BF16_FIX)
            glu = round_to(g * round_to(1.0 / (1.0 + tl.exp(-t)), DT, BF16_FIX), DT, BF16_FIX)
            a = round_to(round_to(u + 1.0, DT, BF16_FIX) * glu, DT, BF16_FIX)
        return a

    @triton.jit
    def _gate_up_kernel(h_ptr, w_ptr, b_ptr, ids_ptr, elist_ptr, act_ptr,
                        M, I, H, stride_hm, stride_we, stride_wn, stride_wk, stride_be, limit, alpha,
                        TOPK: tl.constexpr, KP: tl.constexpr, ACT: tl.constexpr, INTERLEAVED: tl.constexpr,
                        HAS_BIAS: tl.constexpr, TC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, DOT_UPCAST: tl.constexpr, IEEE: tl.constexpr,
                        BF16_FIX: tl.constexpr, USE_PDL: tl.constexpr):
        pid_n = tl.program_id(0)
        item = tl.program_id(1)
        pid_m = tl.program_id(2)
        DT = h_ptr.dtype.element_ty
        pdl_wait(USE_PDL)   # elist / ids come from the route kernel
        e = tl.load(elist_ptr + item)
        if e >= 0:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            has, slot = _rows_of(ids_ptr, e, offs_m, M, TOPK, KP)
            if tl.max(has.to(tl.int32), axis=0) > 0:
                wb = w_ptr + e.to(tl.int64) * stride_we
                offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                mask_n = offs_n < I
                if INTERLEAVED:   # one tile of 2*BLOCK_N adjacent columns, split into (gate, up) pairs
                    pn = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
                    acc, _unused = _mm(h_ptr, stride_hm, offs_m, has, wb, pn, pn, pn < 2 * I, stride_wn,
                                       stride_wk, 0, H, False, TC, BLOCK_M, 2 * BLOCK_N, BLOCK_K, DOT_UPCAST, IEEE)
                    g, u = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
                else:
                    g, u = _mm(h_ptr, stride_hm, offs_m, has, wb, offs_n, offs_n + I, mask_n, stride_wn,
                               stride_wk, 0, H, True, TC, BLOCK_M, BLOCK_N, BLOCK_K, DOT_UPCAST, IEEE)
                a = _activate(g, u, b_ptr + e.to(tl.int64) * stride_be, offs_n, mask_n, I, limit, alpha,
                              ACT, INTERLEAVED, HAS_BIAS, DT, BF16_FIX)
                rows = (offs_m * TOPK + slot).to(tl.int64)
                tl.store(act_ptr + rows[:, None] * I + offs_n[None, :], a.to(DT),
                         mask=has[:, None] & mask_n[None, :])

    @triton.jit
    def _combine(y_ptr, b_ptr, ids_ptr, wts_ptr, sg_ptr, sh_ptr, x_ptr, out_ptr, offs_n, M, H,
                 stride_be, stride_sm, stride_xm, stride_om, res_scale, TOPK: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_SHARED: tl.constexpr, HAS_RES: tl.constexpr,
                 HAS_SCALE: tl.constexpr, SPLIT: tl.constexpr, FBM: tl.constexpr, BLOCK_N: tl.constexpr,
                 DT: tl.constexpr, BF16_FIX: tl.constexpr):
        """out[:, offs_n] for every row: rnd(x + sum_s w_s * rnd(y_s)) (see the module docstring)."""
        nm = offs_n < H
        MK = M * TOPK
        for m0 in range(0, M, FBM):
            m = m0 + tl.arange(0, FBM)
            mv = m < M
            msk = mv[:, None] & nm[None, :]
            acc = tl.zeros((FBM, BLOCK_N), tl.float32)
            for s in tl.static_range(TOPK):   # slot order: deterministic
                r = m * TOPK + s
                y = tl.zeros((FBM, BLOCK_N), tl.float32)
                for sp in range(SPLIT):   # other programs wrote these: .cg, never a stale L1 line
                    y += tl.load(y_ptr + (sp * MK + r).to(tl.int64)[:, None] * H + offs_n[None, :],
                                 mask=msk, other=0.0, cache_modifier=".cg")
                y = round_to(y, DT, BF16_FIX)
                if HAS_BIAS:
                    eid = tl.load(ids_ptr + r, mask=mv, other=0).to(tl.int64)
                    bd = tl.load(b_ptr + eid[:, None] * stride_be + offs_n[None, :], mask=msk, other=0.0)
                    y = round_to(y + bd.to(tl.float32), DT, BF16_FIX)
                acc += tl.load(wts_ptr + r, mask=mv, other=0.0)[:, None] * y
            rows = m.to(tl.int64)[:, None]
            if HAS_SHARED:   # Qwen2-MoE: sigmoid(gate) * shared expert, materialised in the dtype
                sgv = tl.load(sg_ptr + m, mask=mv, other=0.0)
                shv = tl.load(sh_ptr + rows * stride_sm + offs_n[None, :], mask=msk, other=0.0).to(tl.float32)
                acc += round_to(sgv[:, None] * shv, DT, BF16_FIX)
            if HAS_SCALE:   # Granite: residual + mlp * multiplier, the product in the dtype
                acc = round_to(round_to(acc, DT, BF16_FIX) * res_scale, DT, BF16_FIX)
            if HAS_RES:
                # out may be x: this program loads and stores each of these elements, no other touches them
                acc += tl.load(x_ptr + rows * stride_xm + offs_n[None, :], mask=msk, other=0.0).to(tl.float32)
            # rounded by hand first: the interpreter's fp32 -> bf16 cast truncates
            tl.store(out_ptr + rows * stride_om + offs_n[None, :], round_to(acc, DT, BF16_FIX).to(DT), mask=msk)

    @triton.jit
    def _down_kernel(act_ptr, w_ptr, b_ptr, ids_ptr, wts_ptr, elist_ptr, sg_ptr, sh_ptr, x_ptr, out_ptr,
                     y_ptr, cnt_ptr, M, H, I, stride_we, stride_wn, stride_wk, stride_be, stride_sm, stride_xm,
                     stride_om, res_scale, n_arrive,
                     TOPK: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SHARED: tl.constexpr,
                     HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, TC: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, FBM: tl.constexpr,
                     DOT_UPCAST: tl.constexpr, IEEE: tl.constexpr, BF16_FIX: tl.constexpr,
                     USE_PDL: tl.constexpr):
        pid_n = tl.program_id(0)
        item = tl.program_id(1) // SPLIT
        sp = tl.program_id(1) % SPLIT
        pid_m = tl.program_id(2)
        DT = out_ptr.dtype.element_ty
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < H
        pdl_wait(USE_PDL)
        e = tl.load(elist_ptr + item)
        if e >= 0:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            has, slot = _rows_of(ids_ptr, e, offs_m, M, TOPK, KP)
            if tl.max(has.to(tl.int32), axis=0) > 0:
                k_chunk = tl.cdiv(tl.cdiv(I, SPLIT), BLOCK_K) * BLOCK_K
                k_lo = sp * k_chunk
                k_hi = tl.minimum(k_lo + k_chunk, I)
                rows = offs_m * TOPK + slot
                acc, _unused = _mm(act_ptr, I, rows, has, w_ptr + e.to(tl.int64) * stride_we, offs_n, offs_n,
                                   mask_n, stride_wn, stride_wk, k_lo, k_hi, False, TC, BLOCK_M, BLOCK_N,
                                   BLOCK_K, DOT_UPCAST, IEEE)
                dst = y_ptr + (sp * M * TOPK + rows).to(tl.int64)[:, None] * H + offs_n[None, :]
                tl.store(dst, acc, mask=has[:, None] & mask_n[None, :])
        if arrive_last(cnt_ptr + pid_n, n_arrive):
            _combine(y_ptr, b_ptr, ids_ptr, wts_ptr, sg_ptr, sh_ptr, x_ptr, out_ptr, offs_n, M, H, stride_be,
                     stride_sm, stride_xm, stride_om, res_scale, TOPK, HAS_BIAS, HAS_SHARED, HAS_RES, HAS_SCALE,
                     SPLIT, FBM, BLOCK_N, DT, BF16_FIX)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)   # the next launch counts from 0 again


# -------------------------------------------------------------------------------------- heuristics
CPU_GEMV_MAX_M = 8   # interpreter; on a GPU Tuning.gemv_max_m (as fused_gemv; not yet swept for MoE shapes)


def _widest(n_phys: int, items: int, sms: int, widths=(128, 64, 32)) -> int:
    """Widest contiguous column tile (transposed layouts) that still gives ~4 programs per SM."""
    for w in widths:
        if triton.cdiv(n_phys, w) * items >= 4 * sms:
            return w
    return widths[-1]


@functools.lru_cache(maxsize=1024)
def expert_config(kind: str, M: int, N: int, K: int, items: int, dtype: torch.dtype, device: torch.device,
                  transposed: bool, path: str | None = None, gemv_max_m: int = 2) -> dict:
    """Launch parameters of the gate_up (N = I outputs per half) or down (N = H) kernel from shapes only.
    GPU numbers are first estimates (benchmarks/kernels/bench_moe.py sweeps alternatives)."""
    cpu = device.type == "cpu"
    if path is None:
        path = "gemv" if M <= (CPU_GEMV_MAX_M if cpu else gemv_max_m) else "tc"
    two = 2 if kind == "gate_up" else 1   # gate_up: two accumulators (or a 2x wide interleaved tile)
    if cpu:   # interpreter: few, big programs
        bm = min(next_pow2(M), 8) if path == "gemv" else max(16, min(next_pow2(M), 64))
        return dict(path=path, BLOCK_M=bm, BLOCK_N=min(next_pow2(N), 32), BLOCK_K=min(next_pow2(K), 64),
                    SPLIT=1, num_warps=4, num_stages=1)
    sms = num_sms(device)
    if path == "gemv":
        bm = min(next_pow2(M), 8)
        if transposed:   # N contiguous: wide column tiles, short K tiles
            bn = _widest(two * N, items, sms) // two
            bk = max(8, min(4096 // (bm * bn * two), 128))
        else:            # K contiguous (nn.Linear rows): a few rows, long K tiles (fused_gemv's batch-1 shape)
            bn = 4 if kind == "gate_up" else 8
            bk = max(32, min(4096 // (bm * bn), next_pow2(K), 1024))
        cfg = dict(path="gemv", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=3)
        if not transposed and M == 1 and kind == "gate_up" and N <= 1024:
            # small experts (Qwen3-30B-A3B, I 768): H200 sweep at batch 1 (results/2026-12-03-h200-s9/runC):
            # gate_up 25.6 -> 23.1 us at 2 rows x 512 on 8 warps (down's best, 18.3 -> 17.7, left out)
            cfg = dict(cfg, BLOCK_N=2, BLOCK_K=min(512, bk), num_warps=8, num_stages=2)
    else:
        bm = 16 if M <= 16 else (32 if M <= 32 else 64)
        bn = 64
        cfg = dict(path="tc", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64 if dtype != torch.float32 else 32,
                   num_warps=8 if bm * bn * two >= 4096 else 4, num_stages=3)
    cfg["SPLIT"] = 1
    if kind == "down":   # few column blocks (gpt-oss b1: 90 x 4 experts): split K, combine in the last program
        progs = triton.cdiv(N, cfg["BLOCK_N"]) * items * triton.cdiv(M, cfg["BLOCK_M"])
        if progs < 2 * sms and K >= 1024:
            cfg["SPLIT"] = max(1, min(MAX_DOWN_SPLIT, triton.cdiv(2 * sms, progs), K // (2 * cfg["BLOCK_K"])))
    return cfg


# ---------------------------------------------------------------------------------------- launcher
def _expert_strides(w: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """(expert, output-row, k) element strides of a packed 3-D expert tensor."""
    return (w.stride(0), w.stride(2), w.stride(1)) if transposed else (w.stride(0), w.stride(1), w.stride(2))


def _check(name, t, shape, dtype=None):
    if t is None:
        return
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension")


def moe_decode(h, x, router_weight, gate_up, down, *, top_k: int, route: str = "softmax_topk",
               renorm: bool = True, round_weights: bool = True, router_bias=None, gate_up_bias=None,
               down_bias=None, act: str = "silu_mul", transposed: bool = False, interleaved: bool = False,
               limit: float = 7.0, alpha: float = 1.702, shared_out=None, shared_gate=None,
               res_scale: float | None = None, out=None, workspace: MoEWorkspace | None = None,
               config: dict | None = None, tuning: Tuning | None = None,
               kernels: tuple = ("route", "gate_up", "down")) -> torch.Tensor:
    """out = [x +] MoE(h); see the module docstring. config: {"path": "gemv"|"tc", "route": {...},
    "gate_up": {...}, "down": {...}} overrides the launch heuristics; tuning: PDL and gemv_max_m (neither
    changes the results). kernels: launch only some of the three (benchmarks time them one by one on a
    workspace an earlier full call filled)."""
    t = tuning or DEFAULT_TUNING
    if route not in ROUTES or act not in ACTS:
        raise ValueError(f"route must be in {list(ROUTES)} and act in {list(ACTS)}, got {route!r}, {act!r}")
    if h.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError("h must be (M, H) and the expert weights 3-D")
    M, H = h.shape
    E = router_weight.shape[0]
    I = gate_up.shape[2 if transposed else 1] // 2
    dt = h.dtype
    _check("h", h, (M, H))
    _check("router_weight", router_weight, (E, H))
    _check("gate_up", gate_up, (E, H, 2 * I) if transposed else (E, 2 * I, H), dt)
    _check("down", down, (E, I, H) if transposed else (E, H, I), dt)
    _check("router_bias", router_bias, (E,))
    _check("gate_up_bias", gate_up_bias, (E, 2 * I), dt)
    _check("down_bias", down_bias, (E, H), dt)
    _check("x", x, (M, H), dt)
    _check("shared_out", shared_out, (M, H), dt)
    if (shared_out is None) != (shared_gate is None):
        raise ValueError("shared_out and shared_gate go together")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in 1..{E}, got {top_k}")
    if out is None:
        out = torch.empty((M, H), dtype=dt, device=h.device)
    _check("out", out, (M, H), dt)
    ws = workspace if workspace is not None else MoEWorkspace(M, E, top_k, H, I, dt, h.device)
    if ((ws.n_experts, ws.top_k, ws.hidden, ws.intermediate, ws.dtype) != (E, top_k, H, I, dt)
            or ws.max_rows < M or ws.ids.device != h.device):
        have = (ws.n_experts, ws.top_k, ws.hidden, ws.intermediate, ws.dtype, ws.max_rows)
        raise ValueError(f"workspace for (E, k, H, I, dtype, rows) = {have} on {ws.ids.device} does not fit "
                         f"{(E, top_k, H, I, dt, M)} on {h.device}")
    if M == 0:
        return out
    config = config or {}
    if "route" in kernels:
        moe_route(h, router_weight, ws, top_k=top_k, route=route, renorm=renorm, round_weights=round_weights,
                  router_bias=router_bias, shared_gate=shared_gate, config=config.get("route"), tuning=t)
    items = min(E, M * top_k)
    common = dict(TOPK=top_k, KP=next_pow2(top_k), DOT_UPCAST=DOT_UPCAST, BF16_FIX=BF16_RNE_FIX,
                  IEEE=DOT_UPCAST or dt == torch.float32, **pdl_launch_kwargs(h.device, t))
    dummy = h   # pointer for disabled operands; never dereferenced (constexpr flags)

    cg = dict(expert_config("gate_up", M, I, H, items, dt, h.device, transposed, config.get("path"),
                            t.gemv_max_m))
    cg.update(config.get("gate_up") or {})
    se, sn, sk = _expert_strides(gate_up, transposed)
    grid = (triton.cdiv(I, cg["BLOCK_N"]), items, triton.cdiv(M, cg["BLOCK_M"]))
    if "gate_up" in kernels:
        launch(_gate_up_kernel, grid)(
            h, gate_up, gate_up_bias if gate_up_bias is not None else dummy, ws.ids, ws.elist, ws.act,
            M, I, H, h.stride(0), se, sn, sk, gate_up_bias.stride(0) if gate_up_bias is not None else 0,
            float(limit), float(alpha), ACT=ACTS[act], INTERLEAVED=bool(interleaved),
            HAS_BIAS=gate_up_bias is not None, TC=cg["path"] == "tc", BLOCK_M=cg["BLOCK_M"], BLOCK_N=cg["BLOCK_N"],
            BLOCK_K=cg["BLOCK_K"], num_warps=cg["num_warps"], num_stages=cg["num_stages"], **common)

    cd = dict(expert_config("down", M, H, I, items, dt, h.device, transposed, config.get("path"),
                            t.gemv_max_m))
    cd.update(config.get("down") or {})
    split = int(cd["SPLIT"])
    if not 1 <= split <= MAX_DOWN_SPLIT:
        raise ValueError(f"down SPLIT must be in 1..{MAX_DOWN_SPLIT}, got {split}")
    se, sn, sk = _expert_strides(down, transposed)
    grid = (triton.cdiv(H, cd["BLOCK_N"]), items * split, triton.cdiv(M, cd["BLOCK_M"]))
    res = x if x is not None else dummy
    sh = shared_out if shared_out is not None else dummy
    if "down" in kernels:
        launch(_down_kernel, grid)(
            ws.act, down, down_bias if down_bias is not None else dummy, ws.ids, ws.wts, ws.elist, ws.sg, sh, res,
            out, ws.y, ws.down_counters, M, H, I, se, sn, sk, down_bias.stride(0) if down_bias is not None else 0,
            sh.stride(0), res.stride(0), out.stride(0), float(res_scale) if res_scale is not None else 1.0,
            grid[1] * grid[2], HAS_BIAS=down_bias is not None, HAS_SHARED=shared_out is not None,
            HAS_RES=x is not None, HAS_SCALE=res_scale is not None, TC=cd["path"] == "tc", BLOCK_M=cd["BLOCK_M"],
            BLOCK_N=cd["BLOCK_N"], BLOCK_K=cd["BLOCK_K"], SPLIT=split, FBM=min(next_pow2(M), 16),
            num_warps=cd["num_warps"], num_stages=cd["num_stages"], **common)
    return out


# --------------------------------------------------------------------------------------- reference
def _act_reference(g, u, act, limit, alpha, dt):
    f = lambda t: t.to(dt).float()   # noqa: E731 - rnd
    if act == "silu_mul":
        return f(f(torch.nn.functional.silu(g)) * u)
    g = g.clamp(max=limit)
    u = u.clamp(-limit, limit)
    glu = f(g * f(torch.sigmoid(f(g * alpha))))
    return f(f(u + 1) * glu)


def moe_decode_reference(h, x, router_weight, gate_up, down, *, top_k: int, route: str = "softmax_topk",
                         renorm: bool = True, round_weights: bool = True, router_bias=None, gate_up_bias=None,
                         down_bias=None, act: str = "silu_mul", transposed: bool = False,
                         interleaved: bool = False, limit: float = 7.0, alpha: float = 1.702, shared_out=None,
                         shared_gate=None, res_scale=None, ids=None, **_ignored) -> torch.Tensor:
    """The op's specification in torch (same cast points as the kernels). `ids` (M, k): use these experts
    (an fp32 reference following a bf16 path's choice) instead of the top-k."""
    dt = h.dtype
    f = lambda t: t.to(dt).float()   # noqa: E731 - rnd
    ids, w, sg = moe_route_reference(h, router_weight, top_k=top_k, route=route, renorm=renorm,
                                     round_weights=round_weights, router_bias=router_bias,
                                     shared_gate=shared_gate, ids=ids)
    hf = h.float()
    acc = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    for s in range(top_k):
        e = ids[:, s]
        wg = gate_up[e].float()
        gu = f(torch.einsum("mk,mkn->mn", hf, wg) if transposed else torch.einsum("mk,mnk->mn", hf, wg))
        if gate_up_bias is not None:
            gu = f(gu + gate_up_bias[e].float())
        I = gu.shape[1] // 2
        g, u = (gu[:, 0::2], gu[:, 1::2]) if interleaved else (gu[:, :I], gu[:, I:])
        a = _act_reference(g, u, act, limit, alpha, dt)
        wd = down[e].float()
        y = f(torch.einsum("mk,mkn->mn", a, wd) if transposed else torch.einsum("mk,mnk->mn", a, wd))
        if down_bias is not None:
            y = f(y + down_bias[e].float())
        acc = acc + w[:, s:s + 1] * y
    if shared_out is not None:
        acc = acc + f(sg[:, None] * shared_out.float())
    if res_scale is not None:
        acc = f(f(acc) * res_scale)
    if x is not None:
        acc = x.float() + acc
    return acc.to(dt)
