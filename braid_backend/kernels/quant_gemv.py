"""`fused_gemv` on quantized weights: the weight stays quantized in memory and is dequantised in the load
path (fp32 dequantised values, fp32 accumulation); bf16/fp16/fp32 activations are never quantized.

Contract (the integration point; everything else is fused_gemv's, see fused_gemv.py):
  quant_gemv(x, qw, *, bias, norm_weight, eps, norm_mode, norm_offset, act, residual, out, config,
             res_scale, workspace) == quant_gemv_reference(...) == fused_gemv_reference(x, dequantize(qw), ...)
  i.e. the same RMSNorm prologue, bias, act(gate)*up and residual / res_scale epilogues and cast points,
  with W = dequantize(qw) (fp32: data * scale exactly as below; only the fp32 summation order differs).
  For act, qw holds [gate; up] rows (concat_quant). No host sync, no allocation when `out` (and, for a
  split K, `workspace`: fused_gemv.GemvWorkspace, sized by quant_gemv_workspace) are given.
QuantWeight formats (dequantised value of element (n, k)):
  fp8_block   data (N, K) e4m3 (float8_e4m3fn or its uint8 view); scale (ceil(N/bn), ceil(K/bk)) fp32
              (`weight_scale_inv` of transformers' FP8Linear, block (bn, bk) = (128, 128)): w = fp8 * s[n//bn, k//bk]
  fp8_channel data as above; scale (N, 1): w = fp8 * s[n]      (compressed-tensors float-quantized, channel)
  fp8_tensor  data as above; scale (1, 1): w = fp8 * s         (compressed-tensors float-quantized, tensor)
  int4        data (N, K/8) int32, element k in bits 4*(k%8).. of word k//8, stored as q + 8 (q in [-8, 7]);
              scale (N, K/g) any float dtype; zero_point None (symmetric: w = q * s[n, k//g]) or (ceil(N/8), K/g)
              int32 packed along N (row n in bits 4*(n%8).. of word n//8, stored z + 8): w = (q - z) * s
              (compressed-tensors pack-quantized, 0.20 `pack_to_int32` / `unpack_from_int32`).
  int4 + lut  a 16-entry fp32 table (bitsandbytes NF4 / FP4: the Params4bit bytes viewed as int32 (N, K/8), the
              first element of each byte in its high nibble; scale = the absmax per block of g, double
              quantisation already undone): w = lut[nibble] * s[n, k//g]. The tc path splits each table value
              into two 16-bit parts (two dots), so it stays within ~2^-16 of the fp32 product.
Paths: "gemv" (few rows: each program streams BLOCK_N rows over K, fp32 FMAs; int4 sums a word's 8 nibbles
  before the per-group scale) and "tc" (tl.dot on dequantised (q - z) / fp8 tiles in the activation dtype, which
  hold them exactly; the per-K-block scale multiplies each tile's fp32 dot; SPLIT_K like fused_gemv).
FP8 decode: FP8_HW (default on the GPU) bitcasts to tl.float8e4nv and converts in hardware; otherwise (the
  interpreter default) the e4m3 bits are decoded with integer ops into fp32 bits, exact for every finite value.
`quant_linear_prefill` runs long x (T, K) through the tc path (no dense weight), or dequantises into a
  caller-owned scratch buffer then does a dense matmul.
"""
from __future__ import annotations

import functools

import torch

from ._common import (BF16_RNE_FIX, DOT_UPCAST, Tuning, check_norm_mode, interpret_mode, launch, next_pow2,
                      num_sms, pdl_launch_kwargs, require, tl, triton)
from .fused_gemv import (_ACTS, GemvWorkspace, _check_2d, _split_k, _split_need, check_operands,
                         fused_gemv_reference)
from .quant_layout import (FORMATS, QuantWeight, concat_quant, dequantize, pack_int4,  # noqa: F401 (the public names)
                           unpack_int4)

if triton is not None:
    from ._common import apply_norm, pdl_wait, round_to
    from .fused_gemv import _epilogue, _finish_tile, _row_rsqrt

_SMODE = {"fp8_tensor": 0, "fp8_channel": 1, "fp8_block": 2, "int4": 3}


# ----------------------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _fp8_decode(b, FP8_HW: tl.constexpr):
        """uint8 e4m3 bits -> fp32. Integer path: sign | exp,mantissa moved into fp32's bits, times 2^120
        (rebias 7 -> 127; e == 0 lands on fp32 subnormals, exact); the NaN codes are never written."""
        if FP8_HW:
            v = b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            i = b.to(tl.int32)
            v = (((i & 0x80) << 24) | ((i & 0x7F) << 20)).to(tl.float32, bitcast=True) * 1.329227995784916e36
        return v

    @triton.jit
    def _int4_minus_z(words, shift, zf):
        """(nibble - z) as exact fp32: the nibble goes into the mantissa of 2^23, zf = 2^23 + z."""
        return (((words >> shift) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zf

    @triton.jit
    def _nib_val(words, i, zf, lut_ptr, LUT: tl.constexpr):
        """Element i (0..7) of each int32 word as fp32: nibble - z (exact), or with LUT the table's value of the
        nibble (bitsandbytes order: element 2j in the high nibble of byte j)."""
        if LUT:   # (one return per helper: Triton compiles the statements after a constexpr branch's return too)
            v = tl.load(lut_ptr + ((words >> ((i + 1 - 2 * (i % 2)) * 4)) & 0xF))
        else:
            v = _int4_minus_z(words, i * 4, zf)
        return v

    @triton.jit
    def _dot(h, w, acc, IEEE: tl.constexpr):
        if IEEE:
            acc = tl.dot(h, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
        return acc

    @triton.jit
    def _zero_f(z_ptr, rows, gidx, stride_z, mask, ASYM: tl.constexpr):
        """2^23 + z per (row, group) (z = the stored nibble; 8 for symmetric)."""
        if ASYM:
            zw = tl.load(z_ptr + (rows // 8).to(tl.int64) * stride_z + gidx, mask=mask, other=0)
            zn = (zw >> ((rows % 8) * 4)) & 0xF
        else:
            zn = rows * 0 + gidx * 0 + 8
        return (zn | 0x4B000000).to(tl.float32, bitcast=True)

    @triton.jit
    def _h_tile(x_rows, nw_ptr, k, K, mask_m, r, norm_offset, HAS_NORM: tl.constexpr, NORM_MODE: tl.constexpr,
                DT: tl.constexpr, BF16_FIX: tl.constexpr):
        mk = k < K
        h = tl.load(x_rows + k, mask=mask_m & mk, other=0.0).to(tl.float32)
        if HAS_NORM:
            wf = tl.load(nw_ptr + k, mask=mk, other=0.0).to(tl.float32) + norm_offset
            h = apply_norm(h, r, wf, NORM_MODE, DT, BF16_FIX)
        return h

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, nw_ptr, res_ptr, out_ptr,
        M, N_OUT, K, stride_xm, stride_rm, stride_om, stride_s, stride_z, eps, norm_offset, res_scale,
        HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, NORM_MODE: tl.constexpr, ACT: tl.constexpr,
        HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, SMODE: tl.constexpr, BSN: tl.constexpr,
        BSK: tl.constexpr, ASYM: tl.constexpr, LUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, BF16_FIX: tl.constexpr, FP8_HW: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        DT = x_ptr.dtype.element_ty
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m3 = (offs_m < M)[:, None, None]
        mask_n3 = (offs_n < N_OUT)[None, :, None]
        rows_g = offs_n[None, :, None]
        rows_u = rows_g + N_OUT
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None, None] * stride_xm
        pdl_wait(USE_PDL)
        r = tl.zeros((BLOCK_M,), tl.float32)
        if HAS_NORM:
            r = _row_rsqrt(x_ptr, offs_m, M, K, stride_xm, eps, BLOCK_M, BLOCK_K)
        r3 = r[:, None, None]
        if SMODE == 3:   # int4: BLOCK_K counts words; each word's 8 nibbles share one group
            KW = K // 8
            offs_j = tl.arange(0, BLOCK_K)
            acc_g = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
            for j0 in range(0, KW, BLOCK_K):
                j = (j0 + offs_j)[None, None, :]
                mj = mask_n3 & (j < KW)
                gidx = (j * 8) // BSK
                wg = tl.load(w_ptr + rows_g.to(tl.int64) * KW + j, mask=mj, other=0)
                zg = _zero_f(z_ptr, rows_g, gidx, stride_z, mj, ASYM)
                sg = tl.load(s_ptr + rows_g.to(tl.int64) * stride_s + gidx, mask=mj, other=0.0).to(tl.float32)
                if ACT != 0:
                    wu = tl.load(w_ptr + rows_u.to(tl.int64) * KW + j, mask=mj, other=0)
                    zu = _zero_f(z_ptr, rows_u, gidx, stride_z, mj, ASYM)
                    su = tl.load(s_ptr + rows_u.to(tl.int64) * stride_s + gidx, mask=mj, other=0.0).to(tl.float32)
                pg = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
                pu = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
                for i in tl.static_range(8):
                    h = _h_tile(x_rows, nw_ptr, j * 8 + i, K, mask_m3, r3, norm_offset, HAS_NORM, NORM_MODE, DT,
                                BF16_FIX)
                    pg += h * _nib_val(wg, i, zg, z_ptr, LUT)
                    if ACT != 0:
                        pu += h * _nib_val(wu, i, zu, z_ptr, LUT)
                acc_g += pg * sg
                if ACT != 0:
                    acc_u += pu * su
        else:
            offs_k = tl.arange(0, BLOCK_K)
            acc_g = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
            # fp8_block: BLOCK_N divides BSN and N_OUT % BSN == 0 with act, so one scale row per tile
            sg_row = s_ptr + (pid_n * BLOCK_N // BSN) * stride_s
            su_row = s_ptr + ((pid_n * BLOCK_N + N_OUT) // BSN) * stride_s
            for k0 in range(0, K, BLOCK_K):
                k = (k0 + offs_k)[None, None, :]
                mk = mask_n3 & (k < K)
                h = _h_tile(x_rows, nw_ptr, k, K, mask_m3, r3, norm_offset, HAS_NORM, NORM_MODE, DT, BF16_FIX)
                wg = _fp8_decode(tl.load(w_ptr + rows_g.to(tl.int64) * K + k, mask=mk, other=0), FP8_HW)
                if SMODE == 2:   # the reference's own product fp8 * scale, per element
                    wg = wg * tl.load(sg_row + k // BSK, mask=k < K, other=0.0).to(tl.float32)
                acc_g += h * wg
                if ACT != 0:
                    wu = _fp8_decode(tl.load(w_ptr + rows_u.to(tl.int64) * K + k, mask=mk, other=0), FP8_HW)
                    if SMODE == 2:
                        wu = wu * tl.load(su_row + k // BSK, mask=k < K, other=0.0).to(tl.float32)
                    acc_u += h * wu
        yg = tl.sum(acc_g, axis=2)
        yu = tl.sum(acc_u, axis=2)
        if SMODE < 2:   # per-tensor / per-channel scale: once per output
            mn = offs_n < N_OUT
            yg = yg * tl.load(s_ptr + offs_n * stride_s * SMODE, mask=mn, other=0.0).to(tl.float32)[None, :]
            if ACT != 0:
                yu = yu * tl.load(s_ptr + (offs_n + N_OUT) * stride_s * SMODE, mask=mn, other=0.0).to(tl.float32)[None, :]
        _epilogue(yg, yu, offs_m, offs_n, M, N_OUT, b_ptr, res_ptr, stride_rm, out_ptr, stride_om, res_scale,
                  HAS_BIAS, ACT, HAS_RES, HAS_SCALE, BF16_FIX)

    @triton.jit
    def _w_tile(w_ptr, s_ptr, z_ptr, cols, k, K, k_hi, mask_n, stride_s, stride_z, SMODE: tl.constexpr,
                BSN: tl.constexpr, BSK: tl.constexpr, ASYM: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_N: tl.constexpr, OP_DT: tl.constexpr, FP8_HW: tl.constexpr, LUT: tl.constexpr):
        """W^T tile (BLOCK_K, BLOCK_N) in the dot dtype (exact: fp8 values / small integers) and its (1, BLOCK_N)
        fp32 scale for this K block (1 where the scale is applied after the loop)."""
        c64 = cols.to(tl.int64)
        if SMODE == 3:
            KW = K // 8
            j = k // 8 + tl.arange(0, BLOCK_K // 8)                          # this tile's words
            words = tl.load(w_ptr + c64 * KW + j[:, None], mask=mask_n, other=0)    # (BK/8, BN)
            gidx = k // BSK
            zf = _zero_f(z_ptr, cols, gidx, stride_z, mask_n, ASYM)                  # (1, BN)
            i = tl.arange(0, 8)[None, :, None]
            if LUT:   # the table's values; _tc_kernel adds the low part (_lut_lo)
                q = tl.load(z_ptr + ((words[:, None, :] >> ((i + 1 - 2 * (i % 2)) * 4)) & 0xF))
            else:
                q = (((words[:, None, :] >> (i * 4)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zf[:, None, :]
            w = tl.reshape(q, (BLOCK_K, BLOCK_N))
            s = tl.load(s_ptr + c64 * stride_s + gidx, mask=mask_n, other=0.0).to(tl.float32)
            if not LUT:
                w = w.to(OP_DT)
        else:
            kk = k + tl.arange(0, BLOCK_K)
            b = tl.load(w_ptr + c64 * K + kk[:, None], mask=mask_n & (kk < k_hi)[:, None], other=0)
            w = _fp8_decode(b, FP8_HW).to(OP_DT)
            s = tl.full((1, BLOCK_N), 1.0, tl.float32)
            if SMODE == 2:
                s = tl.load(s_ptr + (cols // BSN) * stride_s + k // BSK, mask=mask_n, other=0.0).to(tl.float32)
        return w, s

    @triton.jit
    def _tile_dot(h, w, OP_DT: tl.constexpr, IEEE: tl.constexpr, LUT: tl.constexpr):
        """h @ w in fp32; a table-valued w (fp32) as its OP_DT part plus the rest (two dots: ~2^-16 of exact)."""
        acc = tl.zeros((h.shape[0], w.shape[1]), tl.float32)
        if LUT:
            hi = w.to(OP_DT)
            acc = _dot(h, hi, acc, IEEE)
            acc = _dot(h, (w - hi.to(tl.float32)).to(OP_DT), acc, IEEE)
        else:
            acc = _dot(h, w, acc, IEEE)
        return acc

    @triton.jit
    def _tc_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, nw_ptr, res_ptr, out_ptr,
        M, N_OUT, K, stride_xm, stride_rm, stride_om, stride_s, stride_z, eps, norm_offset, res_scale,
        ws_ptr, cnt_ptr,
        HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, NORM_MODE: tl.constexpr, ACT: tl.constexpr,
        HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, SMODE: tl.constexpr, BSN: tl.constexpr,
        BSK: tl.constexpr, ASYM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, NACC: tl.constexpr, BF16_FIX: tl.constexpr,
        FP8_HW: tl.constexpr, DOT_UPCAST: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr,
        LUT: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        k_lo = 0
        k_hi = K
        if SPLIT_K > 1:   # whole BLOCK_K tiles per split (and so whole scale blocks / groups)
            k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
            k_lo = tl.program_id(2) * k_chunk
            k_hi = tl.minimum(k_lo + k_chunk, K)
        DT = x_ptr.dtype.element_ty
        OP_DT = tl.float32 if DOT_UPCAST else DT
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = (offs_m < M)[:, None]
        mask_n = (offs_n < N_OUT)[None, :]
        cols_g = offs_n[None, :]
        cols_u = cols_g + N_OUT
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        pdl_wait(USE_PDL)
        r = tl.zeros((BLOCK_M, 1), tl.float32)
        if HAS_NORM:
            r = _row_rsqrt(x_ptr, offs_m, M, K, stride_xm, eps, BLOCK_M, BLOCK_K)[:, None]
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = (k0 + tl.arange(0, BLOCK_K))[None, :]
            h = _h_tile(x_rows, nw_ptr, kk, k_hi, mask_m, r, norm_offset, HAS_NORM, NORM_MODE, DT, BF16_FIX)
            h = h.to(OP_DT)
            wg, sg = _w_tile(w_ptr, s_ptr, z_ptr, cols_g, k0, K, k_hi, mask_n, stride_s, stride_z, SMODE, BSN, BSK,
                             ASYM, BLOCK_K, BLOCK_N, OP_DT, FP8_HW, LUT)
            acc_g += _tile_dot(h, wg, OP_DT, IEEE, LUT) * sg
            if ACT != 0:
                wu, su = _w_tile(w_ptr, s_ptr, z_ptr, cols_u, k0, K, k_hi, mask_n, stride_s, stride_z, SMODE, BSN,
                                 BSK, ASYM, BLOCK_K, BLOCK_N, OP_DT, FP8_HW, LUT)
                acc_u += _tile_dot(h, wu, OP_DT, IEEE, LUT) * su
        if SMODE < 2:
            acc_g = acc_g * tl.load(s_ptr + offs_n * stride_s * SMODE, mask=offs_n < N_OUT, other=0.0).to(tl.float32)[None, :]
            if ACT != 0:
                acc_u = acc_u * tl.load(s_ptr + (offs_n + N_OUT) * stride_s * SMODE, mask=offs_n < N_OUT,
                                        other=0.0).to(tl.float32)[None, :]
        _finish_tile(acc_g, acc_u, pid_m, pid_n, offs_m, offs_n, M, N_OUT, b_ptr, res_ptr, stride_rm, out_ptr,
                     stride_om, res_scale, ws_ptr, cnt_ptr, HAS_BIAS, ACT, HAS_RES, HAS_SCALE, BF16_FIX, SPLIT_K,
                     BLOCK_M, BLOCK_N, NACC)   # fused_gemv's epilogue / split-K protocol

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_s, stride_z, SMODE: tl.constexpr,
                        BSN: tl.constexpr, BSK: tl.constexpr, ASYM: tl.constexpr, LUT: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, FP8_HW: tl.constexpr, BF16_FIX: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None]
        k = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K))[None, :]
        mask = (rows < N) & (k < K)
        r64 = rows.to(tl.int64)
        if SMODE == 3:
            words = tl.load(w_ptr + r64 * (K // 8) + k // 8, mask=mask, other=0)
            w = _nib_val(words, k % 8, _zero_f(z_ptr, rows, k // BSK, stride_z, mask, ASYM), z_ptr, LUT)
            w = w * tl.load(s_ptr + r64 * stride_s + k // BSK, mask=mask, other=0.0).to(tl.float32)
        else:
            w = _fp8_decode(tl.load(w_ptr + r64 * K + k, mask=mask, other=0), FP8_HW)
            srow = rows // BSN if SMODE == 2 else rows * SMODE
            scol = k // BSK if SMODE == 2 else k * 0
            w = w * tl.load(s_ptr + srow * stride_s + scol, mask=mask, other=0.0).to(tl.float32)
        ODT = out_ptr.dtype.element_ty
        tl.store(out_ptr + r64 * K + k, round_to(w, ODT, BF16_FIX).to(ODT), mask=mask)


# -------------------------------------------------------------------------------------- heuristics
GEMV_MAX_M = 8            # CPU (interpreter) path switch, as fused_gemv
GPU_GEMV_MAX_M = {"int4": 1, "fp8": 2}   # GPU: above this M the tensor-core tiles dequantise once per tile


@functools.lru_cache(maxsize=4096)
def quant_config(M: int, n_out: int, K: int, dtype: torch.dtype, has_act: bool, device: torch.device, fmt: str,
                 gran: int, path: str | None = None, has_norm: bool = False) -> dict:
    """Launch parameters from shapes, dtype, format and scale granularity `gran` (int4 group, fp8_block k-block;
    0 otherwise) only: CUDA-graph safe. BLOCK_K counts int32 words on the int4 gemv path, elements elsewhere.
    GPU numbers are a design starting point (not yet swept on the H200: benchmarks/kernels/bench_quant_gemv.py)."""
    int4 = fmt == "int4"
    cpu = device.type == "cpu"
    if path is None:
        path = "gemv" if M <= (GEMV_MAX_M if cpu else GPU_GEMV_MAX_M["int4" if int4 else "fp8"]) else "tc"
    bk_tc = min(128, gran) if gran else 128          # a tc K tile lies inside one scale block / group
    if path == "gemv":
        block_m = min(next_pow2(M), GEMV_MAX_M)
        if cpu:
            return dict(path="gemv", BLOCK_M=block_m, BLOCK_N=min(next_pow2(n_out), 64 if int4 else 128),
                        BLOCK_K=min(next_pow2(K // 8 if int4 else K), 32 if int4 else 256), num_warps=4,
                        num_stages=1)
        sms = num_sms(device)
        if int4:   # 16 rows x 64 words (256 B) per tile: 1 x 16-byte load per thread, x shared by 16 rows
            block_n = 16 if n_out >= 2 * 16 * sms else 8
            block_k = max(8, min(4096 // (block_m * block_n), 64, next_pow2(K // 8)))
            stages = 3
        else:      # as fused_gemv's bf16 tiles, with 1-byte weights: 1 KiB of a row per tile
            block_n = 4 if n_out >= 8 * sms else 2
            block_k = max(64, min(4096 // (block_m * block_n), next_pow2(K), 1024))
            stages = 3 if n_out >= 32 * sms else 2
        return dict(path="gemv", BLOCK_M=block_m, BLOCK_N=min(block_n, next_pow2(n_out)), BLOCK_K=block_k,
                    num_warps=4, num_stages=stages)
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    if cpu:
        return dict(path="tc", BLOCK_M=max(16, min(next_pow2(M), 64)), BLOCK_N=min(max(16, next_pow2(n_out)), 64),
                    BLOCK_K=max(16, min(bk_tc, next_pow2(K))), num_warps=4, num_stages=1)
    sms = num_sms(device)
    block_n = 64 if (has_act or triton.cdiv(M, block_m) * triton.cdiv(n_out, 128) < sms) else 128
    cfg = dict(path="tc", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk_tc if dtype != torch.float32 else min(bk_tc, 64),
               num_warps=4 if block_m * block_n <= 2048 else 8, num_stages=3)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(n_out, block_n)
    cfg["SPLIT_K"] = _split_k(tiles, K, cfg["BLOCK_K"], sms, has_norm)
    return cfg


def _gran(qw: QuantWeight) -> int:
    return qw.group_size if qw.format == "int4" else (qw.block[1] if qw.format == "fp8_block" else 0)


def quant_gemv_workspace(calls, dtype: torch.dtype, device) -> GemvWorkspace | None:
    """Workspace for quant_gemv calls given as (M, n_out, K, has_act, has_norm, fmt, gran) tuples with the
    launcher's own configs; None when none of them splits K."""
    device = torch.device(device)
    need = [_split_need(quant_config(M, n, K, dtype, act, device, f, g, None, norm), M, n, act)
            for M, n, K, act, norm, f, g in calls]
    elems, tiles = max(e for e, _ in need), max(t for _, t in need)
    return GemvWorkspace(elems, tiles, device) if tiles else None


# ---------------------------------------------------------------------------------------- launcher
def _fmt_args(qw: QuantWeight):
    """Kernel operands (weight, scale, zero, strides) and format constexprs."""
    smode = _SMODE[qw.format]
    w = qw.data if smode == 3 else qw.data.view(torch.uint8)
    z = qw.zero_point if qw.zero_point is not None else (qw.lut if qw.lut is not None else qw.scale)
    bsn, bsk = qw.block if smode == 2 else (1, qw.group_size if smode == 3 else 1)
    flags = dict(SMODE=smode, BSN=bsn, BSK=bsk, ASYM=qw.zero_point is not None, LUT=qw.lut is not None)
    return (w, qw.scale, z, qw.scale.stride(0), z.stride(0)), flags


def quant_gemv(x: torch.Tensor, qw: QuantWeight, *, bias: torch.Tensor | None = None,
               norm_weight: torch.Tensor | None = None, eps: float = 1e-6, norm_mode: int = 0,
               norm_offset: float = 0.0, act: str | None = None, residual: torch.Tensor | None = None,
               out: torch.Tensor | None = None, config: dict | None = None, res_scale: float | None = None,
               workspace: GemvWorkspace | None = None, tuning: Tuning | None = None) -> torch.Tensor:
    """out (M, N_out) = [residual +] epilogue(norm(x) @ dequantize(qw)^T [+ bias]) [* res_scale]: fused_gemv's
    contract and cast points on a QuantWeight (module docstring). `config` keys as fused_gemv's, plus FP8_HW.
    `tuning`: launch knobs as fused_gemv's (PDL; split_k=False keeps K whole); results do not depend on it."""
    require(isinstance(qw, QuantWeight), "qw must be a QuantWeight")
    require(act in _ACTS, f"act must be one of {list(_ACTS)}, got {act!r}")
    check_norm_mode(norm_mode)
    require(x.dim() == 2, "x must be (M, K)")
    M, K = x.shape
    N, Kw = qw.shape
    require(K == Kw, f"x has K={K}, the weight {Kw}")
    require(x.dtype in (torch.float32, torch.bfloat16, torch.float16), f"unsupported dtype {x.dtype}")
    require(qw.device == x.device, f"weight on {qw.device}, x on {x.device}")
    n_out, out = check_operands(x, N, act, bias, norm_weight, residual, res_scale, out)
    if M == 0 or n_out == 0:
        return out
    path = config.get("path") if config else None
    cfg = dict(quant_config(M, n_out, K, x.dtype, act is not None, x.device, qw.format, _gran(qw), path,
                            norm_weight is not None))
    if config:
        cfg.update(config)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    wargs, fflags = _fmt_args(qw)
    if qw.format == "fp8_block":
        require(cfg["path"] != "gemv" or fflags["BSN"] % bn == 0, f"gemv BLOCK_N {bn} must divide the scale block")
        require(cfg["path"] != "gemv" or act is None or n_out % fflags["BSN"] == 0,
                f"fp8_block gate|up: the gate rows ({n_out}) must be a multiple of the {fflags['BSN']}-row scale block")
    if cfg["path"] == "tc" and fflags["SMODE"] >= 2:
        require(fflags["BSK"] % bk == 0, f"tc BLOCK_K {bk} must divide the scale block / group {fflags['BSK']}")
    split = int(cfg.get("SPLIT_K", 1)) if cfg["path"] == "tc" else 1
    asked = bool(config) and int(config.get("SPLIT_K", 1)) > 1
    require(not asked or cfg["path"] == "tc", "SPLIT_K applies to the tc path only")
    require(not asked or workspace is not None, "SPLIT_K > 1 needs a workspace (kernels.fused_gemv.GemvWorkspace)")
    require(split >= 1, f"SPLIT_K must be >= 1, got {split}")
    if workspace is None or (tuning is not None and not tuning.split_k and not asked):
        split = 1
    dummy = x
    res = residual if residual is not None else dummy
    args = (x, *wargs[:3], bias if bias is not None else dummy, norm_weight if norm_weight is not None else dummy,
            res, out, M, n_out, K, x.stride(0), res.stride(0), out.stride(0), *wargs[3:], float(eps),
            float(norm_offset), float(res_scale) if res_scale is not None else 1.0)
    flags = dict(HAS_BIAS=bias is not None, HAS_NORM=norm_weight is not None, NORM_MODE=int(norm_mode),
                 ACT=_ACTS[act], HAS_RES=residual is not None, HAS_SCALE=res_scale is not None, **fflags,
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BF16_FIX=BF16_RNE_FIX,
                 FP8_HW=bool(cfg.get("FP8_HW", not interpret_mode())), num_warps=cfg["num_warps"],
                 num_stages=cfg["num_stages"], **pdl_launch_kwargs(x.device, tuning))
    if cfg["path"] == "gemv":
        launch(_gemv_kernel, (triton.cdiv(n_out, bn), triton.cdiv(M, bm)))(*args, **flags)
    elif cfg["path"] == "tc":
        require(min(bm, bn, bk) >= 16, f"tc path needs BLOCK_M/N/K >= 16, got {bm}/{bn}/{bk}")
        ws = (x, x)
        if split > 1:
            elems, tiles = _split_need(dict(cfg, SPLIT_K=split), M, n_out, act is not None)
            require(workspace.partials.numel() >= elems and workspace.counters.numel() >= tiles,
                    f"workspace too small for SPLIT_K={split}: needs {elems} partials and {tiles} counters")
            require(workspace.partials.device == x.device, f"workspace on {workspace.partials.device}, x on {x.device}")
            ws = (workspace.partials, workspace.counters)
        launch(_tc_kernel, (triton.cdiv(M, bm), triton.cdiv(n_out, bn), split))(
            *args, *ws, **flags, SPLIT_K=split, NACC=2 if act is not None else 1, DOT_UPCAST=DOT_UPCAST,
            IEEE=DOT_UPCAST or x.dtype == torch.float32)
    else:
        raise ValueError(f"unknown path {cfg['path']!r}")
    return out


# --------------------------------------------------------------------------------- prefill, reference
def dequantize_into(qw: QuantWeight, out: torch.Tensor, fp8_hw: bool | None = None) -> torch.Tensor:
    """Dense (N, K) weight in out.dtype (round-to-nearest of the fp32 dequantised value), in place, one kernel."""
    N, K = qw.shape
    _check_2d("out", out, (N, K))
    require(out.is_contiguous() and out.device == qw.device, "out must be contiguous, on the weight's device")
    wargs, fflags = _fmt_args(qw)
    bn, bk = 32, 128
    launch(_dequant_kernel, (triton.cdiv(N, bn), triton.cdiv(K, bk)))(
        *wargs[:3], out, N, K, *wargs[3:], **fflags, BLOCK_N=bn, BLOCK_K=bk, BF16_FIX=BF16_RNE_FIX,
        FP8_HW=not interpret_mode() if fp8_hw is None else fp8_hw)
    return out


def quant_linear_prefill(x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None,
                         scratch: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """y (..., N) = x (..., K) @ dequantize(qw)^T + bias, for prefill where stock cannot run. Without `scratch`:
    the tc path tiles over all rows (weights stay quantized; no dense copy). With `scratch` ((N, K), x.dtype,
    reused by every layer): dequantise into it, then one dense matmul (rounds W to x.dtype first)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if scratch is not None:
        w = dequantize_into(qw, scratch)
        y = torch.nn.functional.linear(x2, w, bias)
    else:
        cfg = dict(path="tc", BLOCK_M=64 if x2.shape[0] > 32 else 16)
        y = quant_gemv(x2, qw, bias=bias, config=dict(cfg, **(config or {})))
    return y.reshape(*lead, qw.shape[0])


def quant_gemv_reference(x: torch.Tensor, qw: QuantWeight, **kw) -> torch.Tensor:
    """Specification: fused_gemv_reference on the fp32-dequantised weight (same keywords, same cast points)."""
    kw.pop("config", None)
    kw.pop("workspace", None)
    return fused_gemv_reference(x, dequantize(qw), **kw)
