"""Single-token (decode) attention over the static KV cache, GQA, flash-decoding style.

One program per (token b, kv head g, split s) handles all G = n_heads // n_kv_heads query heads that
share kv head g, so each K/V tile is read from memory once per group instead of once per query head
(what HF's repeat_kv costs). Long caches are split along the sequence so that small batches still fill
the GPU; the per-split partials (m, l, acc) are merged in fp32 by a second tiny kernel.

Graph safety: the grid and all constexprs depend only on shapes; kv_lens, the padding mask and the
window bounds are read on the device, and each program loops only up to its row's kv_len (never over
the whole cache). The split count is a pure function of shapes (`default_num_splits`); each split takes
an equal, BLOCK_S-aligned share of [lo, kv_len) computed on the device, and splits that start past
kv_len write an empty partial (m=-inf, l=0, acc=0).
"""
from __future__ import annotations

import torch

from ._common import (DOT_UPCAST, Tuning, interpret_mode, launch, next_pow2, num_sms, pdl_launch_kwargs,
                      require, tl, triton)

if triton is not None:
    from ._common import pdl_wait
    from ._common import rne_bf16 as _rne_bf16

# One BLOCK_S tile per split at batch 1: on the H100 a split's time is the latency of its dependent
# load -> dot -> softmax -> load -> dot chain, not bytes, so short splits win (ctx 300, batch 1: 16
# splits 4.7 us vs 1 split 11.3 us); the partial write is ~2 KB per (token, kv head, split).
MIN_SPLIT_LEN = 64
MAX_SPLITS = 128

if triton is not None:

    @triton.jit
    def _attn_split_kernel(
        q_ptr, stride_qm, stride_qh,
        k_ptr, v_ptr, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        kv_lens_ptr, valid_ptr, stride_valid,
        out_ptr, stride_om,
        wm_ptr, wl_ptr, wacc_ptr, stride_wb, stride_wh, stride_ab, stride_ah, stride_as,
        scale, softcap, window, sink_ptr,
        G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_S: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HAS_WINDOW: tl.constexpr, IEEE_DOT: tl.constexpr, FIX_BF16: tl.constexpr, USE_PDL: tl.constexpr,
        HAS_SINKS: tl.constexpr,
    ):
        pdl_wait(USE_PDL)
        b = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        s = tl.program_id(2)
        DT = out_ptr.dtype.element_ty

        gi = tl.arange(0, G_PAD)
        d = tl.arange(0, BLOCK_D)
        gmask = gi < G
        dmask = d < HEAD_DIM
        heads = g * G + gi

        q = tl.load(q_ptr + b * stride_qm + heads[:, None] * stride_qh + d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)

        kv_len = tl.load(kv_lens_ptr + b).to(tl.int32)
        lo = kv_len * 0
        if HAS_WINDOW:
            lo = tl.maximum(kv_len - window, 0)
        # Equal BLOCK_S-aligned shares of the live range: balances splits for any kv_len while the
        # number of splits stays a shape constant.
        chunk = tl.cdiv(tl.cdiv(kv_len - lo, NUM_SPLITS), BLOCK_S) * BLOCK_S
        s_lo = lo + s * chunk
        s_hi = tl.minimum(s_lo + chunk, kv_len)

        k_base = k_ptr + b * stride_kb + g.to(tl.int64) * stride_kh
        v_base = v_ptr + b * stride_vb + g.to(tl.int64) * stride_vh
        valid_base = valid_ptr + b * stride_valid

        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
        if IEEE_DOT:
            q = q.to(tl.float32)

        for start in range(s_lo, s_hi, BLOCK_S):
            offs = start + tl.arange(0, BLOCK_S)
            in_range = offs < s_hi
            kv_mask = in_range[:, None] & dmask[None, :]
            ok = tl.load(valid_base + offs, mask=in_range, other=0) != 0
            ok = ok & in_range
            k = tl.load(k_base + offs[:, None].to(tl.int64) * stride_ks + d[None, :], mask=kv_mask, other=0.0)
            # Padding slots may hold garbage (even NaN) in a reused static cache: p = 0 there, but
            # 0 * NaN would still poison the PV dot, so masked V rows are zeroed. A select after the
            # load, not a load mask: the V load then need not wait for the `valid` load.
            v = tl.load(v_base + offs[:, None].to(tl.int64) * stride_vs + d[None, :], mask=kv_mask, other=0.0)
            v = tl.where(ok[:, None], v, 0.0)

            if IEEE_DOT:
                qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = qk * scale
            if HAS_SOFTCAP:
                # tanh via exp: libdevice tanh is not reachable from the interpreter; this form is
                # stable for large |x| (exp overflows to inf -> +-1).
                t = qk / softcap
                qk = softcap * (1.0 - 2.0 / (tl.exp(2.0 * t) + 1.0))
            qk = tl.where(ok[None, :], qk * 1.4426950408889634, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            # A row with nothing valid yet keeps m=-inf; subtract 0 there so exp2 gives 0, not NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(qk - m_sub[:, None])
            alpha = tl.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            # Like FlashAttention: p is rounded to the model dtype for the PV dot, l keeps fp32 p.
            if FIX_BF16:
                pd = _rne_bf16(p).to(DT)
            else:
                pd = p.to(DT)
            if IEEE_DOT:
                pv = tl.dot(pd.to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(pd, v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        if NUM_SPLITS == 1:
            if HAS_SINKS:   # gpt-oss: one more logit per head in the denominator, with no value
                s2 = tl.load(sink_ptr + heads, mask=gmask, other=0.0).to(tl.float32) * 1.4426950408889634
                m_new = tl.maximum(m_i, s2)
                alpha = tl.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.exp2(s2 - m_new)
                acc = acc * alpha[:, None]
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no valid position -> acc = 0 -> 0
            if FIX_BF16:
                o = _rne_bf16(o)
            tl.store(out_ptr + b * stride_om + heads[:, None] * HEAD_DIM + d[None, :], o.to(DT),
                     mask=gmask[:, None] & dmask[None, :])
        else:
            wrow = b * stride_wb + heads * stride_wh + s
            tl.store(wm_ptr + wrow, m_i, mask=gmask)
            tl.store(wl_ptr + wrow, l_i, mask=gmask)
            arow = b * stride_ab + heads[:, None] * stride_ah + s * stride_as + d[None, :]
            tl.store(wacc_ptr + arow, acc, mask=gmask[:, None] & dmask[None, :])

    @triton.jit
    def _attn_combine_kernel(
        wm_ptr, wl_ptr, wacc_ptr, stride_wb, stride_wh, stride_ab, stride_ah, stride_as,
        out_ptr, stride_om, sink_ptr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
        FIX_BF16: tl.constexpr, USE_PDL: tl.constexpr, HAS_SINKS: tl.constexpr,
    ):
        pdl_wait(USE_PDL)
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        DT = out_ptr.dtype.element_ty
        sp = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, BLOCK_D)
        smask = sp < NUM_SPLITS
        dmask = d < HEAD_DIM

        m = tl.load(wm_ptr + b * stride_wb + h * stride_wh + sp, mask=smask, other=float("-inf"))
        l = tl.load(wl_ptr + b * stride_wb + h * stride_wh + sp, mask=smask, other=0.0)
        acc = tl.load(wacc_ptr + b * stride_ab + h * stride_ah + sp[:, None] * stride_as + d[None, :],
                      mask=smask[:, None] & dmask[None, :], other=0.0)
        m_max = tl.max(m, axis=0)
        if HAS_SINKS:   # the sink is one more partial: max s2, denominator 1, no value
            s2 = tl.load(sink_ptr + h).to(tl.float32) * 1.4426950408889634
            m_max = tl.maximum(m_max, s2)
        m_sub = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp2(m - m_sub)  # empty splits: exp2(-inf) = 0
        l_tot = tl.sum(w * l, axis=0)
        if HAS_SINKS:
            l_tot += tl.exp2(s2 - m_sub)
        o = tl.sum(w[:, None] * acc, axis=0) / tl.where(l_tot > 0, l_tot, 1.0)
        if FIX_BF16:
            o = _rne_bf16(o)
        tl.store(out_ptr + b * stride_om + h * HEAD_DIM + d, o.to(DT), mask=dmask)


def default_num_splits(M: int, n_kv_heads: int, S_max: int, sms: int) -> int:
    """Splits per (token, kv head): a pure function of shapes, so graph-safe.

    Aim for ~2 programs per SM (M * n_kv_heads * splits >= 2 * sms), ~4 at batch 1, ~8 at 2-8, so that decode of
    a long cache is not served by a few programs, but never more splits than the cache has
    MIN_SPLIT_LEN-position pieces; caches shorter than two pieces get 1 split and skip the combine kernel.
    H100, kernel alone (benchmarks/results/2026-11-26-h100-s3/attention-long-run10.json and README):
    batch 1, 32 q / 8 kv heads, ctx 32k: 33 -> 66 splits took head_dim 64 from 45.2 to 36.1 us and
    head_dim 128 from 62.8 to 59.9 us; at batch 8 going from 5 to 9 splits cost up to 21%."""
    max_splits = min(MAX_SPLITS, S_max // MIN_SPLIT_LEN)
    if max_splits <= 1:
        return 1
    programs = max(1, M * n_kv_heads)
    # programs per SM: 4 at batch 1; 8 at batch 2-8 (H100 sweep at 32k, kernel alone, 2026-11-26
    # benchmarks/results/2026-11-26-h100-s6/attn-sweep.json: batch 8 Qwen2.5-0.5B 17 -> 34 splits
    # 75.5 -> 61.4 us, Llama-3.1-8B 5 -> 20 splits 562.7 -> 400.5 us); 2 above batch 8 (unmeasured)
    per_sm = 4 if M == 1 else (8 if M <= 8 else 2)
    want = -(-per_sm * sms // programs)
    return max(1, min(max_splits, want))

def attention_workspace(M: int, n_heads: int, head_dim: int, num_splits: int, device) -> tuple:
    """fp32 partials for `num_splits` > 1: (m (M, H, S) log2-domain running max, l (M, H, S) softmax
    denominators, acc (M, H, S, head_dim) unnormalised outputs). Allocate once, outside graph capture."""
    m = torch.empty(M, n_heads, num_splits, dtype=torch.float32, device=device)
    l = torch.empty(M, n_heads, num_splits, dtype=torch.float32, device=device)
    acc = torch.empty(M, n_heads, num_splits, head_dim, dtype=torch.float32, device=device)
    return m, l, acc

def _block_s(block_d: int) -> int:
    # 64 positions x 128 dims of bf16 K and V = 32 KB per iteration: enough bytes in flight per
    # program without spilling the fp32 accumulator of a 16-row group.
    return 64 if block_d <= 128 else 32

def decode_attention(q, k_cache, v_cache, kv_lens, valid, *, scale, out=None, softcap=0.0, window=0,
                     num_splits=None, workspace=None, config=None, sinks=None,
                     tuning: Tuning | None = None) -> torch.Tensor:
    """out[b, h*D:(h+1)*D] = softmax over attended positions p of (q[b,h] . k[b, h//G, p]) * scale, @ v.

    Attended: p < kv_lens[b], valid[b, p] != 0, and p >= kv_lens[b] - window when window > 0.
    Rows with no attended position give 0. See `decode_attention_reference` for the numerics.
    sinks: (n_heads,) per-head logits that join each softmax's denominator with no value (gpt-oss).
    config: launch overrides of the split kernel (BLOCK_S, num_warps, num_stages), for sweeps."""
    require(q.dim() == 3 and k_cache.dim() == 4, "q must be (M, H, D) and the caches (B, KV, S, D)")
    M, n_heads, head_dim = q.shape
    B_max, n_kv, S_max, hd_k = k_cache.shape
    require(hd_k == head_dim and v_cache.shape == k_cache.shape and B_max >= M,
            f"caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit q {tuple(q.shape)}")
    require(n_heads % n_kv == 0, "n_heads must be a multiple of n_kv_heads")
    require(q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1,
            "q and the caches need a unit last stride")
    require(valid.dim() == 2 and valid.shape[0] >= M and valid.shape[1] >= S_max and valid.stride(1) == 1,
            f"valid must be (>= {M}, >= {S_max}) with a unit last stride, got {tuple(valid.shape)}")
    require(kv_lens.shape[0] >= M, "kv_lens needs a row per token")
    if valid.dtype == torch.bool:
        valid = valid.view(torch.int8)  # same bytes; keeps the pointer type a plain int8
    G = n_heads // n_kv
    if out is None:
        out = torch.empty(M, n_heads * head_dim, dtype=q.dtype, device=q.device)
    require(out.shape[0] >= M and out.shape[1] == n_heads * head_dim and out.stride(1) == 1 and out.dtype == q.dtype,
            f"out must be (>= {M}, {n_heads * head_dim}) of {q.dtype} with a unit last stride")
    require(sinks is None or (sinks.dim() == 1 and sinks.shape[0] == n_heads and sinks.is_contiguous()
                              and sinks.device == q.device), f"sinks must be a contiguous ({n_heads},) tensor on {q.device}")
    if M == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(M, n_kv, S_max, num_sms(q.device))
    num_splits = int(num_splits)
    require(num_splits >= 1, f"num_splits must be >= 1, got {num_splits}")

    if num_splits > 1:
        if workspace is None:
            workspace = attention_workspace(M, n_heads, head_dim, num_splits, q.device)
        require(len(workspace) == 3, "workspace must be what attention_workspace returns")
        wm, wl, wacc = workspace
        require(wm.shape[0] >= M and tuple(wm.shape[1:]) == (n_heads, num_splits) and wm.stride(2) == 1
                and wl.stride() == wm.stride() and wl.shape == wm.shape
                and wacc.shape[0] >= M and tuple(wacc.shape[1:]) == (n_heads, num_splits, head_dim)
                and wacc.stride(3) == 1 and wm.dtype == wl.dtype == wacc.dtype == torch.float32,
                "workspace does not match attention_workspace(M, n_heads, head_dim, num_splits)")
        ws_strides = (wm.stride(0), wm.stride(1), wacc.stride(0), wacc.stride(1), wacc.stride(2))
    else:
        wm = wl = wacc = out  # never touched with one split
        ws_strides = (0, 0, 0, 0, 0)

    block_d = max(16, next_pow2(head_dim))
    fix_bf16 = interpret_mode() and q.dtype == torch.bfloat16
    ieee = DOT_UPCAST or q.dtype == torch.float32
    pdl = pdl_launch_kwargs(q.device, tuning)
    cfg = dict(BLOCK_S=_block_s(block_d), num_warps=4, num_stages=2)
    if config:
        unknown = set(config) - set(cfg)
        require(not unknown, f"unknown decode_attention config keys {sorted(unknown)}")
        cfg.update(config)
    launch(_attn_split_kernel, (M, n_kv, num_splits))(
        q, q.stride(0), q.stride(1),
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        kv_lens, valid, valid.stride(0),
        out, out.stride(0),
        wm, wl, wacc, *ws_strides,
        float(scale), float(softcap) if softcap else 1.0, int(window), sinks if sinks is not None else out,
        G=G, G_PAD=max(16, next_pow2(G)), HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=cfg["BLOCK_S"],
        NUM_SPLITS=num_splits, HAS_SOFTCAP=bool(softcap and softcap > 0), HAS_WINDOW=bool(window and window > 0),
        IEEE_DOT=ieee, FIX_BF16=fix_bf16, HAS_SINKS=sinks is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl,
    )
    if num_splits > 1:
        launch(_attn_combine_kernel, (M, n_heads))(
            wm, wl, wacc, *ws_strides,
            out, out.stride(0), sinks if sinks is not None else out,
            HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits,
            SPLITS_PAD=max(2, next_pow2(num_splits)), FIX_BF16=fix_bf16, HAS_SINKS=sinks is not None,
            num_warps=2 if block_d * num_splits <= 4096 else 4, **pdl,
        )
    return out

# ----------------------------------------------------------------------------- torch reference

def decode_attention_reference(q, k_cache, v_cache, kv_lens, valid, *, scale, out=None, softcap=0.0,
                               window=0, num_splits=None, workspace=None, sinks=None) -> torch.Tensor:
    """What the kernel computes (num_splits/workspace do not change the math), with dt = q.dtype:

    s[p]  = (q.float() . k[p].float()) * scale                 fp32 (bf16 products are exact in fp32)
    s     = softcap * tanh(s / softcap)          if softcap > 0
    s[p]  = -inf where p >= kv_len, valid[b, p] == 0, or (window > 0 and p < kv_len - window)
    e     = exp(s - max(s))                                    fp32
    o     = (e.to(dt).float() @ v.float()) / sum(e)            p rounded for the PV product, fp32 sum
                                                               (V rows of masked positions are not read)
    sinks: max(s) and sum(e) also run over the head's sink logit (a term with no value)
    out   = o.to(dt)                                           0 for rows with nothing attended
    The kernel's online softmax rounds e relative to a running max; that differs from this only in the
    bf16 rounding of e (a few ulp of e, then averaged)."""
    M, n_heads, D = q.shape
    B_max, n_kv, S, _ = k_cache.shape
    G = n_heads // n_kv
    dt = q.dtype
    k = k_cache[:M].float().repeat_interleave(G, dim=1)  # (M, H, S, D)
    v = v_cache[:M].float().repeat_interleave(G, dim=1)
    s = torch.einsum("mhd,mhsd->mhs", q.float(), k) * scale
    if softcap and softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(S, device=q.device)[None, :]
    lens = kv_lens[:M].long()[:, None]
    ok = (pos < lens) & (valid[:M, :S] != 0)
    if window and window > 0:
        ok = ok & (pos >= lens - window)
    s = s.masked_fill(~ok[:, None, :], float("-inf"))
    mx = s.amax(-1, keepdim=True)
    if sinks is not None:
        sk = sinks.float()[None, :, None]
        mx = torch.maximum(mx, sk)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(s - mx)
    den = e.sum(-1, keepdim=True)
    if sinks is not None:
        den = den + torch.exp(sk - mx)
    v = v.masked_fill(~ok[:, None, :, None], 0.0)  # masked slots are never read (may hold NaN)
    o = torch.einsum("mhs,mhsd->mhd", e.to(dt).float(), v) / torch.where(den > 0, den, torch.ones_like(den))
    o = o.to(dt).reshape(M, n_heads * D)
    if out is not None:
        out[:M].copy_(o)
        return out
    return o
