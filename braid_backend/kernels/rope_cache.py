"""RoPE (+ optional per-head q/k RMSNorm) on the fused QKV output of one decode step, written
straight into the static KV cache.

Replaces HF's split/view of q_proj|k_proj|v_proj, q_norm/k_norm (Qwen3), apply_rotary_pos_emb and the
cache's index_copy_ with one launch. Cast points follow HF in the model dtype (see the reference), so
in bf16 the kernel reproduces the stock model's rounding, not a "more fp32" variant of it.

Graph safety: every launch parameter depends only on shapes/dtypes; positions and cache slots are read
on the device.
"""
from __future__ import annotations

import torch

from ._common import (BF16_RNE_FIX, Tuning, check_norm_mode, launch, next_pow2, norm_reference, pdl_launch_kwargs,
                      require, tl, triton)

if triton is not None:
    from ._common import pdl_wait, round_to


if triton is not None:

    @triton.jit
    def _norm_pair(x, xp, r, w, wp, NORM_MODE: tl.constexpr, DT: tl.constexpr, FIX_BF16: tl.constexpr):
        if NORM_MODE == 0:
            # Llama/Qwen3 RMSNorm: normalise in fp32, round, then weight * x in the model dtype.
            x = round_to(round_to(x * r, DT, FIX_BF16) * w, DT, FIX_BF16)
            xp = round_to(round_to(xp * r, DT, FIX_BF16) * wp, DT, FIX_BF16)
        else:
            # Gemma-style: the weight is applied in fp32, one rounding at the end.
            x = round_to(x * r * w, DT, FIX_BF16)
            xp = round_to(xp * r * wp, DT, FIX_BF16)
        return x, xp

    @triton.jit
    def _head_norm(x, xp, w_ptr, d, partner, dmask, pmask, eps, norm_offset,
                   HEAD_DIM: tl.constexpr, NORM_MODE: tl.constexpr, DT: tl.constexpr,
                   FIX_BF16: tl.constexpr):
        # x holds the head, xp the rotate_half partner of each element (same values, permuted), so
        # both get the identical per-head statistic.
        r = tl.rsqrt(tl.sum(x * x, axis=0) / HEAD_DIM + eps)
        w = tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32) + norm_offset
        wp = tl.load(w_ptr + partner, mask=pmask, other=0.0).to(tl.float32) + norm_offset
        return _norm_pair(x, xp, r, w, wp, NORM_MODE, DT, FIX_BF16)

    @triton.jit
    def _rope(x, xp, cos, sin, d, HALF: tl.constexpr, ROPE_DIM: tl.constexpr, DT: tl.constexpr,
              FIX_BF16: tl.constexpr):
        # HF: q * cos + rotate_half(q) * sin, each op in the model dtype (three roundings).
        rot = tl.where(d < HALF, -xp, xp)
        y = round_to(round_to(x * cos, DT, FIX_BF16) + round_to(rot * sin, DT, FIX_BF16), DT, FIX_BF16)
        return tl.where(d < ROPE_DIM, y, x)

    @triton.jit
    def _rope_qkv_cache_kernel(
        qkv_ptr, stride_qkv,
        cos_ptr, sin_ptr, stride_cos, stride_sin,
        pos_ptr, slot_ptr,
        kc_ptr, vc_ptr, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        qo_ptr, stride_qo_m, stride_qo_h,
        qn_ptr, kn_ptr, eps, norm_offset,
        N_HEADS: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, HAS_QNORM: tl.constexpr, HAS_KNORM: tl.constexpr,
        NORM_MODE: tl.constexpr, FIX_BF16: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        pdl_wait(USE_PDL)
        b = tl.program_id(0).to(tl.int64)
        hh = tl.program_id(1)
        DT = qo_ptr.dtype.element_ty
        HALF = ROPE_DIM // 2

        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_DIM
        in_rope = d < ROPE_DIM
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        # Outside the rotated dims the partner is never used; don't let it read past the head.
        pmask = dmask & in_rope
        partner = tl.where(pmask, partner, 0)

        pos = tl.load(pos_ptr + b).to(tl.int64)
        cos = tl.load(cos_ptr + pos * stride_cos + d, mask=pmask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos * stride_sin + d, mask=pmask, other=0.0).to(tl.float32)
        row = qkv_ptr + b * stride_qkv

        if hh < N_HEADS:
            src = row + hh * HEAD_DIM
            x = tl.load(src + d, mask=dmask, other=0.0).to(tl.float32)
            xp = tl.load(src + partner, mask=pmask, other=0.0).to(tl.float32)
            if HAS_QNORM:
                x, xp = _head_norm(x, xp, qn_ptr, d, partner, dmask, pmask, eps, norm_offset,
                                   HEAD_DIM, NORM_MODE, DT, FIX_BF16)
            y = _rope(x, xp, cos, sin, d, HALF, ROPE_DIM, DT, FIX_BF16)
            tl.store(qo_ptr + b * stride_qo_m + hh * stride_qo_h + d, y.to(DT), mask=dmask)
        else:
            g = hh - N_HEADS
            slot = tl.load(slot_ptr + b).to(tl.int64)
            src = row + (N_HEADS + g) * HEAD_DIM
            x = tl.load(src + d, mask=dmask, other=0.0).to(tl.float32)
            xp = tl.load(src + partner, mask=pmask, other=0.0).to(tl.float32)
            if HAS_KNORM:
                x, xp = _head_norm(x, xp, kn_ptr, d, partner, dmask, pmask, eps, norm_offset,
                                   HEAD_DIM, NORM_MODE, DT, FIX_BF16)
            y = _rope(x, xp, cos, sin, d, HALF, ROPE_DIM, DT, FIX_BF16)
            kdst = kc_ptr + b * stride_kb + g.to(tl.int64) * stride_kh + slot * stride_ks
            tl.store(kdst + d, y.to(kc_ptr.dtype.element_ty), mask=dmask)
            # v is copied untouched (no float round trip needed, but load/store keeps it exact).
            v = tl.load(src + N_KV * HEAD_DIM + d, mask=dmask, other=0.0)
            vdst = vc_ptr + b * stride_vb + g.to(tl.int64) * stride_vh + slot * stride_vs
            tl.store(vdst + d, v.to(vc_ptr.dtype.element_ty), mask=dmask)


def _check(qkv, cos, sin, positions, slots, k_cache, v_cache, q_out, n_heads, n_kv_heads, head_dim,
           rope_dim, norm_mode):
    M = qkv.shape[0]
    width = (n_heads + 2 * n_kv_heads) * head_dim
    require(qkv.dim() == 2 and qkv.shape[1] >= width and qkv.stride(1) == 1,
            f"qkv must be (M, >= {width}) with a unit last stride, got {tuple(qkv.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        require(t.dim() == 2 and t.shape[1] >= rope_dim and t.stride(1) == 1,
                f"{name} must be (max_pos, >= {rope_dim}) with a unit last stride, got {tuple(t.shape)}")
    require(rope_dim % 2 == 0 and 0 < rope_dim <= head_dim, f"rope_dim must be even and <= head_dim, got {rope_dim}")
    require(positions.shape[0] >= M and slots.shape[0] >= M, "positions and slots need a row per token")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        require(c.dim() == 4 and c.shape[0] >= M and c.shape[1] == n_kv_heads and c.shape[3] == head_dim
                and c.stride(3) == 1,
                f"{name} must be (>= {M}, {n_kv_heads}, S, {head_dim}) with a unit last stride, got {tuple(c.shape)}")
    require(q_out.dim() == 3 and q_out.shape[0] >= M and q_out.shape[1] == n_heads and q_out.shape[2] == head_dim
            and q_out.stride(2) == 1, f"q_out must be (>= {M}, {n_heads}, {head_dim}), got {tuple(q_out.shape)}")
    check_norm_mode(norm_mode)


def rope_qkv_cache_write(qkv, cos, sin, positions, slots, k_cache, v_cache, q_out, *, n_heads, n_kv_heads,
                         head_dim, q_norm_weight=None, k_norm_weight=None, eps=1e-6, norm_mode=0,
                         norm_offset=0.0, rope_dim=None, tuning: Tuning | None = None) -> None:
    """In place: q_out[b] = rope(norm(q_b)); k_cache[b, :, slots[b]] = rope(norm(k_b)); v_cache[...] = v_b.

    See `rope_qkv_cache_write_reference` for the exact arithmetic. One program per (token, head) over
    the n_heads + n_kv_heads heads; a kv-head program writes both k and v of that head."""
    rope_dim = head_dim if rope_dim is None else int(rope_dim)
    _check(qkv, cos, sin, positions, slots, k_cache, v_cache, q_out, n_heads, n_kv_heads, head_dim,
           rope_dim, norm_mode)
    M = qkv.shape[0]
    if M == 0:
        return
    # Unused pointer arguments still need a valid tensor; the kernel never reads them.
    qn = q_norm_weight if q_norm_weight is not None else cos
    kn = k_norm_weight if k_norm_weight is not None else cos
    grid = (M, n_heads + n_kv_heads)
    launch(_rope_qkv_cache_kernel, grid)(
        qkv, qkv.stride(0),
        cos, sin, cos.stride(0), sin.stride(0),
        positions, slots,
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        q_out, q_out.stride(0), q_out.stride(1),
        qn, kn, float(eps), float(norm_offset),
        N_HEADS=n_heads, N_KV=n_kv_heads, HEAD_DIM=head_dim, ROPE_DIM=rope_dim,
        BLOCK_D=max(16, next_pow2(head_dim)),
        HAS_QNORM=q_norm_weight is not None, HAS_KNORM=k_norm_weight is not None,
        NORM_MODE=int(norm_mode), FIX_BF16=BF16_RNE_FIX,
        num_warps=1 if head_dim <= 128 else 2, **pdl_launch_kwargs(qkv.device, tuning),
    )


# ----------------------------------------------------------------------------- torch reference

def _rope_reference(x, cos, sin, rope_dim):
    # x: (M, heads, head_dim) in the model dtype; cos/sin: (M, rope_dim) in the model dtype.
    # Exactly HF's apply_rotary_pos_emb (+ pass-through of dims >= rope_dim as in partial-rotary models).
    xr, xpass = x[..., :rope_dim], x[..., rope_dim:]
    half = rope_dim // 2
    rot = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
    c, s = cos[:, None, :rope_dim].to(x.dtype), sin[:, None, :rope_dim].to(x.dtype)
    return torch.cat(((xr * c) + (rot * s), xpass), dim=-1)


def rope_qkv_cache_write_reference(qkv, cos, sin, positions, slots, k_cache, v_cache, q_out, *, n_heads,
                                   n_kv_heads, head_dim, q_norm_weight=None, k_norm_weight=None, eps=1e-6,
                                   norm_mode=0, norm_offset=0.0, rope_dim=None) -> None:
    """What the kernel computes, in torch, in the model dtype dt (all rounding is torch's own):

    q, k, v = split(qkv row) per head
    optional norm: mode 0: (x.float() * r).to(dt).float() * (w + offset)).to(dt)    (HF Llama/Qwen3)
                   mode 1: (x.float() * r * (w + offset)).to(dt)                     (Gemma)
                   with r = rsqrt(mean(x.float()^2) + eps) over head_dim
    rope: (x * cos) + (rotate_half(x) * sin) in dt on the first rope_dim dims, rest passed through
    q_out[b] = q; k_cache[b, :, slots[b]] = k; v_cache[b, :, slots[b]] = v.
    """
    rope_dim = head_dim if rope_dim is None else int(rope_dim)
    M = qkv.shape[0]
    dt = q_out.dtype
    x = qkv[:, :(n_heads + 2 * n_kv_heads) * head_dim].reshape(M, n_heads + 2 * n_kv_heads, head_dim)
    q = x[:, :n_heads]
    k = x[:, n_heads:n_heads + n_kv_heads]
    v = x[:, n_heads + n_kv_heads:]
    if q_norm_weight is not None:
        q = norm_reference(q, q_norm_weight, eps, norm_mode, norm_offset)
    if k_norm_weight is not None:
        k = norm_reference(k, k_norm_weight, eps, norm_mode, norm_offset)
    pos = positions[:M].long()
    c, s = cos[pos], sin[pos]
    q = _rope_reference(q.to(dt), c, s, rope_dim)
    k = _rope_reference(k.to(dt), c, s, rope_dim)
    q_out[:M].copy_(q)
    bi = torch.arange(M, device=qkv.device)[:, None]
    hi = torch.arange(n_kv_heads, device=qkv.device)[None, :]
    si = slots[:M].long()[:, None]
    k_cache[bi, hi, si] = k.to(k_cache.dtype)
    v_cache[bi, hi, si] = v.to(v_cache.dtype)
