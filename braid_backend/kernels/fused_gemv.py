"""The decode GEMV used for every projection: [RMSNorm prologue] -> x @ W^T [+ bias]
-> [act(gate) * up] -> [+ residual], one kernel, fp32 accumulation.

`fused_gemv_reference` is the specification (cast points included). In short, with rnd = round to
x.dtype (identity for fp32):
  h   = x, or the RMSNorm of x (see rmsnorm.py for the two norm modes)
  y   = rnd(h @ W^T + bias_f32)                      (one rounding, like cuBLAS's bias epilogue)
  act:  W is packed [gate; up] (2I, K); out = rnd(rnd(act(y_gate)) * y_up)
  residual: out = rnd(residual_f32 + out_f32)
  res_scale m (Granite's residual multiplier, with residual): out = rnd(residual_f32 + rnd(out_f32 * m))

Two code paths, both exact w.r.t. the specification:
  "gemv": few rows (M <= 8). Each program owns BLOCK_N weight rows (and the matching up rows for
          act), streams them over K with wide loads and reduces with fp32 FMAs. Memory bound.
  "tc":   tensor-core tiles (BLOCK_M >= 16) with tl.dot; M is padded with masks. SPLIT_K > 1 (needs a
          GemvWorkspace): each tile's K range is cut into SPLIT_K programs that store fp32 partial sums;
          the last to arrive (an atomic counter per tile) adds them in split order (deterministic) and
          runs the epilogue. For small matrices at batch 3-16, whose 16-row tiles give fewer programs
          than SMs (Qwen2.5-0.5B down: 56 programs for 132 SMs on an H100).
"""
from __future__ import annotations

import functools

import torch

from ._common import (BF16_RNE_FIX, DEFAULT_TUNING, DOT_UPCAST, Tuning, check_norm_mode, launch, next_pow2,
                      norm_reference, num_sms, pdl_launch_kwargs, tl, triton)

if triton is not None:
    from ._common import pdl_wait
    from ._common import apply_norm, arrive_last, round_to

_ACTS = {None: 0, "silu_mul": 1, "gelu_tanh_mul": 2}


# ----------------------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _act(g, ACT: tl.constexpr):
        if ACT == 1:  # SiLU
            a = g / (1.0 + tl.exp(-g))
        else:  # GELU, tanh approximation; tanh(z) = 2 * sigmoid(2z) - 1 (no tanh in core tl)
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            a = 0.5 * g * (2.0 / (1.0 + tl.exp(-2.0 * z)))
        return a

    @triton.jit
    def _epilogue(acc_g, acc_u, offs_m, offs_n, M, N_OUT, b_ptr, res_ptr, stride_rm, out_ptr, stride_om,
                  res_scale, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                  HAS_SCALE: tl.constexpr, BF16_FIX: tl.constexpr):
        DT = out_ptr.dtype.element_ty
        mask_n = offs_n < N_OUT
        mask = (offs_m < M)[:, None] & mask_n[None, :]
        y = acc_g
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y = round_to(y, DT, BF16_FIX)
        if ACT != 0:
            u = acc_u
            if HAS_BIAS:
                u += tl.load(b_ptr + N_OUT + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            u = round_to(u, DT, BF16_FIX)
            y = round_to(round_to(_act(y, ACT), DT, BF16_FIX) * u, DT, BF16_FIX)
        rows = offs_m.to(tl.int64)[:, None]
        if HAS_SCALE:   # HF: residual + y * m, the product materialised in the dtype first
            y = round_to(y * res_scale, DT, BF16_FIX)
        if HAS_RES:
            # Aliasing: `out` may be `residual`. Each element is loaded here and stored below by the
            # same program with the same offsets, and no other program touches it: in-place is safe.
            res = tl.load(res_ptr + rows * stride_rm + offs_n[None, :], mask=mask, other=0.0)
            y = round_to(res.to(tl.float32) + y, DT, BF16_FIX)
        tl.store(out_ptr + rows * stride_om + offs_n[None, :], y.to(DT), mask=mask)

    @triton.jit
    def _finish_tile(acc_g, acc_u, pid_m, pid_n, offs_m, offs_n, M, N_OUT, b_ptr, res_ptr, stride_rm, out_ptr,
                     stride_om, res_scale, ws_ptr, cnt_ptr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                     HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, BF16_FIX: tl.constexpr, SPLIT_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NACC: tl.constexpr):
        """A tensor-core tile's end (fused_gemv and quant_gemv): the epilogue, or with SPLIT_K > 1 fp32 partials
        of which the last arrival sums all, in split order, then runs the epilogue and resets the counter."""
        if SPLIT_K == 1:
            _epilogue(acc_g, acc_u, offs_m, offs_n, M, N_OUT, b_ptr, res_ptr, stride_rm, out_ptr,
                      stride_om, res_scale, HAS_BIAS, ACT, HAS_RES, HAS_SCALE, BF16_FIX)
        else:
            # workspace: per tile SPLIT_K consecutive (BLOCK_M, BLOCK_N) fp32 slabs (x2 with act)
            TILE = BLOCK_M * BLOCK_N * NACC
            tile = pid_m * tl.num_programs(1) + pid_n
            loc = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            mine = ws_ptr + (tile * SPLIT_K + tl.program_id(2)).to(tl.int64) * TILE
            tl.store(mine + loc, acc_g)
            if ACT != 0:
                tl.store(mine + BLOCK_M * BLOCK_N + loc, acc_u)
            if arrive_last(cnt_ptr + tile, SPLIT_K):
                first = ws_ptr + (tile * SPLIT_K).to(tl.int64) * TILE
                acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                for s in range(SPLIT_K):   # split order, whoever arrives last: deterministic sums
                    acc_g += tl.load(first + s * TILE + loc, cache_modifier=".cg")
                    if ACT != 0:
                        acc_u += tl.load(first + s * TILE + BLOCK_M * BLOCK_N + loc, cache_modifier=".cg")
                _epilogue(acc_g, acc_u, offs_m, offs_n, M, N_OUT, b_ptr, res_ptr, stride_rm, out_ptr,
                          stride_om, res_scale, HAS_BIAS, ACT, HAS_RES, HAS_SCALE, BF16_FIX)
                tl.atomic_xchg(cnt_ptr + tile, 0)   # kernels sharing the counters run after this one

    @triton.jit
    def _row_rsqrt(x_ptr, offs_m, M, K, stride_xm, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """rsqrt(mean(x^2) + eps) for rows offs_m. x is tiny and L2-resident, so every program
        recomputing it is cheaper than a separate launch."""
        rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        mask_m = (offs_m < M)[:, None]
        ss = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(rows + k[None, :], mask=mask_m & (k < K)[None, :], other=0.0).to(tl.float32)
            ss += xv * xv
        return tl.rsqrt(tl.sum(ss, axis=1) / K + eps)

    @triton.jit
    def _gemv_tile(acc_g, acc_u, wg, wu, x_rows, nw_ptr, k, K, mask_m3, r, norm_offset,
                   HAS_NORM: tl.constexpr, NORM_MODE: tl.constexpr, ACT: tl.constexpr, DT: tl.constexpr,
                   BF16_FIX: tl.constexpr):
        """acc += norm(x[:, k]) * W[rows, k] for one K tile whose weights are already loaded."""
        mk3 = (k < K)[None, None, :]
        k3 = k[None, None, :]
        h = tl.load(x_rows + k3, mask=mask_m3 & mk3, other=0.0).to(tl.float32)
        if HAS_NORM:
            wf = tl.load(nw_ptr + k3, mask=mk3, other=0.0).to(tl.float32) + norm_offset
            h = apply_norm(h, r[:, None, None], wf, NORM_MODE, DT, BF16_FIX)
        acc_g += h * wg.to(tl.float32)
        if ACT != 0:
            acc_u += h * wu.to(tl.float32)
        return acc_g, acc_u

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, b_ptr, nw_ptr, res_ptr, out_ptr,
        M, N_OUT, K, stride_xm, stride_rm, stride_om, eps, norm_offset, res_scale,
        HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, NORM_MODE: tl.constexpr,
        ACT: tl.constexpr, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BF16_FIX: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        DT = x_ptr.dtype.element_ty
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m3 = (offs_m < M)[:, None, None]
        mask_n3 = (offs_n < N_OUT)[None, :, None]
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None, None] * stride_xm          # (BM, 1, 1)
        w_rows = w_ptr + offs_n.to(tl.int64)[None, :, None] * K                  # (1, BN, 1)
        u_rows = w_ptr + (offs_n + N_OUT).to(tl.int64)[None, :, None] * K        # up half (act only)
        # PDL: the first weight tile does not depend on earlier kernels, so it is in flight before the
        # wait; x (and the norm's rsqrt over x) only after it.
        k = offs_k
        mk3 = (k < K)[None, None, :]
        wg = tl.load(w_rows + k[None, None, :], mask=mask_n3 & mk3, other=0.0)
        wu = wg
        if ACT != 0:
            wu = tl.load(u_rows + k[None, None, :], mask=mask_n3 & mk3, other=0.0)
        pdl_wait(USE_PDL)
        r = tl.zeros((BLOCK_M,), tl.float32)
        if HAS_NORM:
            r = _row_rsqrt(x_ptr, offs_m, M, K, stride_xm, eps, BLOCK_M, BLOCK_K)
        # 3-D accumulators: the cross-lane reduction over K happens once, after the loop.
        acc_g = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
        acc_g, acc_u = _gemv_tile(acc_g, acc_u, wg, wu, x_rows, nw_ptr, k, K, mask_m3, r, norm_offset,
                                  HAS_NORM, NORM_MODE, ACT, DT, BF16_FIX)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            k = k0 + offs_k
            mk3 = (k < K)[None, None, :]
            wg = tl.load(w_rows + k[None, None, :], mask=mask_n3 & mk3, other=0.0)
            if ACT != 0:
                wu = tl.load(u_rows + k[None, None, :], mask=mask_n3 & mk3, other=0.0)
            acc_g, acc_u = _gemv_tile(acc_g, acc_u, wg, wu, x_rows, nw_ptr, k, K, mask_m3, r, norm_offset,
                                      HAS_NORM, NORM_MODE, ACT, DT, BF16_FIX)
        _epilogue(tl.sum(acc_g, axis=2), tl.sum(acc_u, axis=2), offs_m, offs_n, M, N_OUT,
                  b_ptr, res_ptr, stride_rm, out_ptr, stride_om, res_scale, HAS_BIAS, ACT, HAS_RES, HAS_SCALE,
                  BF16_FIX)

    @triton.jit
    def _tc_kernel(
        x_ptr, w_ptr, b_ptr, nw_ptr, res_ptr, out_ptr,
        M, N_OUT, K, stride_xm, stride_rm, stride_om, eps, norm_offset, res_scale,
        ws_ptr, cnt_ptr,
        HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, NORM_MODE: tl.constexpr,
        ACT: tl.constexpr, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
        NACC: tl.constexpr,
        BF16_FIX: tl.constexpr, DOT_UPCAST: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        # axis 0 = M blocks so that programs sharing a weight tile run back to back (L2 reuse).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        k_lo = 0
        k_hi = K
        if SPLIT_K > 1:   # this program's K range: whole BLOCK_K tiles, the last range may be short
            k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
            k_lo = tl.program_id(2) * k_chunk
            k_hi = tl.minimum(k_lo + k_chunk, K)
        DT = x_ptr.dtype.element_ty
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = (offs_m < M)[:, None]
        mask_n = (offs_n < N_OUT)[None, :]
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm                 # (BM, 1)
        w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * K                         # (1, BN): W^T tile
        u_cols = w_ptr + (offs_n + N_OUT).to(tl.int64)[None, :] * K
        pdl_wait(USE_PDL)  # everything below may read what the previous kernel writes
        if HAS_NORM:
            r = _row_rsqrt(x_ptr, offs_m, M, K, stride_xm, eps, BLOCK_M, BLOCK_K)[:, None]
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + offs_k
            mk = k < k_hi
            h = tl.load(x_rows + k[None, :], mask=mask_m & mk[None, :], other=0.0)
            if HAS_NORM:
                wf = tl.load(nw_ptr + k, mask=mk, other=0.0).to(tl.float32)[None, :] + norm_offset
                h = apply_norm(h.to(tl.float32), r, wf, NORM_MODE, DT, BF16_FIX).to(DT)
            wg = tl.load(w_cols + k[:, None], mask=mask_n & mk[:, None], other=0.0)
            if DOT_UPCAST:  # interpreter: bf16 tl.dot is broken there; values are exact in fp32
                h = h.to(tl.float32)
                wg = wg.to(tl.float32)
            if IEEE:
                acc_g = tl.dot(h, wg, acc_g, input_precision="ieee")
            else:
                acc_g = tl.dot(h, wg, acc_g)
            if ACT != 0:
                wu = tl.load(u_cols + k[:, None], mask=mask_n & mk[:, None], other=0.0)
                if DOT_UPCAST:
                    wu = wu.to(tl.float32)
                if IEEE:
                    acc_u = tl.dot(h, wu, acc_u, input_precision="ieee")
                else:
                    acc_u = tl.dot(h, wu, acc_u)
        _finish_tile(acc_g, acc_u, pid_m, pid_n, offs_m, offs_n, M, N_OUT, b_ptr, res_ptr, stride_rm, out_ptr,
                     stride_om, res_scale, ws_ptr, cnt_ptr, HAS_BIAS, ACT, HAS_RES, HAS_SCALE, BF16_FIX, SPLIT_K,
                     BLOCK_M, BLOCK_N, NACC)


# -------------------------------------------------------------------------------------- heuristics
def _prev_pow2(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


GEMV_MAX_M = 8  # rows per program of the GEMV path, and the CPU interpreter's path switch
# On a GPU the largest M served by the GEMV path is Tuning.gemv_max_m (2: larger batches ran faster on the
# tensor-core tiles, benchmarks/NOTES.md); Tuning.split_k switches the split-K heuristic below.
MAX_SPLIT_K = 8


def _split_k(tiles: int, K: int, block_k: int, sms: int, has_norm: bool, enabled: bool = True) -> int:
    """Programs per tile along K: up to ~4 per SM, each at least 2 BLOCK_K tiles deep; not for short K
    without a norm prologue. H100 sweep, Qwen2.5-0.5B at batch 4-16 (2026-11-26, session 7,
    results/2026-11-26-h100-s7 runA/runB gemv logs): down (N 896, K 4864, 56 tiles) 13.8 -> 8.4-8.7 us
    at split 5-8; qkv (norm, 36 tiles of 32 x 256) 10.3 -> 9.2 at split 2; o_proj (K 896, 56 tiles)
    4.9 -> 5.5 us at split 4: there the partial-sum round trip costs more than the programs gain."""
    if not enabled or tiles <= 0 or tiles >= sms or (K < 2048 and not has_norm):
        return 1
    return max(1, min(MAX_SPLIT_K, -(-4 * sms // tiles), -(-K // (2 * block_k))))


@functools.lru_cache(maxsize=4096)
def default_config(M: int, n_out: int, K: int, dtype: torch.dtype, has_act: bool, device: torch.device,
                   path: str | None = None, has_norm: bool = False, gemv_max_m: int = DEFAULT_TUNING.gemv_max_m,
                   split_k: bool = True) -> dict:
    """Launch parameters from shapes/dtype/device only (never tensor values: CUDA-graph safe).

    GPU numbers are the H100 sweep of 2026-11-25 (PDL on; benchmarks/results/2026-11-25-h100/)."""
    sms = num_sms(device)
    if path is None:
        max_m = GEMV_MAX_M if device.type == "cpu" else gemv_max_m
        if device.type != "cpu" and K >= 3072 and n_out * K >= (1 << 24) and (has_act or n_out < 32768):
            # 7-9B projections: batch 2 takes the 16-row tensor-core tiles below too (Llama-3.1-8B on an
            # H100: the batch-2 step on the GEMV path took 7.06 ms, batch 4 on these tiles 6.31 ms)
            max_m = 1
        path = "gemv" if M <= max_m else "tc"
    if device.type == "cpu":
        # Triton interpreter: every program is a Python-level loop, so few big programs run the
        # CPU tests 10-50x faster than the GPU's many small ones (kernel tests force GPU configs).
        block_m = min(next_pow2(M), GEMV_MAX_M) if path == "gemv" else max(16, min(next_pow2(M), 64))
        return dict(path=path, BLOCK_M=block_m, BLOCK_N=min(next_pow2(n_out), 128),
                    BLOCK_K=min(next_pow2(K), 256), num_warps=4, num_stages=1)
    if path == "gemv":
        block_m = min(next_pow2(M), GEMV_MAX_M)
        # Batch 1 sweep: 4 rows x 1024 columns per program for every N >= 8 programs/SM (gate_up 11.95
        # -> 10.88 us, lm_head 106.8 -> 99.3 us vs 16-32 rows), 2 rows below that (o_proj 3.5 us,
        # down 7.1 us); a third pipeline stage pays only on the big ones.
        if n_out >= 8 * sms:
            block_n, stages = 4, (3 if n_out >= 32 * sms else 2)
        else:
            block_n, stages = 2, 1
        block_n = min(block_n, next_pow2(n_out))
        # ~4096 fp32 accumulator elements per program (32 registers/thread at 4 warps; x2 with act).
        block_k = max(32, min(4096 // (block_m * block_n), next_pow2(K), 1024))
        warps = 4
        if M == 1 and not has_act and n_out * K >= (1 << 25) and K >= 8192:
            # 7-9B down projections: twice the K tile on twice the warps. H100 sweep, Llama-3.1-8B
            # (results/2026-11-26-h100-s7 runC, gemv-llama8b-b1): down 54.6 -> 50.4 us
            block_k, warps, stages = 2048, 8, 2
        elif M == 1 and not has_act and not has_norm and 8192 > K >= 4096 and n_out * K >= (3 << 22):
            # 7-9B o_proj with K 4096 (Llama-3.1-8B, Mistral, Gemma-2-9B): shorter K tiles, no pipelining
            # (same sweep: 19.1 -> 18.0 us). Qwen2.5-7B (K 3584) keeps the default: with both rules its
            # step went 5.24 -> 5.30 ms (runA vs runD, not isolated), while Llama/Mistral gained 3%
            block_k, stages = 512, 1
        return dict(path="gemv", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                    num_stages=stages)
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    if block_m == 16 and K >= 2048 and n_out * K >= (1 << 23) and (has_act or n_out < 32768):
        # 7-9B projections at batch 3-16 (not lm_heads): deeper K tiles. H100 sweep, Llama-3.1-8B shapes
        # (benchmarks/results/2026-11-26-h100-s6/, gemv-llama8b.json): qkv 54.1 -> 33.4 us, gate_up
        # 111.6 -> 93.6, down 57.2 -> 51.4, o_proj 20.7 -> 18.1 at batch 4; batch 8 and 16 alike
        if has_act:
            return dict(path="tc", BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)
        if has_norm:
            return dict(path="tc", BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=3)
        return dict(path="tc", BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4)
    m_blocks = triton.cdiv(M, block_m)
    block_n = 16
    for bn in (128, 64, 32):  # widest tile that still gives one program per SM
        if m_blocks * triton.cdiv(n_out, bn) >= sms:
            block_n = bn
            break
    if has_act:
        block_n = min(block_n, 64)
    block_k = 128 if dtype != torch.float32 else 64
    block_k = max(16, min(block_k, next_pow2(K)))
    if has_norm and not has_act and block_n == 16 and dtype != torch.float32 and K >= 256:
        # norm prologue (qkv): every program recomputes the row statistic, so fewer, deeper programs
        # win (batch 16 qkv 14.5 -> 9.7 us); o_proj/down (no norm) keep 16-wide tiles
        cfg = dict(path="tc", BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=256, num_warps=8, num_stages=3)
    else:
        cfg = dict(path="tc", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=4)
    tiles = m_blocks * triton.cdiv(n_out, cfg["BLOCK_N"])
    cfg["SPLIT_K"] = _split_k(tiles, K, cfg["BLOCK_K"], sms, has_norm, split_k)
    return cfg


class GemvWorkspace:
    """The fp32 partial sums and per-tile arrival counters of split-K launches. One serves every
    fused_gemv of a decode step: they run one after another on one stream (under PDL each waits for
    the previous kernel before touching it), and each launch leaves its counters at 0."""

    def __init__(self, partial_elems: int, tiles: int, device):
        self.partials = torch.empty(max(1, partial_elems), dtype=torch.float32, device=device)
        self.counters = torch.zeros(max(1, tiles), dtype=torch.int32, device=device)


def _split_need(cfg: dict, M: int, n_out: int, has_act: bool) -> tuple[int, int]:
    """(partial elements, tiles) a launch with this config needs from a GemvWorkspace."""
    split = cfg.get("SPLIT_K", 1)
    if cfg["path"] != "tc" or split <= 1:
        return 0, 0
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(n_out, cfg["BLOCK_N"])
    return tiles * split * cfg["BLOCK_M"] * cfg["BLOCK_N"] * (2 if has_act else 1), tiles


def gemv_workspace(calls, dtype: torch.dtype, device, tuning: Tuning | None = None) -> GemvWorkspace | None:
    """The workspace for fused_gemv calls given as (M, n_out, K, has_act, has_norm) tuples with the
    launcher's own configs, or None when none of them splits K."""
    device = torch.device(device)
    t = tuning or DEFAULT_TUNING
    need = [_split_need(default_config(M, n, K, dtype, act, device, None, norm, t.gemv_max_m, t.split_k), M, n, act)
            for M, n, K, act, norm in calls]
    elems, tiles = max(e for e, _ in need), max(t for _, t in need)
    return GemvWorkspace(elems, tiles, device) if tiles else None


# ---------------------------------------------------------------------------------------- launcher
def check_operands(x, N: int, act, bias, norm_weight, residual, res_scale, out) -> tuple[int, torch.Tensor]:
    """The operands around an (N, K) weight (fused_gemv and quant_gemv): (n_out, out), `out` allocated if None."""
    M, K = x.shape
    _check_2d("x", x, (M, K))
    if act is not None and N % 2:
        raise ValueError("packed gate|up weight must have an even number of rows")
    n_out = N // 2 if act is not None else N
    if bias is not None:
        _check_2d("bias", bias, (N,))
    if norm_weight is not None:
        _check_2d("norm_weight", norm_weight, (K,))
    if residual is not None:
        _check_2d("residual", residual, (M, n_out), x.dtype)
    if res_scale is not None and residual is None:
        raise ValueError("res_scale scales what is added to residual: give residual too")
    if out is None:
        out = torch.empty((M, n_out), dtype=x.dtype, device=x.device)
    else:
        _check_2d("out", out, (M, n_out), x.dtype)
    return n_out, out


def _check_2d(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype | None = None) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.numel() > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")


def fused_gemv(x: torch.Tensor, weight: torch.Tensor, *, bias: torch.Tensor | None = None,
               norm_weight: torch.Tensor | None = None, eps: float = 1e-6, norm_mode: int = 0,
               norm_offset: float = 0.0, act: str | None = None, residual: torch.Tensor | None = None,
               out: torch.Tensor | None = None, config: dict | None = None,
               res_scale: float | None = None, workspace: GemvWorkspace | None = None,
               tuning: Tuning | None = None) -> torch.Tensor:
    """out (M, N_out) = [residual +] epilogue(norm(x) @ weight^T [+ bias]) [* res_scale]; see the module
    docstring (res_scale only with residual: Granite's `residual + y * residual_multiplier`).

    x (M, K) with contiguous last dim (row stride allowed); weight (N, K) contiguous, N = 2*N_out
    for act in {"silu_mul", "gelu_tanh_mul"} (rows [gate; up]). `out` may be `residual` (in-place
    residual-stream update). No host sync, no allocation when `out` is given. `config` overrides
    the launch heuristic: keys path ("gemv"|"tc"), BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages,
    SPLIT_K (tc only; > 1 needs `workspace`). Without a workspace the heuristic's split is not used
    (one program per tile); the decode step passes one (gemv_workspace). `tuning`: the launch knobs
    (PDL, the GEMV/tensor-core switch, split-K); results do not depend on it."""
    if act not in _ACTS:
        raise ValueError(f"act must be one of {list(_ACTS)}, got {act!r}")
    check_norm_mode(norm_mode)
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError("x must be (M, K) and weight (N, K)")
    M, K = x.shape
    N = weight.shape[0]
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {x.dtype}")
    _check_2d("weight", weight, (N, K), x.dtype)
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous (nn.Linear layout)")
    n_out, out = check_operands(x, N, act, bias, norm_weight, residual, res_scale, out)
    if M == 0 or n_out == 0:
        return out

    path = config.get("path") if config else None
    t = tuning or DEFAULT_TUNING
    cfg = dict(default_config(M, n_out, K, x.dtype, act is not None, x.device, path, norm_weight is not None,
                              t.gemv_max_m, t.split_k))
    if config:
        cfg.update(config)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    split = int(cfg.get("SPLIT_K", 1)) if cfg["path"] == "tc" else 1
    asked = bool(config) and int(config.get("SPLIT_K", 1)) > 1   # by the caller, not the heuristic
    if asked and cfg["path"] != "tc":
        raise ValueError("SPLIT_K applies to the tc path only")
    if asked and workspace is None:
        raise ValueError("SPLIT_K > 1 needs a workspace (kernels.fused_gemv.GemvWorkspace)")
    if split < 1:
        raise ValueError(f"SPLIT_K must be >= 1, got {split}")
    if workspace is None:
        split = 1   # the heuristic's split needs one; without it, one program per tile
    ws_args = (x, x)   # never dereferenced without a split (constexpr SPLIT_K == 1)
    if split > 1:
        elems, tiles = _split_need(dict(cfg, SPLIT_K=split), M, n_out, act is not None)
        if workspace.partials.numel() < elems or workspace.counters.numel() < tiles:
            raise ValueError(f"workspace too small for SPLIT_K={split}: needs {elems} partials and {tiles} "
                             f"counters, has {workspace.partials.numel()} and {workspace.counters.numel()}")
        if workspace.partials.device != x.device:
            raise ValueError(f"workspace on {workspace.partials.device}, x on {x.device}")
        ws_args = (workspace.partials, workspace.counters)
    dummy = x  # pointer for disabled operands; never dereferenced (constexpr flags)
    res = residual if residual is not None else dummy
    args = (x, weight, bias if bias is not None else dummy, norm_weight if norm_weight is not None else dummy,
            res, out, M, n_out, K, x.stride(0), res.stride(0), out.stride(0), float(eps), float(norm_offset),
            float(res_scale) if res_scale is not None else 1.0)
    flags = dict(HAS_BIAS=bias is not None, HAS_NORM=norm_weight is not None, NORM_MODE=int(norm_mode),
                 ACT=_ACTS[act], HAS_RES=residual is not None, HAS_SCALE=res_scale is not None,
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                 BF16_FIX=BF16_RNE_FIX, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                 **pdl_launch_kwargs(x.device, t))
    grid = ((triton.cdiv(n_out, bn), triton.cdiv(M, bm)) if cfg["path"] == "gemv" else
            (triton.cdiv(M, bm), triton.cdiv(n_out, bn), split))
    if cfg["path"] == "gemv":
        launch(_gemv_kernel, grid)(*args, **flags)
    elif cfg["path"] == "tc":
        if min(bm, bn, bk) < 16:
            raise ValueError(f"tc path needs BLOCK_M/N/K >= 16, got {bm}/{bn}/{bk}")
        launch(_tc_kernel, grid)(*args, *ws_args, **flags, SPLIT_K=split, NACC=2 if act is not None else 1,
                                 DOT_UPCAST=DOT_UPCAST, IEEE=DOT_UPCAST or x.dtype == torch.float32)
    else:
        raise ValueError(f"unknown path {cfg['path']!r}")
    return out


# --------------------------------------------------------------------------------------- reference
def _act_reference(g: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu_mul":
        return torch.nn.functional.silu(g)
    return torch.nn.functional.gelu(g, approximate="tanh")


def fused_gemv_reference(x: torch.Tensor, weight: torch.Tensor, *, bias: torch.Tensor | None = None,
                         norm_weight: torch.Tensor | None = None, eps: float = 1e-6, norm_mode: int = 0,
                         norm_offset: float = 0.0, act: str | None = None,
                         residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                         res_scale: float | None = None) -> torch.Tensor:
    """Pure-torch specification of `fused_gemv` (same cast points; `out` may be `residual`)."""
    dt = x.dtype
    h = x if norm_weight is None else norm_reference(x, norm_weight, eps, norm_mode, norm_offset)
    acc = h.float() @ weight.float().t()                      # fp32 accumulation
    if bias is not None:
        acc = acc + bias.float()
    y = acc.to(dt)                                            # one rounding: GEMM + bias epilogue
    if act is not None:
        n_out = weight.shape[0] // 2
        g, u = y[:, :n_out], y[:, n_out:]
        # HF: act_fn(gate_proj(x)) * up_proj(x), each op materialised in the model dtype.
        y = (_act_reference(g.float(), act).to(dt).float() * u.float()).to(dt)
    if res_scale is not None:
        y = (y.float() * res_scale).to(dt)                    # HF (Granite): y * residual_multiplier
    if residual is not None:
        y = (residual.float() + y.float()).to(dt)             # HF: residual + o_proj(x)
    if out is not None:
        out.copy_(y)
        return out
    return y
