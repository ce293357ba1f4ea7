"""RMSNorm (optionally fused with the residual add that precedes it).

Cast points follow Hugging Face exactly; `rmsnorm_reference` is the specification:
  s  = rnd(x_f32 + residual_f32)               (HF: `residual + hidden` in the model dtype)
  r  = rsqrt(mean(s_f32^2) + eps)              (statistics in fp32)
  norm_mode 0 (Llama/Qwen/Mistral, `weight * hidden.to(input_dtype)`):
       h = rnd( rnd(s_f32 * r) * (w_f32 + norm_offset) )
  norm_mode 1 (Gemma, `(x * r * (1 + w.float())).type_as(x)`):
       h = rnd( s_f32 * r * (w_f32 + norm_offset) )
where rnd = round-to-nearest-even to x.dtype (identity for fp32).
With `add_to` (post-norms, Gemma-2/3: `residual + post_norm(y)`), out = rnd(add_to_f32 + h_f32), one
kernel instead of a norm and an add; out may then be add_to itself (the residual stream, updated in place).
"""
from __future__ import annotations

import torch

from ._common import (BF16_RNE_FIX, Tuning, check_norm_mode, launch, next_pow2, norm_reference, pdl_launch_kwargs,
                      tl, triton)

if triton is not None:
    from ._common import apply_norm, pdl_wait, round_to

MAX_BLOCK_K = 4096  # longer rows are processed in chunks


# ----------------------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _rmsnorm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr,
        K, stride_xm, stride_rm, stride_om,
        eps, norm_offset,
        HAS_RES: tl.constexpr, NORM_MODE: tl.constexpr, BLOCK_K: tl.constexpr,
        BF16_FIX: tl.constexpr, USE_PDL: tl.constexpr, POST_ADD: tl.constexpr = False,
    ):
        pdl_wait(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        DT = out_ptr.dtype.element_ty
        offs = tl.arange(0, BLOCK_K)
        x_row = x_ptr + row * stride_xm
        r_row = res_ptr + row * stride_rm
        o_row = out_ptr + row * stride_om

        # Pass 1: sum of squares of the (rounded) residual sum. Nothing is written here, so pass 2
        # can recompute s from the untouched inputs.
        ss = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs
            mk = k < K
            s = tl.load(x_row + k, mask=mk, other=0.0).to(tl.float32)
            if HAS_RES:
                s = round_to(s + tl.load(r_row + k, mask=mk, other=0.0).to(tl.float32), DT, BF16_FIX)
            ss += s * s
        r = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)

        # Pass 2. Aliasing: residual (and x, when out is x) is read and then overwritten element by
        # element by this same program with the same offsets, so in-place updates are safe; rows
        # never overlap between programs. `out` must not alias `residual` (both are written).
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs
            mk = k < K
            s = tl.load(x_row + k, mask=mk, other=0.0).to(tl.float32)
            if HAS_RES:
                s = round_to(s + tl.load(r_row + k, mask=mk, other=0.0).to(tl.float32), DT, BF16_FIX)
                tl.store(r_row + k, s.to(DT), mask=mk)
            wf = tl.load(w_ptr + k, mask=mk, other=0.0).to(tl.float32) + norm_offset
            h = apply_norm(s, r, wf, NORM_MODE, DT, BF16_FIX)
            if POST_ADD:   # res_ptr is add_to here; read before out (maybe the same row) is written
                h = round_to(tl.load(r_row + k, mask=mk, other=0.0).to(tl.float32) + h, DT, BF16_FIX)
            tl.store(o_row + k, h.to(DT), mask=mk)


# ---------------------------------------------------------------------------------------- launcher
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6, norm_mode: int = 0,
            norm_offset: float = 0.0, residual: torch.Tensor | None = None,
            out: torch.Tensor | None = None, add_to: torch.Tensor | None = None,
            tuning: Tuning | None = None) -> torch.Tensor:
    """RMSNorm of x (M, K) rows, see the module docstring. With `residual` (M, K), s = x + residual
    is written back into `residual` (the new residual stream) and s is normalised. With `add_to`
    (M, K) the normalised rows are added to it (out = add_to + norm(x); out may be add_to).
    `out` may be x itself (in place), never `residual`. No host sync, no allocation if `out` given."""
    check_norm_mode(norm_mode)
    if residual is not None and add_to is not None:
        raise ValueError("residual (added before the norm) and add_to (after it) cannot be combined")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    M, K = x.shape
    if x.stride(1) != 1:
        raise ValueError("x must have a contiguous last dimension")
    if weight.shape != (K,):
        raise ValueError(f"weight must have shape ({K},), got {tuple(weight.shape)}")
    weight = weight.contiguous()
    if residual is not None:
        if residual.shape != x.shape or residual.stride(1) != 1 or residual.dtype != x.dtype:
            raise ValueError("residual must be (M, K), last dim contiguous, same dtype as x")
    if add_to is not None:
        if add_to.shape != x.shape or add_to.stride(1) != 1 or add_to.dtype != x.dtype:
            raise ValueError("add_to must be (M, K), last dim contiguous, same dtype as x")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        if out.shape != x.shape or out.stride(1) != 1 or out.dtype != x.dtype:
            raise ValueError("out must be (M, K), last dim contiguous, same dtype as x")
        if residual is not None and out.data_ptr() == residual.data_ptr():
            raise ValueError("out must not alias residual (both are written)")
    if M == 0:
        return out
    block_k = min(next_pow2(K), MAX_BLOCK_K)
    num_warps = 4 if block_k <= 1024 else 8
    res = residual if residual is not None else (add_to if add_to is not None else x)  # x: dummy
    launch(_rmsnorm_kernel, (M,))(
        x, res, weight, out,
        K, x.stride(0), res.stride(0), out.stride(0),
        float(eps), float(norm_offset),
        HAS_RES=residual is not None, NORM_MODE=int(norm_mode), BLOCK_K=block_k,
        BF16_FIX=BF16_RNE_FIX, POST_ADD=add_to is not None, num_warps=num_warps,
        **pdl_launch_kwargs(x.device, tuning),
    )
    return out


# --------------------------------------------------------------------------------------- reference
def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6, norm_mode: int = 0,
                      norm_offset: float = 0.0, residual: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, add_to: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch specification of `rmsnorm` (same in-place effects on `residual` / `out`)."""
    s = x
    if residual is not None:
        s = (x.float() + residual.float()).to(x.dtype)
    h = norm_reference(s, weight, eps, norm_mode, norm_offset)
    if add_to is not None:   # HF: residual + post_norm(y), in the dtype
        h = (add_to.float() + h.float()).to(x.dtype)
    if residual is not None:
        residual.copy_(s)
    if out is not None:
        out.copy_(h)
        return out
    return h
