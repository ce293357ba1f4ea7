"""The fused decode step: one token per sequence through every layer, ~6 kernels per layer.

    x = embed(ids)                                   (residual stream, updated in place)
    per layer:  qkv  = rmsnorm(x) @ Wqkv^T (+b)      fused_gemv (norm prologue)
                q, cache[slot] = rope(qkv) (+q/k norm) rope_qkv_cache_write
                a    = attention(q, cache)           decode_attention (split-KV + combine)
                x    = x + a @ Wo^T                  fused_gemv (residual epilogue, in place)
                h    = act(g) * u, [g|u] = rmsnorm(x) @ Wgu^T   fused_gemv (norm + act epilogue)
                x    = x + h @ Wd^T                  fused_gemv (residual epilogue, in place)
    logits = rmsnorm(x) @ Wlm^T

Every tensor it touches is preallocated (DecodeBuffers), so the step can be captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.decode_attention import attention_workspace, decode_attention, default_num_splits
from ..kernels.fused_gemv import fused_gemv
from ..kernels.rope_cache import rope_qkv_cache_write
from .fuse import fuse_linears, unfuse_linears
from .spec import ModelPlan, norm_eps


@dataclass
class FusedLayer:
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None
    w_gu: torch.Tensor
    b_gu: torch.Tensor | None
    plan: object  # LayerPlan
    eps1: float
    eps2: float
    eps_qk: float


class DecodeBuffers:
    """Static per-batch-size tensors of one decode step (inputs, intermediates, logits)."""

    def __init__(self, st: "DecodeState", M: int, max_len: int):
        dev, dt, p = st.device, st.dtype, st.plan
        n_qkv = (p.n_heads + 2 * p.n_kv_heads) * p.head_dim
        self.M, self.max_len = M, max_len
        self.ids = torch.zeros(M, dtype=torch.long, device=dev)
        self.pos = torch.zeros(M, dtype=torch.long, device=dev)
        self.slots = torch.zeros(M, dtype=torch.long, device=dev)
        self.kv_lens = torch.ones(M, dtype=torch.int32, device=dev)
        self.x = torch.zeros(M, p.hidden, dtype=dt, device=dev)
        self.qkv = torch.zeros(M, n_qkv, dtype=dt, device=dev)
        self.q = torch.zeros(M, p.n_heads, p.head_dim, dtype=dt, device=dev)
        self.attn = torch.zeros(M, p.n_heads * p.head_dim, dtype=dt, device=dev)
        self.act = torch.zeros(M, p.intermediate, dtype=dt, device=dev)
        self.logits = torch.zeros(M, st.vocab, dtype=dt, device=dev)
        self.num_splits = default_num_splits(M, p.n_kv_heads, max_len, st.num_sms)
        self.ws = attention_workspace(M, p.n_heads, p.head_dim, self.num_splits, dev)


class DecodeState:
    """Fused weights, RoPE tables and buffers of one patched model."""

    def __init__(self, plan: ModelPlan):
        self.plan = plan
        lm = plan.lm_head.weight
        self.device, self.dtype, self.vocab = lm.device, lm.dtype, lm.shape[0]
        self.num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                        if self.device.type == "cuda" else 8)
        self.layers = []
        for lp in plan.layers:
            w_qkv, b_qkv = fuse_linears([lp.q, lp.k, lp.v])
            w_gu, b_gu = fuse_linears([lp.gate, lp.up])
            eps_qk = norm_eps(lp.q_norm) if lp.q_norm is not None else 0.0
            self.layers.append(FusedLayer(w_qkv, b_qkv, w_gu, b_gu, lp, norm_eps(lp.input_norm),
                                          norm_eps(lp.post_attn_norm), eps_qk))
        self.cos = self.sin = None
        self.table_len = 0
        self.buffers: dict[tuple[int, int], DecodeBuffers] = {}
        self.weights_ptr = self._weights_ptr()

    def _weights_ptr(self) -> int:
        return self.plan.layers[0].q.weight.data_ptr()

    def weights_moved(self) -> bool:
        """True when someone replaced or moved the parameters (model.to(...), load_state_dict with assign)."""
        p = self.plan
        return (self._weights_ptr() != self.weights_ptr or p.lm_head.weight.device != self.device
                or p.lm_head.weight.dtype != self.dtype)

    def release(self) -> None:
        unfuse_linears([m for fl in self.layers for m in (fl.plan.q, fl.plan.k, fl.plan.v, fl.plan.gate, fl.plan.up)])
        self.layers.clear()
        self.buffers.clear()
        self.cos = self.sin = None

    @torch.no_grad()
    def ensure_rope_table(self, length: int) -> None:
        """cos/sin for positions [0, length) from the model's own rotary module (scaling included)."""
        if length <= self.table_len:
            return
        length = max(length, 2 * self.table_len)
        pos = torch.arange(length, device=self.device)[None]
        dummy = torch.empty(1, dtype=self.dtype, device=self.device)
        cos, sin = self.plan.rotary(dummy, position_ids=pos)
        self.cos, self.sin = cos[0].to(self.dtype).contiguous(), sin[0].to(self.dtype).contiguous()
        self.table_len = length

    def buffers_for(self, M: int, max_len: int) -> DecodeBuffers:
        key = (M, max_len)
        if key not in self.buffers:
            self.buffers[key] = DecodeBuffers(self, M, max_len)
        return self.buffers[key]

    def forward(self, cache, b: DecodeBuffers) -> torch.Tensor:
        """One decode step for all b.M rows; reads b.ids/pos/slots/kv_lens, returns b.logits."""
        p = self.plan
        torch.index_select(p.embed.weight, 0, b.ids, out=b.x)
        for i, fl in enumerate(self.layers):
            lp = fl.plan
            fused_gemv(b.x, fl.w_qkv, bias=fl.b_qkv, norm_weight=lp.input_norm.weight, eps=fl.eps1,
                       norm_mode=p.spec.norm_mode, norm_offset=p.spec.norm_offset, out=b.qkv)
            rope_qkv_cache_write(
                b.qkv, self.cos, self.sin, b.pos, b.slots, cache.k[i], cache.v[i], b.q,
                n_heads=p.n_heads, n_kv_heads=p.n_kv_heads, head_dim=p.head_dim,
                q_norm_weight=lp.q_norm.weight if lp.q_norm is not None else None,
                k_norm_weight=lp.k_norm.weight if lp.k_norm is not None else None,
                eps=fl.eps_qk, norm_mode=p.spec.norm_mode, norm_offset=p.spec.norm_offset)
            decode_attention(b.q, cache.k[i], cache.v[i], b.kv_lens, cache.valid, scale=lp.scale,
                             out=b.attn, window=lp.window, num_splits=b.num_splits, workspace=b.ws)
            fused_gemv(b.attn, lp.o.weight, bias=lp.o.bias, residual=b.x, out=b.x)
            fused_gemv(b.x, fl.w_gu, bias=fl.b_gu, norm_weight=lp.post_attn_norm.weight, eps=fl.eps2,
                       norm_mode=p.spec.norm_mode, norm_offset=p.spec.norm_offset, act=p.act, out=b.act)
            fused_gemv(b.act, lp.down.weight, bias=lp.down.bias, residual=b.x, out=b.x)
        fused_gemv(b.x, p.lm_head.weight, norm_weight=p.final_norm.weight, eps=p.eps,
                   norm_mode=p.spec.norm_mode, norm_offset=p.spec.norm_offset, out=b.logits)
        return b.logits
